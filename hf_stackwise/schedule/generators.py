"""Schedule generators: one `schedule:` entry that expands into ordinary phases before anything loads.

Standard library only, and pure: the expansion is a function of the recipe (and, for ``all``, of the rack's
size), so every rank expands the same phases and the rack state stays a function of the step.

- ``cycle: {stacks: [..] | all, order: descending | ascending | random, k: 1, rounds: 1, seed: 0}`` trains
  ``k`` stacks at a time, visiting every listed stack once per round (block-coordinate descent, BAdam);
  ``random`` draws a fresh permutation per round from ``seed``. The entry's time range is split evenly over
  ``rounds × ⌈len / k⌉`` phases.
- ``sample: {pool: [..] | all, k: 2, every: 0.05, seed: 0}`` trains ``k`` stacks drawn from the pool every
  ``every`` of normalized time (layer sampling, LISA); draw ``j`` is seeded by ``(seed, j)``.

Generated phases are named ``<name>-1``, ``<name>-2``, ... and carry the entry's other phase fields, except its
rate shape: the entry's ``warmup``, ``lr_schedule`` and ``lr_schedule_kwargs`` run once over the entry's whole span
(one warm-up, one decay; each generated phase carries them as its ``span``). A generated phase's own shape goes in
the generator's ``each: {warmup, lr_schedule, lr_schedule_kwargs}`` and multiplies the span's.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .rates import parse_rate_fields

GENERATORS = {
    "cycle": {"stacks": "all", "order": "descending", "k": 1, "rounds": 1, "seed": 0, "each": None},
    "sample": {"pool": "all", "k": 2, "every": 0.05, "seed": 0, "each": None},
}
SPAN_KEYS = ("warmup", "lr_schedule", "lr_schedule_kwargs")  # the entry's rate shape: once over its whole span
POOL_KEY = {"cycle": "stacks", "sample": "pool"}
ORDERS = ("descending", "ascending", "random")
NOT_IN_GENERATOR = ("train", "grow")  # the generator sets `train`; growth would repeat in every phase


@dataclass(frozen=True)
class Origin:
    """Where a phase comes from: the `schedule` entry's index, and the generator that made it (if any)."""

    index: int
    generator: str | None = None

    def key(self, key: str = "") -> str:
        """Recipe key path of ``key`` for this phase (a generated phase's `train` is its generator's pool)."""
        path = f"schedule[{self.index}]"
        if self.generator is not None and key == "train":
            return f"{path}.{self.generator}.{POOL_KEY[self.generator]}"
        if self.generator is not None and key == "until":
            return f"{path}.{self.generator}" + (".every" if self.generator == "sample" else "")
        return f"{path}.{key}" if key else path


def generator_of(entry) -> str | None:
    """``cycle`` / ``sample`` when the schedule entry is a generator."""
    if not isinstance(entry, dict):
        return None
    found = [g for g in GENERATORS if g in entry]
    return found[0] if found else None


def expand(raw: list, racks: dict[int, tuple[int, int]] | None, problems: list[str]) -> tuple[list, list[Origin]]:
    """The schedule list with every generator replaced by its phases, and each phase's origin.

    ``racks``: entry index → (stacks in the rack, active stacks) where the generator runs; without it, a
    generator over ``all`` stands as one placeholder phase that trains nothing (see ``Schedule.for_rack``), and
    named stacks are checked against the rack later. Problems are appended, naming their key paths."""
    phases: list = []
    origins: list[Origin] = []
    previous = 0.0
    for index, entry in enumerate(raw):
        kind = generator_of(entry)
        if kind is None:
            phases.append(entry)
            origins.append(Origin(index))
            until = entry.get("until") if isinstance(entry, dict) else None
            if _is_number(until) and previous < until <= 1:
                previous = float(until)
            continue
        rack = racks.get(index) if racks else None
        generated = _expand_one(entry, kind, index, previous, rack, problems)
        if generated is None:  # report the entry's other fields once; it trains nothing meanwhile
            generated = [{k: v for k, v in entry.items() if k not in (kind, *NOT_IN_GENERATOR)} | {"train": "none"}]
        phases += generated
        origins += [Origin(index, kind)] * len(generated)
        until = entry.get("until")
        if _is_number(until) and previous < until <= 1:
            previous = float(until)
    return phases, origins


