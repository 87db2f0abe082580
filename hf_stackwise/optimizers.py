"""The optimizers a user brings: ``optimizer_cls_and_kwargs`` is used, a ready optimizer or scheduler is refused.

``StackwiseTrainer`` builds one optimizer over every parameter the schedule ever trains, with one parameter
group per unit (and weight-decay class), whose learning rates one ``LambdaLR`` sets phase by phase. So it
takes the optimizer's *class and keyword arguments* — the Trainer's ``optimizer_cls_and_kwargs`` — and builds
those groups with them; the learning rate and weight decay come from ``learning_rate`` / ``weight_decay`` and
the schedule. An optimizer or scheduler built beforehand (``optimizers=(opt, sched)``) cannot be re-grouped
faithfully, so it is refused with the equivalent ``optimizer_cls_and_kwargs`` spelled out.

Optimizers with train/eval *modes* (schedule-free AdamW/SGD/RAdam: ``optimizer.train()`` / ``.eval()``) are
refused too: switching mode rewrites every parameter it holds state for (between the interpolated point ``y``
the gradients are taken at and the average ``x`` that is evaluated and saved), so a frozen stack would not stay
bit-frozen across an eval or a save, the activation cache would replay stale prefixes, and a phase's
``optimizer_state: reset | release_idle`` would drop the ``z`` sequence the weights are defined by. They also
set their own step-size averaging, which phase learning-rate schedules would fight.
"""

from __future__ import annotations

import inspect

import torch
from transformers.trainer_optimizer import is_optimizer_factory

from .errors import RecipeError

OWN_GROUPS_KEYS = {"params", "model", "optimizer_dict"}  # kwargs of optimizers that bring their own groups
SCHEDULE_KEYS = {"lr": "learning_rate", "weight_decay": "weight_decay"}
MODE_SWITCHING_NAMES = ("schedule_free",)  # transformers' `optim: schedule_free_adamw | _sgd | _radam`
MODE_SWITCHING_WHY = (
    "switching modes rewrites every parameter it holds state for (between the point gradients are taken at and the "
    "averaged weights that are evaluated and saved), so a stack frozen after it trained would not stay bit-frozen "
    "across evals and saves, and a phase's `optimizer_state` reset or release would lose the state the weights are "
    "defined by: a phase schedule cannot drive it exactly. Use adamw_torch (with each phase's `warmup` and "
    "`lr_schedule`) instead"
)


def mode_switching_problem(optimizer, where: str) -> str | None:
    """Why ``optimizer`` (a ``training.optim`` name or an optimizer class) cannot run a phase schedule, if it has
    train/eval modes; None otherwise."""
    name = str(getattr(optimizer, "value", optimizer))
    if isinstance(optimizer, str) or hasattr(optimizer, "value"):
        if name.startswith(MODE_SWITCHING_NAMES):
            return f"{where}: {name!r} is a schedule-free optimizer with train/eval modes, and {MODE_SWITCHING_WHY}"
        return None
    switches = callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))
    label = getattr(optimizer, "__name__", name)
    return f"{where}: {label} has optimizer.train()/eval() modes, and {MODE_SWITCHING_WHY}" if switches else None


def check_user_optimizers(optimizers, cls_and_kwargs, args) -> None:
    """Refuse what the schedule cannot drive, before anything loads; see the module docstring."""
    optimizer, scheduler = optimizers if optimizers is not None else (None, None)
    problem = mode_switching_problem(args.optim, "training.optim")
    if problem is None and optimizer is not None:
        problem = mode_switching_problem(type(optimizer), "optimizers")
    if problem is not None:
        raise RecipeError(problem)
    if optimizer is not None:
        suggestion = f"optimizer_cls_and_kwargs=({class_path(type(optimizer))}, {equivalent_kwargs(optimizer)!r})"
        raise ValueError(
            "optimizers: StackwiseTrainer builds its own optimizer (one parameter group per unit over every "
            "parameter the schedule ever trains, with per-phase learning rates), so it cannot use one built "
            f"beforehand{' nor a scheduler' if scheduler is not None else ''}; pass the class and its arguments "
            f"instead: `{suggestion}` (learning rate and weight decay come from `learning_rate`, `weight_decay` "
            "and the schedule)"
        )
    if scheduler is not None:
        raise ValueError(
            "optimizers: StackwiseTrainer builds its own learning-rate scheduler from the schedule; drop the "
            "scheduler and set each phase's `learning_rate`, `warmup` and `lr_schedule` instead"
        )
    if cls_and_kwargs is not None:
        _, kwargs = check_cls_and_kwargs(cls_and_kwargs, "optimizer_cls_and_kwargs")
        for key, field in SCHEDULE_KEYS.items():
            if key in kwargs and kwargs[key] != getattr(args, field):
                raise ValueError(
                    f"optimizer_cls_and_kwargs: {key}={kwargs[key]!r} would be ignored: the schedule sets each "
                    f"group's {key} from `{field}` ({getattr(args, field)!r}) and the phases; set `{field}` (or a "
                    f"phase's) instead and drop {key!r} from the kwargs"
                )


