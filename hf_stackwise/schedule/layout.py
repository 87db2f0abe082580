"""Growth as arithmetic: which stacks exist in each phase, and in what order (standard library only).

Stacks have *physical* ids that never change: the base model's stacks are ``0..K-1`` and every stack a
``grow`` adds takes the next id, its blocks appended after the last existing block. A phase's *order*
lists the physical ids of its rack bottom → top, so a stack grown at the bottom has a high id but
position 0. Parameters, optimizer groups and checkpoints follow physical ids; the recipe's stack
indices are positions in the current order.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import RecipeError

GROW_OPS = ("identity", "copy", "random")
GROW_PLACES = ("top", "bottom", "interleave")
GROW_KEYS = ("op", "stacks", "blocks", "at")
GROW_KEYWORD = "new"  # `train: new` trains the stacks the phase grows


def stack_sizes(boundaries) -> tuple[int, ...]:
    """Blocks per stack of block boundaries ``(0, b1, ..., num_blocks)``."""
    return tuple(b - a for a, b in zip(boundaries, boundaries[1:], strict=False))


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class Grow:
    """A phase's ``grow``: add ``stacks`` copies of stacks, or ``blocks`` blocks, at ``at``, initialised by ``op``."""

    op: str
    stacks: int | None = None
    blocks: int | None = None
    at: str | tuple[int, ...] = "top"

    def to_dict(self) -> dict:
        at = list(self.at) if isinstance(self.at, tuple) else self.at
        return {"op": self.op, "stacks": self.stacks, "blocks": self.blocks, "at": at}


def parse_grow(raw, path: str, problems: list[str]) -> Grow | None:
    """Validate a phase's ``grow`` mapping; problems name their key path."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        problems.append(f"{path}: expected a mapping like {{op: copy, stacks: 2, at: top}}")
        return None
    for key in raw:
        if key not in GROW_KEYS:
            problems.append(f"{path}.{key}: unknown growth setting; known settings are {', '.join(GROW_KEYS)}")
    op = raw.get("op")
    if op not in GROW_OPS:
        what = "missing" if op is None else f"{op!r} is not one of {GROW_OPS}"
        problems.append(
            f"{path}.op: {what}; `identity` adds blocks that start as the identity, `copy` duplicates "
            "existing blocks, `random` uses the architecture's own initialisation"
        )
        op = "copy"
    at = raw.get("at", "top")
    if isinstance(at, (list, tuple)):
        if not at or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in at):
            problems.append(f"{path}.at: {at!r} is not a non-empty list of stack positions (non-negative integers)")
            at = "top"
        elif len(set(at)) != len(at):
            problems.append(f"{path}.at: {at!r} repeats a position; grow several stacks at one place with `stacks`")
            at = "top"
        else:
            at = tuple(sorted(at))
    elif at not in GROW_PLACES:
        problems.append(f"{path}.at: {at!r} is not one of {GROW_PLACES} or a list of stack positions")
        at = "top"
    stacks, blocks = raw.get("stacks"), raw.get("blocks")
    for key, value in (("stacks", stacks), ("blocks", blocks)):
        if value is not None and not _is_count(value):
            problems.append(f"{path}.{key}: {value!r} is not a positive integer")
    if stacks is not None and blocks is not None:
        problems.append(f"{path}: give `stacks` or `blocks`, not both")
        blocks = None
    if stacks is None and blocks is None:
        if isinstance(at, tuple):
            stacks = len(at)  # one stack per listed position
        else:
            problems.append(f"{path}: say how much to grow with `stacks: N` (copies of whole stacks) or `blocks: N`")
            stacks = 1
    return Grow(
        op=op, stacks=stacks if _is_count(stacks) else None, blocks=blocks if _is_count(blocks) else None, at=at
    )


@dataclass(frozen=True)
class NewStack:
    """A stack that a phase grows: its physical id, its position after growth and the blocks it starts from."""

    stack: int
    position: int
    sources: tuple[int, ...]  # physical blocks copied (identity, copy) or whose shape it takes (random)
    op: str


@dataclass(frozen=True)
class Layout:
    """Physical stacks of the whole run and every phase's rack order."""

    sizes: tuple[int, ...]  # blocks per physical stack: the base stacks first, then grown ones
    num_base: int  # stacks of the model as loaded
    orders: tuple[tuple[int, ...], ...]  # per phase: physical stack ids, bottom → top
    grown: tuple[tuple[NewStack, ...], ...]  # per phase: the stacks grown at its first step

    @property
    def boundaries(self) -> tuple[int, ...]:
        bounds = [0]
        for size in self.sizes:
            bounds.append(bounds[-1] + size)
        return tuple(bounds)

    @property
    def grows(self) -> bool:
        return any(self.grown)

    @property
    def num_blocks(self) -> int:
        return sum(self.sizes)

    @property
    def num_base_blocks(self) -> int:
        return sum(self.sizes[: self.num_base])

    def stack_blocks(self, stack: int) -> range:
        bounds = self.boundaries
        return range(bounds[stack], bounds[stack + 1])

    def blocks(self, order: tuple[int, ...]) -> list[int]:
        """Physical block ids of the stacks in ``order``, bottom → top."""
        return [b for s in order for b in self.stack_blocks(s)]

    def new_positions(self, phase_index: int) -> tuple[int, ...]:
        return tuple(n.position for n in self.grown[phase_index])


