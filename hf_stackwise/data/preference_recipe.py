"""Static checks of ``data.task: dpo`` / ``kto`` recipes (standard library only); the pairs themselves are checked in
:mod:`hf_stackwise.data.preference` before any weight loads."""

from __future__ import annotations


def check_preference_recipe(data: dict, schedule, problems: list[str]) -> None:
    """``data.task: dpo`` / ``kto`` statically: pairs are whole rows (no per-phase length, tasks or mixtures)."""
    task = data.get("task")
    if task not in ("dpo", "kto"):
        if schedule is not None:
            for index, phase in enumerate(schedule.phases):
                if phase.task in ("dpo", "kto"):
                    problems.append(
                        f"schedule[{index}].task: `{phase.task}` reads preference data; set `data.task: {phase.task}`"
                    )
        return
    if data.get("datasets"):
        problems.append("data.datasets: mixtures of preference sets are not supported; give `data.train`")
    if "text_column" in data:
        problems.append(f"data.text_column: `{task}` reads `prompt`, `chosen` and `rejected` columns; drop it")
    if schedule is None:
        return
    for index, phase in enumerate(schedule.phases):
        if phase.task not in (None, task):
            problems.append(f"schedule[{index}].task: {phase.task!r} in a `{task}` run; drop the phase's `task`")
        if phase.max_seq_length is not None:
            problems.append(
                f"schedule[{index}].max_seq_length: TRL cuts the pairs at `data.max_seq_length` once, when it "
                "tokenizes them; drop the per-phase length"
            )
        if phase.data is not None:
            problems.append(f"schedule[{index}].data: mixture weights need `data.datasets`; drop them")