def _expand_one(entry: dict, kind: str, index: int, start: float, rack, problems: list[str]) -> list | None:
    path = f"schedule[{index}]"
    before = len(problems)
    for key in NOT_IN_GENERATOR:
        if key in entry:
            problems.append(
                f"{path}.{key}: a `{kind}` entry sets which stacks train in each phase it generates; "
                f"drop `{key}` (write a separate phase for it)"
            )
    others = [g for g in GENERATORS if g in entry and g != kind]
    if others:
        problems.append(f"{path}: one entry cannot be both `{kind}` and `{others[0]}`; split it into two entries")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        problems.append(f"{path}.name: a `{kind}` entry needs a name; its phases are named <name>-1, <name>-2, ...")
    until = entry.get("until")
    if not (_is_number(until) and start < until <= 1):
        return None  # the phase parser reports a bad `until`
    spec = entry[kind]
    if not isinstance(spec, dict):
        problems.append(f"{path}.{kind}: expected a mapping with keys among {', '.join(GENERATORS[kind])}")
        return None
    spec_path = f"{path}.{kind}"
    for key in spec:
        if key not in GENERATORS[kind]:
            problems.append(
                f"{spec_path}.{key}: unknown `{kind}` setting; known settings are " + ", ".join(GENERATORS[kind])
            )
    spec = {**GENERATORS[kind], **spec}
    for key in ("k", "rounds"):
        if key in spec and not (_is_int(spec[key]) and spec[key] >= 1):
            problems.append(f"{spec_path}.{key}: {spec[key]!r} is not a positive integer")
    if not _is_int(spec["seed"]):
        problems.append(f"{spec_path}.seed: {spec['seed']!r} is not an integer; give a whole number such as 0")
    if kind == "cycle" and spec["order"] not in ORDERS:
        problems.append(f"{spec_path}.order: {spec['order']!r} is not one of {ORDERS}")
    if kind == "sample" and not (_is_number(spec["every"]) and 0 < spec["every"] <= until - start):
        problems.append(
            f"{spec_path}.every: {spec['every']!r} is not a fraction of time in (0, {until - start:g}] "
            f"(the entry spans t = {start:g}..{until:g})"
        )
    pool = _pool(spec[POOL_KEY[kind]], f"{spec_path}.{POOL_KEY[kind]}", rack, entry.get("stacks"), problems)
    if pool is not None and _is_int(spec["k"]) and spec["k"] > len(pool):
        problems.append(
            f"{spec_path}.k: {spec['k']} but the pool has {len(pool)} stacks {pool}; use k in "
            f"1..{len(pool)} or a larger `{POOL_KEY[kind]}`"
        )
    if len(problems) > before or pool is None:
        return None
    each = spec["each"] if spec["each"] is not None else {}
    if not isinstance(each, dict) or any(key not in SPAN_KEYS for key in each):
        problems.append(
            f"{spec_path}.each: {each!r} is not a mapping of {', '.join(SPAN_KEYS)} (each generated phase's own "
            "rate shape; the entry's own keys run once over its whole span)"
        )
        return None
    if each and parse_rate_fields(each, f"{spec_path}.each", problems) and len(problems) > before:
        return None
    groups = _cycle(pool, spec) if kind == "cycle" else _sample(pool, spec, until - start)
    fields = {k: v for k, v in entry.items() if k not in (kind, "name", "until", *SPAN_KEYS)}
    span = {key: entry[key] for key in SPAN_KEYS if key in entry}
    if span:
        fields["span"] = {"entry": name, **span}
    n = len(groups)
    ends = [_end(start, until, (j + 1) / n) for j in range(n)] if kind == "cycle" else _sample_ends(start, until, spec)
    return [
        {**fields, **each, "name": f"{name}-{j + 1}", "until": end, "train": list(group)}
        for j, (group, end) in enumerate(zip(groups, ends, strict=True))
    ]


def _pool(value, path: str, rack, depth, problems: list[str]) -> list[int] | None:
    """The stacks a generator picks from; None while ``all`` waits for the rack (or on a problem)."""
    if value == "all":
        return list(range(rack[1])) if rack else None
    if not (isinstance(value, list) and value and all(_is_int(i) and i >= 0 for i in value)):
        problems.append(f"{path}: {value!r} is not `all` or a non-empty list of stack indices (0 = bottom)")
        return None
    if len(set(value)) != len(value):
        problems.append(f"{path}: {value!r} names a stack more than once")
        return None
    if rack:
        num_stacks, active = rack
        beyond = [i for i in value if i >= num_stacks]
        inactive = [i for i in value if num_stacks > i >= active]
        if beyond:
            problems.append(
                f"{path}: stack {beyond} does not exist; the rack has {num_stacks} stacks "
                f"(indices 0..{num_stacks - 1})"
            )
        if inactive:
            problems.append(
                f"{path}: stack {inactive} is not active (`stacks: {active}` runs stacks "
                f"0..{active - 1}); raise `stacks` or pick active stacks"
            )
        if beyond or inactive:
            return None
    elif _is_int(depth) and depth >= 1 and any(i >= depth for i in value):
        problems.append(
            f"{path}: stack {[i for i in value if i >= depth]} is not active (`stacks: {depth}` runs "
            f"stacks 0..{depth - 1}); raise `stacks` or pick active stacks"
        )
        return None
    return list(value)


def _cycle(pool: list[int], spec: dict) -> list[tuple[int, ...]]:
    k = spec["k"]
    groups = []
    for round_ in range(spec["rounds"]):
        if spec["order"] == "random":
            order = sorted(pool)
            random.Random(f"cycle:{spec['seed']}:{round_}").shuffle(order)
        else:
            order = sorted(pool, reverse=spec["order"] == "descending")
        groups += [tuple(sorted(order[i : i + k])) for i in range(0, len(order), k)]
    return groups


def _sample(pool: list[int], spec: dict, span: float) -> list[tuple[int, ...]]:
    count = len(_sample_ends(0.0, span, spec))
    return [
        tuple(sorted(random.Random(f"sample:{spec['seed']}:{j}").sample(sorted(pool), spec["k"])))
        for j in range(count)
    ]


def _sample_ends(start: float, until: float, spec: dict) -> list[float]:
    """A phase every ``every`` of time from ``start``; the last one ends at ``until`` (and may be shorter)."""
    count = math.ceil(round((until - start) / spec["every"], 9))
    return [_end(start, until, min(1.0, (j + 1) * spec["every"] / (until - start))) for j in range(count)]


def _end(start: float, until: float, fraction: float) -> float:
    return float(until) if fraction >= 1 else round(start + (until - start) * fraction, 12)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
