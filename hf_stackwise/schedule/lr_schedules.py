"""A phase's learning-rate shape, computed by transformers' own schedule functions.

Each phase's ``lr_schedule`` names one of transformers' step schedules (``linear``, ``cosine``,
``cosine_with_restarts``, ``polynomial``, ``constant``, ``inverse_sqrt``, ``cosine_with_min_lr``,
``warmup_stable_decay``, ...) or one of two additions, ``exponential`` (``gamma``) and ``step``
(``step_size``, ``gamma``). The phase is the schedule's whole run: ``num_training_steps`` is the phase's
length in steps and ``num_warmup_steps`` its ``warmup`` fraction in steps; ``lr_schedule_kwargs`` are
the schedule function's other arguments, as transformers names them. Absolute rates among them
(``min_lr``, ``lr_end``) are in the phase's ``learning_rate`` units.

The factor for a step comes from the ``LambdaLR`` that ``transformers.get_scheduler`` builds for a
one-parameter optimizer whose rate is the phase's: nothing of the shapes is re-written here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

# What transformers' schedules take from the phase itself; everything else is a phase's lr_schedule_kwargs.
FROM_PHASE = ("optimizer", "num_warmup_steps", "num_training_steps", "last_epoch")
ADDITIONS = {"exponential": ("gamma",), "step": ("step_size", "gamma")}
NOT_STEP_FUNCTIONS = {
    "reduce_lr_on_plateau": "it follows a metric, not the step, so a resumed run could not recompute it",
    "greedy": "it follows the loss, not the step, so a resumed run could not recompute it",
}


def _function(name: str):
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType

    return TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]


def schedule_names() -> tuple[str, ...]:
    """Every ``lr_schedule`` a phase accepts: transformers' step schedules plus the additions."""
    from transformers.trainer_utils import SchedulerType

    names = [s.value for s in SchedulerType if s.value not in NOT_STEP_FUNCTIONS]
    return tuple(names) + tuple(ADDITIONS)


def schedule_kwargs(name: str) -> dict[str, bool]:
    """The keyword arguments ``name`` takes from a phase, each mapped to whether it is required."""
    if name in ADDITIONS:
        return {key: key == "gamma" or key == "step_size" for key in ADDITIONS[name]}
    parameters = inspect.signature(_function(name)).parameters
    return {
        key: p.default is inspect.Parameter.empty
        for key, p in parameters.items()
        if key not in FROM_PHASE and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


def check_schedule(name, kwargs, path: str, problems: list[str]) -> None:
    """Validate a phase's ``lr_schedule`` and ``lr_schedule_kwargs`` (``path`` is the phase's key path)."""
    if name in NOT_STEP_FUNCTIONS:
        problems.append(
            f"{path}.lr_schedule: {name!r} cannot be a phase schedule: {NOT_STEP_FUNCTIONS[name]}; use a step "
            f"schedule such as `cosine` or `linear`"
        )
        return
    names = schedule_names()
    if name not in names:
        problems.append(f"{path}.lr_schedule: {name!r} is not one of {', '.join(names)}")
        return
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        problems.append(f"{path}.lr_schedule_kwargs: expected a mapping of {name!r}'s arguments, got {kwargs!r}")
        return
    accepted = schedule_kwargs(name)
    for key in kwargs:
        if key in FROM_PHASE:
            problems.append(
                f"{path}.lr_schedule_kwargs.{key}: set by the phase (its length and `warmup`), not a keyword"
            )
        elif key not in accepted:
            takes = ", ".join(accepted) or "no keyword arguments"
            problems.append(f"{path}.lr_schedule_kwargs.{key}: {name!r} takes {takes}")
    missing = [key for key, required in accepted.items() if required and key not in kwargs]
    if "min_lr" in accepted and "min_lr" not in kwargs and "min_lr_rate" not in kwargs:
        missing.append("min_lr (an absolute rate) or min_lr_rate (a fraction of the phase's rate)")
    if missing:
        problems.append(f"{path}.lr_schedule_kwargs: {name!r} needs {', '.join(missing)}")
    for key, value in kwargs.items():
        if key in accepted and not (isinstance(value, (int, float, str)) and not isinstance(value, bool)):
            problems.append(f"{path}.lr_schedule_kwargs.{key}: {value!r} is not a number or a name")
    if name in ADDITIONS:
        gamma = kwargs.get("gamma")
        if gamma is not None and not (_number(gamma) and gamma > 0):
            problems.append(f"{path}.lr_schedule_kwargs.gamma: {gamma!r} is not a positive number")
        size = kwargs.get("step_size")
        if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and size >= 1):
            problems.append(f"{path}.lr_schedule_kwargs.step_size: {size!r} is not a positive number of steps")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def phase_factor(name: str, kwargs: dict, warmup_steps: int, length: int, peak_lr: float) -> Callable[[int], float]:
    """``position in the phase → factor of the phase's learning rate`` (1.0 = the phase's ``learning_rate``)."""
    kwargs = dict(kwargs or {})
    if name in ADDITIONS:
        gamma = float(kwargs["gamma"])
        size = int(kwargs.get("step_size", 1))

        def decay(position: int) -> float:
            if position < warmup_steps:
                return position / max(1, warmup_steps)
            return gamma ** ((position - warmup_steps) // size)

        return decay

    import torch
    from transformers import get_scheduler

    if name == "constant" and warmup_steps:
        name = "constant_with_warmup"  # transformers' `constant` takes no warm-up
    # A one-parameter optimizer at the phase's rate: `min_lr` and friends are relative to it.
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak_lr if peak_lr > 0 else 1.0)
    accepted = inspect.signature(_function(name)).parameters
    scheduler = get_scheduler(
        name,
        dummy,
        num_warmup_steps=warmup_steps if "num_warmup_steps" in accepted else None,
        num_training_steps=length if "num_training_steps" in accepted else None,
        scheduler_specific_kwargs=kwargs,
    )
    (shape,) = scheduler.lr_lambdas
    return lambda position: float(shape(position))
