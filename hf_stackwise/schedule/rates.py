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


def shape_factor(cache: dict, key, shape, bounds: tuple[int, int], step: int, peak: float) -> float:
    """The factor at ``step`` of a rate ``shape`` (a phase, or a generator span's dict: ``warmup``, ``lr_schedule``,
    ``lr_schedule_kwargs``) run over the steps ``bounds = [start, end)``; the shape function is kept in ``cache``."""
    start, end = bounds
    length = end - start
    if key not in cache:
        from .lr_schedules import phase_factor

        get = shape.get if isinstance(shape, dict) else lambda name: getattr(shape, name)
        warmup_steps = min(round(get("warmup") * length), length - 1)  # always leave a step at full rate
        kwargs = phase_step_kwargs(get("lr_schedule_kwargs"), length)
        cache[key] = phase_factor(get("lr_schedule"), kwargs, warmup_steps, length, peak)
    return cache[key](min(step, end - 1) - start)


def lr_shape_problems(resolved) -> list[str]:
    """Problems of a resolved schedule's rate shapes with ``lr_schedule_kwargs`` (each phase's, each generator
    span's): step counts longer than the shape, or a factor that is negative or not finite at this run length."""
    problems = []
    shapes = {}  # one entry per phase and per generator span
    for index, phase in enumerate(resolved.schedule.phases):
        shapes[("phase", index)] = (phase.lr_schedule, phase.lr_schedule_kwargs, resolved.bounds[index], index)
        span = resolved.span_bounds(index)
        if span is not None:
            shapes.setdefault(
                ("span", span), (phase.span["lr_schedule"], phase.span["lr_schedule_kwargs"], span, index)
            )
    for (kind, _), (name, kwargs, (start, end), index) in shapes.items():
        if not kwargs:
            continue
        path = resolved.schedule.key_path(index)
        what = "phase" if kind == "phase" else "entry's span"
        kwargs = phase_step_kwargs(kwargs, end - start)
        long = [k for k, v in kwargs.items() if k.startswith("num_") and k.endswith("_steps") and v > end - start]
        if long:
            problems.append(
                f"{path}.lr_schedule_kwargs.{long[0]}: {kwargs[long[0]]} steps, but the {what} has "
                f"{end - start} at this run length; give fewer steps or a fraction (e.g. 0.2)"
            )
            continue
        probes = sorted({start, (start + end) // 2, end - 1, *range(start, min(end, start + 3))})
        try:
            factors = [resolved.lr_factor(step) for step in probes]
        except (ValueError, TypeError, ZeroDivisionError) as err:
            problems.append(f"{path}.lr_schedule_kwargs: {err}")
            continue
        bad = [f for f in factors if not (f >= 0 and f < float("inf"))]
        if bad:
            problems.append(
                f"{path}.lr_schedule_kwargs: {name!r} gives a rate factor of {bad[0]} over this {what}'s "
                f"{end - start} steps; check that step counts fit it"
            )
    return list(dict.fromkeys(problems))