def check_cls_and_kwargs(cls_and_kwargs, where: str) -> tuple[type, dict]:
    """``(optimizer class, kwargs)`` the per-unit groups can be built with; raises naming ``where`` otherwise."""
    if not (isinstance(cls_and_kwargs, tuple | list) and len(cls_and_kwargs) == 2):
        raise ValueError(f"{where}: expected (optimizer class, dict of keyword arguments), got {cls_and_kwargs!r}")
    cls, kwargs = cls_and_kwargs
    if not callable(cls) or not isinstance(kwargs, dict):
        raise ValueError(f"{where}: expected (optimizer class, dict of keyword arguments), got {cls_and_kwargs!r}")
    problem = mode_switching_problem(cls, where)
    if problem is not None:
        raise RecipeError(problem)
    if is_optimizer_factory(cls) or OWN_GROUPS_KEYS & set(kwargs):
        raise RecipeError(
            f"{where}: {getattr(cls, '__name__', cls)!s} builds its own parameter groups, which a phase schedule "
            "cannot drive; use an AdamW variant, SGD, Adafactor, RMSprop, Lion or another standard optimizer"
        )
    return cls, dict(kwargs)


def class_path(cls: type) -> str:
    """``torch.optim.SGD`` for torch's optimizers, else ``module.QualName``."""
    if getattr(torch.optim, cls.__name__, None) is cls:
        return f"torch.optim.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def equivalent_kwargs(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's hyperparameters that differ from its class's defaults (learning rate and weight decay aside)."""
    try:
        defaults = {
            name: p.default
            for name, p in inspect.signature(type(optimizer).__init__).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
    except (TypeError, ValueError):
        defaults = {}
    return {
        key: value
        for key, value in getattr(optimizer, "defaults", {}).items()
        if key not in SCHEDULE_KEYS and key in defaults and not _same(value, defaults[key])
    }


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):  # e.g. tensors
        return False


def release_idle_state(optimizer, units) -> int:
    """Free the state of every parameter group none of whose units trains (``optimizer_state: release_idle``).

    Returns the number of state tensors freed; a freed unit starts afresh when it trains again."""
    freed = 0
    for group in optimizer.param_groups:
        if not any(unit in units for unit in group["stackwise_units"]):
            for param in group["params"]:
                freed += sum(torch.is_tensor(v) for v in optimizer.state.pop(param, {}).values())
    return freed


def check_release_idle(schedule, optimizer_cls, kwargs: dict, where: str) -> None:
    """``release_idle`` needs an optimizer that keeps per-parameter state (SGD without momentum keeps none)."""
    phases = [i for i, phase in enumerate(schedule.phases) if phase.optimizer_state == "release_idle"]
    if phases and not keeps_state(optimizer_cls, kwargs):
        raise RecipeError(
            f"{schedule.key_path(phases[0], 'optimizer_state')}: `release_idle` frees the optimizer state of the "
            f"units a phase does not train, but {where} keeps no per-parameter state (e.g. SGD without momentum); "
            "use `keep`, or an optimizer with state (adamw_torch, or sgd with `optim_args: momentum=0.9`)"
        )


def keeps_state(optimizer_cls, kwargs: dict) -> bool:
    """Whether one step of the optimizer on a two-element parameter leaves per-parameter state."""
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.ones(2)
    try:
        optimizer = optimizer_cls([{"params": [param], "lr": 1e-3}], **{k: v for k, v in kwargs.items() if k != "lr"})
        optimizer.step()
    except Exception:  # noqa: BLE001  (cannot probe here, e.g. an accelerator-only optimizer: assume it keeps state)
        return True
    return bool(optimizer.state)
