"""The data plane over time: which task, row length, mask rate and mixture weights hold at step k.

Standard library only. Like the rack state, the data state at step k is a pure function of
(recipe, k): :meth:`DataPlane.state_at` reads it off the resolved schedule. The tensors are changed
elsewhere (:mod:`hf_stackwise.data.masking`, in the trainer's training step; :mod:`hf_stackwise.data.mixture`,
by position in the sample stream).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..schedule.phases import MASKED_TASKS, ResolvedSchedule, Schedule

DEFAULT_MAX_SEQ_LENGTH = 512
DEFAULT_MASK_RATE = 0.15
DEFAULT_MASK_SPLIT = (0.8, 0.1, 0.1)  # of the chosen positions: [MASK], a random token, unchanged (BERT)


def ramp(start: float, end: float, progress: float, shape: str = "linear") -> float:
    """Value of a ``start → end`` ramp at ``progress`` in [0, 1] (clamped); ``linear`` or ``cosine``."""
    progress = min(max(progress, 0.0), 1.0)
    if shape == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    return start + (end - start) * progress


@dataclass(frozen=True)
class DataState:
    """What the data plane does at one step."""

    task: str
    max_seq_length: int
    mask_rate: float | None  # None for clm
    mixture: dict[str, float] | None  # normalized weights, None without `data.datasets`


@dataclass(frozen=True)
class DataPlane:
    """The recipe's data settings the training step needs; plain values so they travel in TrainingArguments."""

    task: str = "clm"
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH
    mask_rate: float | tuple[float, float] = DEFAULT_MASK_RATE
    mask_split: tuple[float, float, float] = DEFAULT_MASK_SPLIT
    eval_mask_rate: float = DEFAULT_MASK_RATE
    diffusion_min_rate: float = 0.0
    diffusion_weighting: bool = False
    datasets: tuple[str, ...] = field(default=())  # names of the mixture's sources, in declaration order

    @classmethod
    def from_data(cls, data: dict) -> DataPlane:
        """From a (validated) recipe ``data:`` section."""
        rate = data.get("mask_rate", DEFAULT_MASK_RATE)
        return cls(
            task=data.get("task", "clm"),
            max_seq_length=data.get("max_seq_length", DEFAULT_MAX_SEQ_LENGTH),
            mask_rate=tuple(rate) if isinstance(rate, list) else rate,
            mask_split=tuple(data.get("mask_split", DEFAULT_MASK_SPLIT)),
            eval_mask_rate=data.get("eval_mask_rate", DEFAULT_MASK_RATE),
            diffusion_min_rate=data.get("diffusion_min_rate", 0.0),
            diffusion_weighting=data.get("diffusion_weighting", False),
            datasets=tuple(data.get("datasets") or ()),
        )

    @classmethod
    def from_dict(cls, values: dict) -> DataPlane:
        """Inverse of :meth:`to_dict`."""
        return cls.from_data(values)

    def to_dict(self) -> dict:
        values = asdict(self)
        for key in ("mask_rate", "mask_split", "datasets"):
            if isinstance(values[key], tuple):
                values[key] = list(values[key])
        return values

    # ---- per phase ----------------------------------------------------------------------------

    def phase_task(self, phase) -> str:
        return phase.task or self.task

    def phase_length(self, phase) -> int:
        return phase.max_seq_length or self.max_seq_length

    def tasks(self, schedule: Schedule) -> set[str]:
        return {self.phase_task(p) for p in schedule.phases}

    def masked(self, schedule: Schedule) -> bool:
        """Whether the run trains a masked LM (``mlm`` / ``diffusion``) rather than a causal LM."""
        return bool(self.tasks(schedule) & set(MASKED_TASKS))

    def chunk_length(self, schedule: Schedule) -> int:
        """Tokens per stored row: the longest length any phase uses (shorter phases split rows)."""
        return max(self.phase_length(p) for p in schedule.phases)

    def mixture_weights(self, phase) -> dict[str, float] | None:
        """The phase's normalized mixture weights (uniform over the sources when the phase names none)."""
        if not self.datasets:
            return None
        raw = phase.data or dict.fromkeys(self.datasets, 1.0)
        total = sum(raw.get(name, 0.0) for name in self.datasets)
        return {name: raw.get(name, 0.0) / total for name in self.datasets}

    # ---- per step -----------------------------------------------------------------------------

    def state_at(self, resolved: ResolvedSchedule, step: int) -> DataState:
        index = resolved.phase_index(step)
        phase = resolved.schedule.phases[index]
        task = self.phase_task(phase)
        rate = None
        if task in MASKED_TASKS:
            spec = phase.mask_rate if phase.mask_rate is not None else self.mask_rate
            if isinstance(spec, tuple):
                start, end = resolved.bounds[index]
                progress = (step - start) / max(1, end - start - 1)  # first step: start value, last step: end
                rate = ramp(spec[0], spec[1], progress, phase.mask_schedule)
            else:
                rate = spec
        return DataState(task, self.phase_length(phase), rate, self.mixture_weights(phase))