def grow_rack(
    order: tuple[int, ...], sizes: list[int], grow: Grow, path: str, problems: list[str]
) -> tuple[tuple[int, ...], list[int], tuple[NewStack, ...]]:
    """The rack after ``grow``: new order, sizes of every physical stack, and the new stacks."""
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)

    def own(stack: int) -> tuple[int, ...]:
        return tuple(range(bounds[stack], bounds[stack + 1]))

    m = len(order)
    rack = [b for s in order for b in own(s)]
    starts = [0]  # block offset where each position starts, and the rack's end
    for s in order:
        starts.append(starts[-1] + sizes[s])
    at = grow.at
    inserts: list[tuple[int, tuple[int, ...]]] = []  # (position in the old order to insert before, sources)
    if grow.stacks is not None:
        n = grow.stacks
        if isinstance(at, tuple):
            if len(at) != n:
                problems.append(f"{path}.stacks: {n} but `at` lists {len(at)} positions; give one position per stack")
                return order, sizes, ()
            inserts = [(p, own(order[p - 1] if p else order[0])) for p in at if p <= m]
        elif at == "interleave":
            if m % n:
                problems.append(
                    f"{path}.stacks: {n} new stacks cannot be spread evenly over the {m} stacks of this phase's rack; "
                    f"use a divisor of {m}"
                )
                return order, sizes, ()
            k = m // n
            inserts = [((j + 1) * k, own(order[(j + 1) * k - 1])) for j in range(n)]
        elif n > m:
            problems.append(
                f"{path}.stacks: {n} copies, but the rack has {m} stacks in this phase; copy at most {m} "
                "(grow again in a later phase to go further)"
            )
            return order, sizes, ()
        elif at == "top":
            inserts = [(m, own(order[m - n + j])) for j in range(n)]
        else:
            inserts = [(0, own(order[j])) for j in range(n)]
    else:
        n = grow.blocks
        total = len(rack)
        if isinstance(at, tuple):
            if n % len(at):
                problems.append(
                    f"{path}.blocks: {n} blocks cannot be split evenly over the {len(at)} positions of `at`"
                )
                return order, sizes, ()
            per = n // len(at)
            for p in at:
                if p > m:
                    continue
                below = rack[: starts[p]]
                if per > (len(below) if p else total):
                    problems.append(
                        f"{path}.blocks: {per} blocks at position {p} would copy more blocks than lie below it "
                        f"({len(below)})"
                    )
                    return order, sizes, ()
                inserts.append((p, tuple(below[-per:] if p else rack[:per])))
        elif n > total:
            problems.append(
                f"{path}.blocks: {n} new blocks, but the rack has {total} blocks in this phase; grow at most {total} "
                "(grow again in a later phase to go further)"
            )
            return order, sizes, ()
        elif at == "top":
            inserts = [(m, tuple(rack[total - n :]))]
        elif at == "bottom":
            inserts = [(0, tuple(rack[:n]))]
        else:
            if total % n:
                problems.append(
                    f"{path}.blocks: {n} new blocks cannot be spread evenly over the {total} blocks of this phase's "
                    f"rack; use a divisor of {total}"
                )
                return order, sizes, ()
            k = total // n
            for j in range(n):
                after = (j + 1) * k
                if after not in starts:
                    problems.append(
                        f"{path}.at: interleaving {n} blocks puts one after block {after - 1}, inside a stack; use "
                        "`stacks:` instead, or a rack with one block per stack"
                    )
                    return order, sizes, ()
                inserts.append((starts.index(after), (rack[after - 1],)))
    if isinstance(at, tuple):
        outside = [p for p in at if p > m]
        if outside:
            problems.append(
                f"{path}.at: position {outside} is outside this phase's rack of {m} stacks (positions 0..{m})"
            )
            return order, sizes, ()
    new_order: list[int] = []
    new_stacks: list[NewStack] = []
    sizes = list(sizes)
    pending = sorted(range(len(inserts)), key=lambda i: inserts[i][0])  # stable: keeps each place's order
    cursor = 0
    for position in range(m + 1):
        while cursor < len(pending) and inserts[pending[cursor]][0] == position:
            sources = inserts[pending[cursor]][1]
            stack = len(sizes)
            sizes.append(len(sources))
            new_stacks.append(NewStack(stack, len(new_order), sources, grow.op))
            new_order.append(stack)
            cursor += 1
        if position < m:
            new_order.append(order[position])
    return tuple(new_order), sizes, tuple(new_stacks)


def build_layout(grows: list[Grow | None], base) -> Layout:
    """The layout of a schedule whose phases grow as ``grows``; ``base`` is the stack count or the stack sizes."""
    sizes = [1] * base if isinstance(base, int) else list(base)
    num_base = len(sizes)
    order = tuple(range(num_base))
    problems: list[str] = []
    orders, grown = [], []
    for index, grow in enumerate(grows):
        new: tuple[NewStack, ...] = ()
        if grow is not None:
            order, sizes, new = grow_rack(order, sizes, grow, f"schedule[{index}].grow", problems)
        orders.append(order)
        grown.append(new)
    if problems:
        raise RecipeError(problems)
    return Layout(tuple(sizes), num_base, tuple(orders), tuple(grown))
