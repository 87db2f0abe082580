"""Adaptive freezing (a phase's ``autofreeze:``): the settings and the pure criterion over gradient-norm series.

Inside a phase with ``autofreeze``, the stacks it trains freeze bottom-up, a contiguous prefix of them at a time,
when their gradient stops changing (AutoFreeze, arXiv 2102.01386). The trainer feeds each optimizer step's squared
gradient norm per trainable stack (all-reduced, so every rank holds the same numbers) to
:class:`FreezeTracker`; every ``every`` steps of the phase it closes an interval, and from the end of ``warmup`` on
compares the interval's RMS gradient norm with the previous interval's. A stack freezes when its relative change
``|n_k - n_{k-1}| / n_{k-1}`` is below the ``percentile`` of the changes of every stack still training (and below
``threshold`` when one is given); only the lowest still-training stacks freeze, never one at or above a ``keep``
stack. Decisions are plain data (step, stacks, statistics, threshold), recorded in every checkpoint, so the rack at
step k is a pure function of (recipe, k, recorded decisions).

Standard library only: every rule here is tested in milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

AUTOFREEZE_KEYS = ("criterion", "every", "warmup", "percentile", "threshold", "keep")
CRITERIA = ("grad_norm_change",)  # AutoFreeze's: relative change of a stack's gradient norm between intervals
DEFAULT_EVERY = 0.1  # a tenth of the phase
DEFAULT_WARMUP = 0.2  # no decision in the phase's first fifth
DEFAULT_PERCENTILE = 50.0


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def phase_steps(value: float, length: int) -> int:
    """``every`` / ``warmup`` in steps of a phase of ``length`` steps: an integer is steps, (0, 1) a fraction."""
    if _is_int(value):
        return value
    return max(1, round(value * length)) if value > 0 else 0


@dataclass(frozen=True)
class AutoFreeze:
    """A phase's ``autofreeze:`` settings (defaults filled in)."""

    criterion: str = "grad_norm_change"
    every: int | float = DEFAULT_EVERY  # steps between decisions (an integer), or a fraction of the phase in (0, 1)
    warmup: int | float = DEFAULT_WARMUP  # steps (or fraction of the phase) before the first decision
    percentile: float = DEFAULT_PERCENTILE  # a stack freezes below this percentile of the trainable stacks' changes
    threshold: float | None = None  # and, if given, below this absolute change
    keep: tuple[int | str, ...] = ("top",)  # stacks that never freeze (nor any above them); the head never does

    def to_dict(self) -> dict:
        return {
            "criterion": self.criterion,
            "every": self.every,
            "warmup": self.warmup,
            "percentile": self.percentile,
            "threshold": self.threshold,
            "keep": list(self.keep),
        }

    def steps(self, length: int) -> tuple[int, int]:
        """(steps between decisions, warm-up steps) in a phase of ``length`` steps."""
        return phase_steps(self.every, length), phase_steps(self.warmup, length)

    def first_decision(self, length: int) -> int | None:
        """Steps into a phase of ``length`` steps of the first decision that can freeze (two intervals and the warm-up
        behind it); None when the phase is too short for any."""
        every, warmup = self.steps(length)
        first = max(2, -(-warmup // every)) * every
        return first if first < length else None

    def check_length(self, length: int, path: str, name: str) -> list[str]:
        if self.first_decision(length) is not None:
            return []
        return [
            f"{path}.every: phase {name!r} has {length} steps at this run length, too few for a decision after the "
            "warm-up and two intervals; lower `every` or `warmup`, or lengthen the phase"
        ]

    def keep_positions(self, depth: int) -> frozenset[int]:
        return frozenset(depth - 1 if k == "top" else k for k in self.keep)

    def freezable(self, trainable: tuple[int, ...], depth: int) -> tuple[int, ...]:
        """The trainable positions that may freeze: those below the lowest ``keep`` stack, bottom → top."""
        lowest_keep = min(self.keep_positions(depth), default=depth)
        return tuple(p for p in sorted(trainable) if p < lowest_keep)


def parse_autofreeze(raw, path: str, problems: list[str]) -> AutoFreeze | None:
    """Validate a phase's ``autofreeze:`` mapping (``path``: ``schedule[i].autofreeze``); None when absent."""
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{path}: expected a mapping with keys among {', '.join(AUTOFREEZE_KEYS)} (or `true`)")
        return None
    for key in raw:
        if key not in AUTOFREEZE_KEYS:
            known = ", ".join(AUTOFREEZE_KEYS)
            problems.append(f"{path}.{key}: unknown autofreeze setting; known settings are {known}")
    values = {}
    criterion = raw.get("criterion", CRITERIA[0])
    if criterion not in CRITERIA:
        problems.append(f"{path}.criterion: {criterion!r} is not one of {CRITERIA}")
    values["criterion"] = criterion
    for key, default, zero_ok in (("every", DEFAULT_EVERY, False), ("warmup", DEFAULT_WARMUP, True)):
        value = raw.get(key, default)
        ok = (_is_int(value) and (value >= 1 or zero_ok and value == 0)) or (_is_number(value) and 0 < value < 1)
        if not ok:
            least = "a non-negative" if zero_ok else "a positive"
            problems.append(
                f"{path}.{key}: {value!r} is not {least} number of steps (an integer) or a fraction of the phase "
                "in (0, 1)"
            )
            value = default
        values[key] = value
    percentile = raw.get("percentile", DEFAULT_PERCENTILE)
    if not (_is_number(percentile) and 0 < percentile < 100):
        problems.append(f"{path}.percentile: {percentile!r} is not in (0, 100)")
        percentile = DEFAULT_PERCENTILE
    values["percentile"] = float(percentile)
    threshold = raw.get("threshold")
    if threshold is not None and not (_is_number(threshold) and 0 < threshold <= 1):
        problems.append(
            f"{path}.threshold: {threshold!r} is not in (0, 1] (a relative change of the gradient norm between "
            "two decisions, e.g. 0.05)"
        )
        threshold = None
    values["threshold"] = float(threshold) if threshold is not None else None
    keep = raw.get("keep", ["top"])
    keep = [keep] if _is_int(keep) or keep == "top" else keep
    if not (isinstance(keep, list) and keep and all((_is_int(k) and k >= 0) or k == "top" for k in keep)):
        problems.append(f"{path}.keep: {raw.get('keep')!r} is not a non-empty list of stack positions or `top`")
        keep = ["top"]
    values["keep"] = tuple(dict.fromkeys(keep))
    return AutoFreeze(**values)


def check_adapters(adapter: str, trunk: str, path: str) -> list[str]:
    """Adaptive freezing needs stacks that train through their own weights and no trunk adapter below the top."""
    if adapter != "lora" and trunk != "lora":
        return []
    which = "adapter: lora" if adapter == "lora" else "trunk: lora"
    return [
        f"{path}: the phase trains through LoRA (`{which}`); a stack below the top carrying a trainable adapter "
        "cannot leave backpropagation, so freezing cannot apply; use `adapter: full` and `trunk: frozen` in an "
        "autofreeze phase"
    ]


def check_phase(settings: AutoFreeze, trainable: tuple[int, ...], depth: int, path: str) -> list[str]:
    """What makes adaptive freezing impossible in one phase (``trainable``: its trainable rack positions)."""
    problems = []
    beyond = [k for k in settings.keep if _is_int(k) and k >= depth]
    if beyond:
        problems.append(f"{path}.keep: stack {beyond} is not active (the phase runs stacks 0..{depth - 1})")
    elif not settings.freezable(trainable, depth):
        problems.append(
            f"{path}.keep: the phase trains stacks {list(trainable)} and keeps {list(settings.keep)} (and every stack "
            "above a kept one) from freezing, so nothing could freeze; train more stacks (e.g. `train: all`) or keep "
            "fewer"
        )
    return problems


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def relative_changes(previous: dict[int, float], current: dict[int, float]) -> dict[int, float]:
    """``|n_k - n_{k-1}| / n_{k-1}`` per stack present in both intervals with a nonzero, finite previous norm."""
    return {
        p: abs(current[p] - previous[p]) / previous[p]
        for p in sorted(current)
        if p in previous and previous[p] > 0 and math.isfinite(previous[p]) and math.isfinite(current[p])
    }


@dataclass(frozen=True)
class Decision:
    """One freeze: at ``step`` (the first step the stacks no longer train), rack ``positions`` froze."""

    step: int
    positions: tuple[int, ...]
    changes: tuple[float, ...]  # the statistic of each frozen stack
    threshold: float

    def to_dict(self) -> dict:
        return {"step": self.step, "positions": list(self.positions), "changes": list(self.changes),
                "threshold": self.threshold}  # fmt: skip

    @classmethod
    def from_dict(cls, raw: dict) -> Decision:
        return cls(int(raw["step"]), tuple(raw["positions"]), tuple(raw["changes"]), float(raw["threshold"]))

    def describe(self) -> str:
        stacks = ", ".join(map(str, self.positions))
        changes = ", ".join(f"{c:.3g}" for c in self.changes)
        plural = "s" if len(self.positions) > 1 else ""
        return f"stack{plural} {stacks} froze at step {self.step}: grad-norm change {changes} < {self.threshold:.3g}"


def decide(
    settings: AutoFreeze, changes: dict[int, float], freezable: tuple[int, ...], frozen: int, step: int
) -> Decision | None:
    """The freeze a decision point takes: the leading run of ``freezable[frozen:]`` whose change is below the
    threshold (the ``percentile`` of every still-training stack's change, capped by ``threshold``); None if the
    lowest still-training freezable stack does not qualify."""
    if not changes:
        return None
    limit = percentile(list(changes.values()), settings.percentile)
    if settings.threshold is not None:
        limit = min(limit, settings.threshold)
    picked = []
    for position in freezable[frozen:]:
        change = changes.get(position)
        if change is None or not change < limit:
            break
        picked.append(position)
    if not picked:
        return None
    return Decision(step, tuple(picked), tuple(changes[p] for p in picked), limit)


@dataclass
class FreezeTracker:
    """The criterion's state inside one autofreeze phase: the current interval's sums of squared gradient norms,
    the previous interval's RMS norms and the decisions so far. Plain data: it goes into every checkpoint."""

    phase: int
    start: int  # the phase's first step
    end: int  # one past its last step
    sums: dict[int, float] = field(default_factory=dict)
    count: int = 0
    previous: dict[int, float] | None = None
    decisions: list[Decision] = field(default_factory=list)
    closed: int = -1  # the last decision step taken (each is taken once, whatever the gradient accumulation)

    def frozen_positions(self, step: int | None = None) -> tuple[int, ...]:
        """Rack positions frozen by decisions taken at or before ``step`` (all when None)."""
        return tuple(p for d in self.decisions if step is None or d.step <= step for p in d.positions)

    def observe(self, squares: dict[int, float]) -> None:
        """One optimizer step's squared gradient norm per trainable stack position."""
        if not all(math.isfinite(v) for v in squares.values()):
            return  # a non-finite step is not applied (see faults): it says nothing about convergence
        for position, value in squares.items():
            self.sums[position] = self.sums.get(position, 0.0) + value
        self.count += 1

    def is_decision_step(self, settings: AutoFreeze, step: int) -> bool:
        every, _ = settings.steps(self.end - self.start)
        return self.start < step < self.end and (step - self.start) % every == 0

    def step(self, settings: AutoFreeze, step: int, freezable: tuple[int, ...]) -> Decision | None:
        """At a decision step: close the interval and decide (from the end of warm-up on, with two intervals)."""
        if not self.is_decision_step(settings, step) or step <= self.closed:
            return None
        self.closed = step
        _, warmup = settings.steps(self.end - self.start)
        current = {p: math.sqrt(s / self.count) for p, s in self.sums.items()} if self.count else {}
        decision = None
        if self.previous is not None and step - self.start >= warmup:
            frozen = len(self.frozen_positions())
            decision = decide(settings, relative_changes(self.previous, current), freezable, frozen, step)
        if decision is not None:
            self.decisions.append(decision)
        self.previous = {p: v for p, v in current.items() if decision is None or p not in decision.positions}
        self.sums, self.count = {}, 0
        return decision

    def to_dict(self) -> dict:
        return {
            "phase": self.phase,
            "start": self.start,
            "end": self.end,
            "sums": [[p, v] for p, v in sorted(self.sums.items())],
            "count": self.count,
            "previous": None if self.previous is None else [[p, v] for p, v in sorted(self.previous.items())],
            "decisions": [d.to_dict() for d in self.decisions],
            "closed": self.closed,
        }

    @classmethod
    def from_dict(cls, raw: dict) -> FreezeTracker:
        previous = raw.get("previous")
        return cls(
            phase=int(raw["phase"]),
            start=int(raw["start"]),
            end=int(raw["end"]),
            sums={int(p): float(v) for p, v in raw.get("sums", [])},
            count=int(raw.get("count", 0)),
            previous=None if previous is None else {int(p): float(v) for p, v in previous},
            decisions=[Decision.from_dict(d) for d in raw.get("decisions", [])],
            closed=int(raw.get("closed", -1)),
        )