def check_data_plane(data: dict, schedule: Schedule | None, problems: list[str]) -> None:
    """Static checks of the data-plane keys of ``data:`` and of the phases' data fields against them."""
    rate = data.get("mask_rate")
    if rate is not None and not _rate_or_ramp(rate):
        problems.append(
            f"data.mask_rate: {rate!r} is not a rate in (0, 1) or a `[start, end]` ramp of two such rates "
            "(a data-level ramp runs over each phase that gives no `mask_rate`)"
        )
    eval_rate = data.get("eval_mask_rate")
    if eval_rate is not None and not _is_rate(eval_rate):
        problems.append(f"data.eval_mask_rate: {eval_rate!r} is not a rate in (0, 1)")
    split = data.get("mask_split")
    if split is not None and not (
        isinstance(split, list)
        and len(split) == 3
        and all(_is_number(x) and x >= 0 for x in split)
        and abs(sum(split) - 1) < 1e-6
    ):
        problems.append(
            f"data.mask_split: {split!r} is not three non-negative fractions summing to 1 "
            "([mask token, random token, unchanged], default [0.8, 0.1, 0.1])"
        )
    low = data.get("diffusion_min_rate")
    if low is not None and not (_is_number(low) and 0 <= low < 1):
        problems.append(f"data.diffusion_min_rate: {low!r} is not a rate in [0, 1)")
        low = None
    if not isinstance(data.get("diffusion_weighting", False), bool):
        problems.append(f"data.diffusion_weighting: {data['diffusion_weighting']!r} is not true or false")
    sources = data.get("datasets")
    if sources is not None and not (isinstance(sources, dict) and sources):
        problems.append("data.datasets: expected a mapping of names to `datasets.load_dataset` arguments")
        sources = None
    if schedule is None:
        return
    default_task = data.get("task", "clm")
    tasks = set()
    for index, phase in enumerate(schedule.phases):
        path = f"schedule[{index}]"
        task = phase.task or default_task
        tasks.add(task)
        if task not in MASKED_TASKS and phase.mask_rate is not None:
            problems.append(f"{path}.mask_rate: phase {phase.name!r} trains `{task}`, which masks nothing; drop it")
        rates = phase.mask_rate if phase.mask_rate is not None else rate
        if task == "diffusion" and low is not None and _rate_or_ramp(rates) and min(_as_list(rates)) <= low:
            problems.append(
                f"{path}.mask_rate: the diffusion rate is drawn from [data.diffusion_min_rate, mask_rate] = "
                f"[{low}, {min(_as_list(rates))}]; raise `mask_rate` above {low}"
            )
        if phase.data is not None:
            if sources is None:
                problems.append(
                    f"{path}.data: mixture weights need named datasets in `data.datasets` "
                    "(e.g. `datasets: {general: {path: text, data_files: general.txt}, domain: {...}}`)"
                )
            else:
                unknown = [name for name in phase.data if name not in sources]
                if unknown:
                    problems.append(
                        f"{path}.data: {unknown} not declared in `data.datasets` (declared: {', '.join(sources)})"
                    )
    if "clm" in tasks and tasks & set(MASKED_TASKS):
        problems.append(
            f"schedule: phases mix `clm` with {sorted(tasks & set(MASKED_TASKS))}; one model cannot be both a "
            "causal and a masked LM; keep `clm` alone or use only `mlm` / `diffusion`"
        )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_rate(value) -> bool:
    return _is_number(value) and 0 < value < 1


def _rate_or_ramp(value) -> bool:
    if isinstance(value, (list, tuple)):
        return len(value) == 2 and all(_is_rate(v) for v in value)
    return _is_rate(value)


def _as_list(value) -> list[float]:
    return list(value) if isinstance(value, (list, tuple)) else [value]
