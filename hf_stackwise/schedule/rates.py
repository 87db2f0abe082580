"""A phase's rate fields (``learning_rate``, ``warmup``, ``lr_schedule`` + ``lr_schedule_kwargs``, ``weight_decay``,
``layer_lr_decay``), parsed and checked with the standard library only; schedules that take keyword arguments are
checked against transformers' own signatures in :mod:`hf_stackwise.schedule.lr_schedules`, imported only then."""

from __future__ import annotations

# transformers' step schedules (``transformers.SchedulerType`` less the metric-driven ones) plus two additions;
# hf_stackwise.schedule.lr_schedules computes them with transformers' own functions.
LR_SCHEDULES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "exponential",
    "step",
)
BASIC_LR_SCHEDULES = ("constant", "linear", "cosine")  # no keyword arguments needed


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_rate_fields(raw: dict, path: str, problems: list[str]) -> dict:
    """The phase's rate fields, with defaults; each problem names its key under ``path``."""
    values: dict = {}
    lr = raw.get("learning_rate")
    if lr is not None and not (_is_number(lr) and lr >= 0):
        problems.append(f"{path}.learning_rate: {lr!r} is not a non-negative number")
        lr = None
    values["learning_rate"] = None if lr is None else float(lr)

    warmup = raw.get("warmup", 0.0)
    if not (_is_number(warmup) and 0 <= warmup < 1):
        problems.append(f"{path}.warmup: {warmup!r} is not a fraction of the phase in [0, 1)")
        warmup = 0.0
    values["warmup"] = float(warmup)

    lr_schedule = raw.get("lr_schedule", "constant")
    lr_kwargs = raw.get("lr_schedule_kwargs")
    if isinstance(lr_schedule, str) and lr_schedule in ("reduce_lr_on_plateau", "greedy"):
        from .lr_schedules import check_schedule

        check_schedule(lr_schedule, None, path, problems)  # says why a metric-driven schedule is refused
        lr_schedule, lr_kwargs = "constant", None
    elif not isinstance(lr_schedule, str) or lr_schedule not in LR_SCHEDULES:
        known = ", ".join(LR_SCHEDULES)
        problems.append(f"{path}.lr_schedule: {lr_schedule!r} is not one of {known} (transformers' step schedules)")
        lr_schedule, lr_kwargs = "constant", None
    elif lr_schedule not in BASIC_LR_SCHEDULES or lr_kwargs is not None:
        from .lr_schedules import check_schedule  # reads transformers' signatures; plain schedules need none

        before = len(problems)
        check_schedule(lr_schedule, lr_kwargs, path, problems)
        if len(problems) > before:
            lr_schedule, lr_kwargs = "constant", None
    values["lr_schedule"] = lr_schedule
    values["lr_schedule_kwargs"] = dict(lr_kwargs) if lr_kwargs else None

    wd = raw.get("weight_decay")
    if wd is not None and not (_is_number(wd) and wd >= 0):
        problems.append(f"{path}.weight_decay: {wd!r} is not a non-negative number")
        wd = None
    values["weight_decay"] = None if wd is None else float(wd)

    decay = raw.get("layer_lr_decay", 1.0)
    if not (_is_number(decay) and decay > 0):
        problems.append(f"{path}.layer_lr_decay: {decay!r} is not a positive number (1.0 = no decay)")
        decay = 1.0
    values["layer_lr_decay"] = float(decay)
    return values


def phase_step_kwargs(kwargs: dict | None, length: int) -> dict:
    """A phase's ``lr_schedule_kwargs`` with step counts given as fractions of the phase (``num_decay_steps: 0.2``,
    any ``num_*_steps`` in (0, 1)) turned into steps of a phase ``length`` steps long."""
    out = dict(kwargs or {})
    for key, value in out.items():
        if key.startswith("num_") and key.endswith("_steps") and isinstance(value, float) and 0 < value < 1:
            out[key] = max(1, round(value * length))
    return out
