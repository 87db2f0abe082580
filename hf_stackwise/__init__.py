"""hf_stackwise: progressive, time-scheduled training for any Hugging Face model, inside one Trainer run."""

from .deferred import defer_bitsandbytes
from .schedule.phases import Phase, RecipeError, Schedule, StackwiseError

defer_bitsandbytes()  # before anything imports PEFT: bitsandbytes loads only when a 4-bit model needs it

__version__ = "0.1.0"

__all__ = [
    "Phase",
    "RecipeError",
    "Schedule",
    "StackwiseError",
    "StackwiseArguments",
    "StackwiseTrainer",
    "Rack",
    "__version__",
]


def __getattr__(name):
    # Heavy imports (torch, transformers) only when asked for.
    if name in ("StackwiseArguments", "StackwiseTrainer"):
        from . import trainer

        return getattr(trainer, name)
    if name == "Rack":
        from .rack.rack import Rack

        return Rack
    raise AttributeError(f"module 'hf_stackwise' has no attribute {name!r}")
