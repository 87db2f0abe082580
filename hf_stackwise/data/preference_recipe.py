"""Static checks of ``data.task: dpo`` recipes (standard library only); the pairs themselves are checked in
:mod:`hf_stackwise.data.preference` before any weight loads."""

from __future__ import annotations


def check_preference_recipe(data: dict, schedule, problems: list[str]) -> None:
    """``data.task: dpo`` statically: pairs are whole rows (no per-phase length, tasks or mixtures)."""
    if data.get("task") != "dpo":
        if schedule is not None:
            for index, phase in enumerate(schedule.phases):
                if phase.task == "dpo":
                    problems.append(f"schedule[{index}].task: `dpo` reads preference pairs; set `data.task: dpo`")
        return
    if data.get("datasets"):
        problems.append("data.datasets: mixtures of preference sets are not supported; give `data.train`")
    if "text_column" in data:
        problems.append("data.text_column: `dpo` reads `prompt`, `chosen` and `rejected` columns; drop it")
    if schedule is None:
        return
    for index, phase in enumerate(schedule.phases):
        if phase.task not in (None, "dpo"):
            problems.append(f"schedule[{index}].task: {phase.task!r} in a `dpo` run; drop the phase's `task`")
        if phase.max_seq_length is not None:
            problems.append(
                f"schedule[{index}].max_seq_length: TRL cuts the pairs at `data.max_seq_length` once, when it "
                "tokenizes them; drop the per-phase length"
            )
        if phase.data is not None:
            problems.append(f"schedule[{index}].data: mixture weights need `data.datasets`; drop them")
