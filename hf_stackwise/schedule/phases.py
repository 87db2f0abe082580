"""The phase schedule: phases over normalized time t in [0, 1], resolved once to integer steps.

Standard library only, so every rule here is testable in milliseconds. A stack index always means a
position in the current rack, counted from the bottom (0 is the stack closest to the embeddings).

The rack state at step k is a pure function of (schedule, k): :meth:`ResolvedSchedule.state_at`
derives the phase, active depth, trainable units and learning rates from the step alone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from ..errors import RecipeError, StackwiseError  # noqa: F401  (StackwiseError is re-exported)
from .autofreeze import AutoFreeze, check_adapters, check_phase, parse_autofreeze
from .data_fields import (  # noqa: F401  (re-exported)
    MASK_SCHEDULES,
    MASKED_TASKS,
    TASKS,
    parse_data_fields,
    phase_defaults,
)
from .generators import GENERATORS, SPAN_KEYS, Origin, expand, generator_of
from .layout import GROW_KEYWORD, Grow, Layout, NewStack, build_layout, parse_grow
from .rates import (  # noqa: F401  (re-exported)
    LR_SCHEDULES,
    lr_shape_problems,
    parse_rate_fields,
    phase_step_kwargs,
    shape_factor,
)
from .units import (  # noqa: F401  (re-exported)
    DEFAULT_LORA,
    EMBEDDINGS,
    HEAD,
    LORA_KEYS,
    TRUNK_ADAPTER,
    _is_int,
    _is_number,
    check_lora,
    lora_unit,
    stack_unit,
    trunk_unit,
    unit_level,
)

TRAIN_KEYWORDS = ("top", "all", "none", GROW_KEYWORD)
LIST_KEYWORDS = ("top", GROW_KEYWORD)  # allowed inside a list of stack indices: `train: [top]`, `[2, new]`
TRAIN_OR_FREEZE = ("train", "freeze")
PHASE_KEYS = (
    "name",
    "until",
    "stacks",
    "train",
    "embeddings",
    "head",
    "learning_rate",
    "warmup",
    "lr_schedule",
    "lr_schedule_kwargs",
    "weight_decay",
    "layer_lr_decay",
    "adapter",
    "trunk",
    "lora",
    "grow",
    "optimizer_state",
    "task",
    "max_seq_length",
    "mask_rate",
    "mask_schedule",
    "data",
    "autofreeze",
)
OPTIMIZER_STATES = ("keep", "reset", "release_idle")
ADAPTER_MODES = ("full", "lora")
TRUNK_MODES = ("frozen", "lora")


@dataclass(frozen=True)
class Phase:
    """One phase of the schedule, as written in the recipe (with defaults filled in)."""

    name: str
    until: float
    stacks: int | None = None  # active depth: the first `stacks` stacks run; None = all
    train: str | tuple[int | str, ...] = "all"  # stack indices (and `top`) or one of TRAIN_KEYWORDS
    embeddings: str | None = None  # train | freeze; None = train only with `train: all`
    head: str | None = None  # train | freeze; None = train only with `train: all` (classification: train)
    learning_rate: float | None = None  # None = training.learning_rate
    warmup: float = 0.0  # fraction of this phase
    lr_schedule: str = "constant"  # within the phase, after warm-up (see hf_stackwise.schedule.lr_schedules)
    lr_schedule_kwargs: dict | None = None  # the schedule function's other arguments, e.g. {num_cycles: 2}
    weight_decay: float | None = None  # None = training.weight_decay
    layer_lr_decay: float = 1.0  # stack i gets lr * decay ** (top active stack - i)
    adapter: str = "full"  # how trained stacks train: their own weights (full) or a LoRA adapter (lora)
    trunk: str = "frozen"  # active stacks that do not train: frozen, or carrying a trainable trunk LoRA
    lora: dict | None = None  # LoRA overrides for the stack adapters this phase creates
    grow: Grow | None = None  # stacks added at the phase's first step
    optimizer_state: str = "keep"  # reset: all optimizer state starts afresh; release_idle: idle units' state is freed
    # the data plane (None = the recipe's `data:` default)
    task: str | None = None  # clm | mlm | diffusion
    max_seq_length: int | None = None  # tokens per training row in this phase
    mask_rate: float | tuple[float, float] | None = None  # a rate, or a (start, end) ramp over the phase
    mask_schedule: str = "linear"  # shape of a mask_rate ramp: linear | cosine
    data: dict | None = None  # mixture weights over the datasets named in `data.datasets`
    # a generator entry's rate shape, run once over all the phases it generated: {entry, warmup, lr_schedule, ...}
    span: dict | None = None
    autofreeze: AutoFreeze | None = None  # trainable stacks freeze bottom-up when they converge (see .autofreeze)

    def active_depth(self, num_stacks: int) -> int:
        """Number of stacks that run in this phase (``num_stacks``: the rack's size in this phase)."""
        return num_stacks if self.stacks is None else self.stacks

    def trainable_stacks(self, num_stacks: int, new: tuple[int, ...] = ()) -> tuple[int, ...]:
        """Positions of the stacks whose weights train in this phase (``new``: positions of the stacks it grew)."""
        depth = self.active_depth(num_stacks)
        if self.train == "all":
            return tuple(range(depth))
        if self.train == "top":
            return (depth - 1,)
        if self.train == "none":
            return ()
        if self.train == GROW_KEYWORD:
            return tuple(new)
        picked: set[int] = set()
        for i in self.train:
            picked |= {depth - 1} if i == "top" else set(new) if i == GROW_KEYWORD else {i}
        return tuple(sorted(picked))

    def trains_embeddings(self) -> bool:
        return self.embeddings == "train" if self.embeddings is not None else self.train == "all"

    def trains_head(self) -> bool:
        return self.head == "train" if self.head is not None else self.train == "all"

    def trainable_units(
        self, num_stacks: int, order: tuple[int, ...] | None = None, new: tuple[int, ...] = ()
    ) -> frozenset[str]:
        """Units (``embeddings``, ``stack_i``, ``head``) that train in this phase.

        ``order`` maps rack positions to physical stack ids (identity without growth); units use physical ids.
        """
        order = tuple(range(num_stacks)) if order is None else order
        trained = self.trainable_stacks(num_stacks, new)
        make = stack_unit if self.adapter == "full" else lora_unit
        units = {make(order[i]) for i in trained}
        if self.trunk == "lora":
            units |= {trunk_unit(order[i]) for i in range(self.active_depth(num_stacks)) if i not in trained}
        if self.trains_embeddings():
            units.add(EMBEDDINGS)
        if self.trains_head():
            units.add(HEAD)
        return frozenset(units)

    def to_dict(self) -> dict:
        data = asdict(self)
        if isinstance(self.train, tuple):
            data["train"] = list(self.train)
        data["grow"] = self.grow.to_dict() if self.grow is not None else None
        if isinstance(self.mask_rate, tuple):
            data["mask_rate"] = list(self.mask_rate)
        if self.span is None:  # only generated phases carry it: other schedules keep their fingerprint
            del data["span"]
        if self.autofreeze is None:  # only adaptive phases carry it: other schedules keep their fingerprint
            del data["autofreeze"]
        else:
            data["autofreeze"] = self.autofreeze.to_dict()
        return data


def _parse_phase(raw, index: int, previous_until: float, problems: list[str], path: str = "") -> Phase | None:
    path = path or f"schedule[{index}]"
    if not isinstance(raw, dict):
        problems.append(f"{path}: expected a mapping of phase fields, got {type(raw).__name__}")
        return None
    for key in raw:
        if key not in PHASE_KEYS and key != "span":  # `span` is written by a generator (see generators.py)
            problems.append(
                f"{path}.{key}: unknown phase field; known fields are {', '.join(PHASE_KEYS)}, and an entry of its "
                f"own may generate phases with {' or '.join(GENERATORS)}"
            )
    values: dict = {"name": raw.get("name", f"phase{index}")}
    if not isinstance(values["name"], str) or not values["name"]:
        problems.append(f"{path}.name: {values['name']!r} is not a non-empty string")

    until = raw.get("until")
    if until is None:
        problems.append(f"{path}.until: missing; every phase needs the normalized time it ends at, in (0, 1]")
        until = float("nan")
    elif not _is_number(until):
        problems.append(f"{path}.until: {until!r} is not a number in (0, 1]")
        until = float("nan")
    elif not 0 < until <= 1:
        problems.append(f"{path}.until: {until} is not in (0, 1]")
    elif until <= previous_until:
        problems.append(
            f"{path}.until: {until} does not come after the previous phase's end ({previous_until}); "
            "`until` values must be strictly increasing"
        )
    values["until"] = float(until)

    stacks = raw.get("stacks")
    if stacks is not None and not (_is_int(stacks) and stacks >= 1):
        problems.append(f"{path}.stacks: {stacks!r} is not a positive integer (the number of active stacks)")
        stacks = None
    values["stacks"] = stacks

    train = raw.get("train", "all")
    if isinstance(train, str):
        if train not in TRAIN_KEYWORDS:
            problems.append(f"{path}.train: {train!r} is not a list of stack indices or one of {TRAIN_KEYWORDS}")
            train = "none"
    elif _is_int(train):
        train = [train]
    if isinstance(train, list):
        bad = [i for i in train if not ((_is_int(i) and i >= 0) or i in LIST_KEYWORDS)]
        if bad:
            problems.append(
                f"{path}.train: {bad!r} are not stack indices (non-negative integers) or one of {LIST_KEYWORDS}"
            )
            train = "none"
        else:
            train = tuple(train)
    elif not isinstance(train, str):
        problems.append(f"{path}.train: {train!r} is not a list of stack indices or one of {TRAIN_KEYWORDS}")
        train = "none"
    values["train"] = train

    for key in (EMBEDDINGS, HEAD):
        value = raw.get(key)
        if isinstance(value, bool):  # YAML 1.1 reads yes/no/on/off/true/false as booleans
            problems.append(
                f"{path}.{key}: {value!r}: YAML reads yes/no/on/off/true/false as a boolean; write "
                f"`{key}: train` or `{key}: freeze`"
            )
            value = None
        elif value is not None and value not in TRAIN_OR_FREEZE:
            problems.append(f"{path}.{key}: {value!r} is not one of {TRAIN_OR_FREEZE}")
            value = None
        values[key] = value

    values.update(parse_rate_fields(raw, path, problems))

    for key, allowed in (("adapter", ADAPTER_MODES), ("trunk", TRUNK_MODES)):
        value = raw.get(key, allowed[0])
        if value not in allowed:
            problems.append(f"{path}.{key}: {value!r} is not one of {allowed}")
            value = allowed[0]
        values[key] = value
    lora = raw.get("lora")
    if lora is not None:
        check_lora(lora, f"{path}.lora", problems)
        if values["adapter"] != "lora":
            problems.append(f"{path}.lora: LoRA settings need `adapter: lora` in the same phase")
    values["lora"] = dict(lora) if isinstance(lora, dict) else None
    values["grow"] = parse_grow(raw.get("grow"), f"{path}.grow", problems)
    optimizer_state = raw.get("optimizer_state", "keep")
    if optimizer_state not in OPTIMIZER_STATES:
        problems.append(
            f"{path}.optimizer_state: {optimizer_state!r} is not one of {OPTIMIZER_STATES} (`reset` starts every "
            "parameter's optimizer state afresh when the phase begins, `release_idle` frees the state of the units "
            "the phase does not train)"
        )
        optimizer_state = "keep"
    values["optimizer_state"] = optimizer_state
    values.update(parse_data_fields(raw, path, problems))
    values["span"] = _parse_span(raw.get("span"), path.split(".")[0], problems)
    values["autofreeze"] = parse_autofreeze(raw.get("autofreeze"), f"{path}.autofreeze", problems)
    if values["autofreeze"] is not None and values["train"] == "none":
        problems.append(f"{path}.autofreeze: the phase trains no stack (`train: none`), so nothing could freeze")
    if values["autofreeze"] is not None:
        problems += check_adapters(values["adapter"], values["trunk"], f"{path}.autofreeze")
    return Phase(**values)


def _parse_span(raw, path: str, problems: list[str]) -> dict | None:
    """A generated phase's ``span``: its entry's name and rate shape, checked like a phase's (under the entry)."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("entry"), str):
        problems.append(f"{path}.span: {raw!r} is not a generator entry's rate shape")
        return None
    shape = parse_rate_fields(raw, path, problems)
    return {"entry": raw["entry"], **{key: shape[key] for key in SPAN_KEYS}}


@dataclass(frozen=True)
class Schedule:
    """The ordered phases of a recipe; the first starts at t = 0, the last ends at t = 1."""

    phases: tuple[Phase, ...]
    origins: tuple[Origin, ...] = field(default=(), compare=False, repr=False)  # the entry each phase comes from
    source: tuple | None = field(default=None, compare=False, repr=False)  # (raw list, defaults) with generators
    raw: list | None = field(default=None, compare=False, repr=False)  # the list as written (the trainer's input)

    @classmethod
    def from_list(cls, raw, defaults: dict | None = None) -> Schedule:
        """Parse and validate the recipe's ``schedule`` list; raises one :class:`RecipeError` listing all problems.

        ``defaults``: phase fields a phase gets when it does not give them (the task's, see ``phase_defaults``);
        they become part of the parsed phases, so ``to_list`` and the fingerprint carry them."""
        return cls._parse(raw, defaults, None)

    @classmethod
    def _parse(cls, raw, defaults: dict | None, racks: dict | None) -> Schedule:
        """:meth:`from_list`, with generators over ``all`` expanded against ``racks`` (see :meth:`for_rack`)."""
        problems: list[str] = []
        if not isinstance(raw, list) or not raw:
            raise RecipeError("schedule: expected a non-empty list of phases, each with at least `until`")
        source = (raw, defaults) if any(generator_of(item) for item in raw) else None
        entries, origins = expand(raw, racks, problems)  # generators (cycle, sample) become ordinary phases
        phases = []
        previous = 0.0
        for index, (item, origin) in enumerate(zip(entries, origins, strict=True)):
            if defaults and isinstance(item, dict):
                item = {**defaults, **{k: v for k, v in item.items() if v is not None}}
            phase = _parse_phase(item, index, previous, problems, origin.key())
            if phase is not None:
                phases.append(phase)
                if 0 < phase.until <= 1:  # an invalid `until` is reported once, not again for the next phase
                    previous = max(previous, phase.until)
        names = [p.name for p in phases if isinstance(p.name, str)]  # others are reported under `.name`
        for name in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"schedule: phase name {name!r} is used more than once; give each phase its own name")
        if phases and not problems and phases[-1].until != 1.0:
            problems.append(f"schedule[{len(raw) - 1}].until: {phases[-1].until} but the last phase must end at 1.0")
        if problems:
            raise RecipeError(list(dict.fromkeys(problems)))  # a generator's fields are reported once
        return cls(tuple(phases), tuple(origins), source, raw)

    def key_path(self, index: int, key: str = "") -> str:
        """Recipe key path of phase ``index``'s ``key`` (a generated phase points into its generator)."""
        return (self.origins[index] if self.origins else Origin(index)).key(key)

    def for_rack(self, base: int | tuple[int, ...]) -> Schedule:
        """This schedule with its generators expanded against the rack (``all``, and named stacks checked)."""
        if self.source is None:
            return self
        layout = self.layout(base)
        racks = {}
        for index, origin in enumerate(self.origins):
            if origin.generator is not None and origin.index not in racks:
                size = len(layout.orders[index])
                racks[origin.index] = (size, self.phases[index].active_depth(size))
        return Schedule._parse(*self.source, racks)

    def to_list(self) -> list[dict]:
        return [p.to_dict() for p in self.phases]

    def fingerprint(self) -> str:
        """A stable hash of the normalized schedule (stored in checkpoints to refuse edited resumes)."""
        text = json.dumps(self.to_list(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def layout(self, base: int | tuple[int, ...]) -> Layout:
        """Physical stacks and each phase's rack order; ``base``: the model's stack count or stack sizes."""
        return build_layout([p.grow for p in self.phases], base)

    def grows(self) -> bool:
        return any(p.grow is not None for p in self.phases)

    def validate_rack(self, base: int | tuple[int, ...]) -> None:
        """Check growth and stack references against the real rack (``base``: stack count or stack sizes)."""
        layout = self.layout(base)
        problems = []
        for index, phase in enumerate(self.phases):
            path = self.key_path(index)
            num_stacks = len(layout.orders[index])
            new = layout.new_positions(index)
            grown = " (after this phase's growth)" if new else ""
            if phase.stacks is not None and phase.stacks > num_stacks:
                problems.append(
                    f"{path}.stacks: {phase.stacks} but the rack has only {num_stacks} stacks{grown}; "
                    f"use a value in 1..{num_stacks}"
                )
                continue
            depth = phase.active_depth(num_stacks)
            wants_new = phase.train == GROW_KEYWORD or (isinstance(phase.train, tuple) and GROW_KEYWORD in phase.train)
            if wants_new and not new:
                problems.append(
                    f"{path}.train: `new` names the stacks this phase grows, but it has no `grow`; add "
                    "`grow: {op: ..., stacks: N}` or name the stacks by position"
                )
                continue
            inactive_new = [p for p in new if p >= depth]
            if wants_new and inactive_new:
                problems.append(
                    f"{path}.train: the new stacks at positions {inactive_new} are not active (`stacks: {depth}`); "
                    "raise `stacks` or grow at the bottom"
                )
                continue
            if isinstance(phase.train, tuple):
                indices = [i for i in phase.train if not isinstance(i, str)]
                beyond = [i for i in indices if i >= num_stacks]
                inactive = [i for i in indices if num_stacks > i >= depth]
                if beyond:
                    problems.append(
                        f"{path}.train: stack {beyond} does not exist; the rack has {num_stacks} stacks{grown} "
                        f"(indices 0..{num_stacks - 1})"
                    )
                if inactive:
                    problems.append(
                        f"{path}.train: stack {inactive} is not active in this phase (`stacks: {depth}` runs "
                        f"stacks 0..{depth - 1}); raise `stacks` or train an active stack"
                    )
                if beyond:
                    continue
            if phase.autofreeze is not None:
                trainable = phase.trainable_stacks(num_stacks, new)
                problems += check_phase(phase.autofreeze, trainable, depth, f"{path}.autofreeze")
            if not phase.trainable_units(num_stacks, layout.orders[index], new):
                problems.append(
                    f"{path}: phase {phase.name!r} trains nothing (`train: none`, embeddings and head frozen); "
                    "name a stack in `train` or set `head: train`"
                )
        if problems:
            raise RecipeError(problems)

    def uses_lora(self) -> bool:
        """Whether any phase trains through LoRA (stack adapters or the trunk adapter)."""
        return any(p.adapter == "lora" or p.trunk == "lora" for p in self.phases)

    def phase_units(self, base: int | tuple[int, ...]) -> list[frozenset[str]]:
        """Trainable units of every phase, by physical stack id."""
        layout = self.layout(base)
        return [
            phase.trainable_units(len(order), order, layout.new_positions(i))
            for i, (phase, order) in enumerate(zip(self.phases, layout.orders, strict=True))
        ]

    def ever_trainable_units(self, base: int | tuple[int, ...]) -> frozenset[str]:
        """The superset: every unit that trains in at least one phase."""
        return frozenset().union(*self.phase_units(base))

    def resolve(self, total_steps: int) -> ResolvedSchedule:
        """Resolve phase boundaries to integer steps: phase i covers steps [start, end)."""
        if total_steps < 1:
            raise RecipeError(
                f"training.max_steps: the run has {total_steps} optimizer steps; set `max_steps` to a positive "
                "number or give `num_train_epochs` with a dataset of known length"
            )
        bounds = []
        start = 0
        problems = []
        for index, phase in enumerate(self.phases):
            end = total_steps if phase.until == 1.0 else round(phase.until * total_steps)
            path = self.key_path(index, "until")
            if end <= start and not any(p.startswith(f"{path}:") for p in problems):  # once per generator
                problems.append(
                    f"{path}: phase {phase.name!r} gets no optimizer step at {total_steps} "
                    f"total steps (ends at step {end}); raise `training.max_steps` or widen the phase"
                )
            if phase.autofreeze is not None and end > start:
                problems += phase.autofreeze.check_length(end - start, self.key_path(index, "autofreeze"), phase.name)
            bounds.append((start, end))
            start = max(start, end)
        if problems:
            raise RecipeError(problems)
        resolved = ResolvedSchedule(self, total_steps, tuple(bounds))
        resolved.check_lr_shapes()
        return resolved


@dataclass(frozen=True)
class PhaseState:
    """What the rack looks like at one step."""

    index: int
    name: str
    active_depth: int
    trainable_stacks: tuple[int, ...]  # rack positions
    trainable_units: frozenset[str]  # by physical stack id
    order: tuple[int, ...] = ()  # physical ids of the active stacks, bottom → top
    grown: tuple[NewStack, ...] = ()  # stacks this phase grows at its first step


@dataclass(frozen=True)
class ResolvedSchedule:
    """A schedule with its boundaries resolved to steps for one run length."""

    schedule: Schedule
    total_steps: int
    bounds: tuple[tuple[int, int], ...]
    _cache: dict = field(default_factory=dict, compare=False, repr=False)
    _factors: dict = field(default_factory=dict, compare=False, repr=False)

    def phase_index(self, step: int) -> int:
        """Index of the phase that step ``step`` (0-based optimizer step) belongs to; clamped to the last."""
        for index, (_, end) in enumerate(self.bounds):
            if step < end:
                return index
        return len(self.bounds) - 1

    def t(self, step: int) -> float:
        """Normalized time of ``step``."""
        return step / self.total_steps

    def layout(self, base: int | tuple[int, ...]) -> Layout:
        key = ("layout", base)
        if key not in self._cache:
            self._cache[key] = self.schedule.layout(base)
        return self._cache[key]

    def state_at(self, step: int, base: int | tuple[int, ...]) -> PhaseState:
        """The rack at ``step``; ``base``: the model's stack count (or stack sizes) before any growth."""
        index = self.phase_index(step)
        key = (index, base)
        if key not in self._cache:
            phase = self.schedule.phases[index]
            layout = self.layout(base)
            order = layout.orders[index]
            new = layout.new_positions(index)
            depth = phase.active_depth(len(order))
            self._cache[key] = PhaseState(
                index=index,
                name=phase.name,
                active_depth=depth,
                trainable_stacks=phase.trainable_stacks(len(order), new),
                trainable_units=phase.trainable_units(len(order), order, new),
                order=order[:depth],
                grown=layout.grown[index],
            )
        return self._cache[key]

    def check_lr_shapes(self) -> None:
        """Phases (and generator spans) with ``lr_schedule_kwargs`` give a finite, non-negative rate over their steps
        at this run length (e.g. ``num_decay_steps`` no longer than the phase)."""
        problems = lr_shape_problems(self)
        if problems:
            raise RecipeError(problems)

    def span_bounds(self, index: int) -> tuple[int, int] | None:
        """Steps ``[start, end)`` of the generator entry phase ``index`` came from, when that entry has a rate shape
        (its consecutive phases with the same ``span``); None otherwise."""
        span = self.schedule.phases[index].span
        if span is None:
            return None
        first = last = index
        phases = self.schedule.phases
        while first > 0 and phases[first - 1].span == span:
            first -= 1
        while last + 1 < len(phases) and phases[last + 1].span == span:
            last += 1
        return self.bounds[first][0], self.bounds[last][1]

    def lr_factor(self, step: int, base_lr: float = 1.0) -> float:
        """Shape of the learning rate inside the phase of ``step``: its ``warmup``, then its ``lr_schedule``, as
        transformers computes them over the phase's steps (``base_lr``: the rate a phase without
        ``learning_rate`` uses, which absolute kwargs such as ``min_lr`` are relative to); a generated phase's
        factor is multiplied by its entry's shape over the entry's whole span."""
        index = self.phase_index(step)
        phase = self.schedule.phases[index]
        peak = phase.learning_rate if phase.learning_rate is not None else base_lr
        factor = shape_factor(self._factors, ("phase", index, peak), phase, self.bounds[index], step, peak)
        span = self.span_bounds(index)
        if span is not None:
            factor *= shape_factor(self._factors, ("span", span, peak), phase.span, span, step, peak)
        return factor

    def unit_lr(self, step: int, unit: str, base_lr: float, num_stacks: int | tuple[int, ...]) -> float:
        """Learning rate of ``unit`` at ``step``; 0 for a unit that does not train then.

        The stack at position ``i`` gets ``lr * layer_lr_decay ** (top - i)`` with ``top`` the highest active
        position; the embeddings sit one level below position 0 and the head at the top's rate.
        """
        state = self.state_at(step, num_stacks)
        if unit not in state.trainable_units:
            return 0.0
        phase = self.schedule.phases[state.index]
        lr = (phase.learning_rate if phase.learning_rate is not None else base_lr) * self.lr_factor(step, base_lr)
        top = state.active_depth - 1
        if unit == HEAD:
            return lr
        level = unit_level(unit)
        position = -1 if level < 0 else state.order.index(level)
        return lr * phase.layer_lr_decay ** (top - position)

    def trace(self, num_stacks: int | tuple[int, ...]) -> list[tuple[int, str, tuple[int, ...]]]:
        """``(first step, phase name, trainable stacks)`` per phase: the golden trace tests compare against."""
        return [
            (start, self.schedule.phases[i].name, self.state_at(start, num_stacks).trainable_stacks)
            for i, (start, _) in enumerate(self.bounds)
        ]
