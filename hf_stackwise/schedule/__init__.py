"""The schedule: phases over normalized time t and what each phase sets — trainable stacks, growth layouts,
learning rates and LR schedules, data fields — plus the generators (``cycle``, ``sample``) that expand into phases.

Standard library only (transformers is read inside functions that check its schedulers), so a schedule is checked
in milliseconds. May import: errors.
"""

from .phases import Phase, ResolvedSchedule, Schedule

__all__ = ["Phase", "ResolvedSchedule", "Schedule"]
