"""Static checks of ``data.task: sft`` recipes (standard library only): the SFT keys of ``data:`` and the
phases' tasks. The data itself is checked in :mod:`hf_stackwise.data.sft` before any weight loads."""

from __future__ import annotations

LOSS_ON = ("completion", "all")  # loss on the assistant turns / completions only, or on every token but padding
SFT_KEYS = ("chat_template", "loss_on", "packing")


def check_sft_recipe(data: dict, schedule, problems: list[str]) -> None:
    """The SFT keys of ``data:`` and the phases' tasks, checked statically."""
    task = data.get("task", "clm")
    given = [key for key in SFT_KEYS if key in data]
    if task != "sft":
        problems.extend(f"data.{key}: only used by `data.task: sft` (this recipe trains {task!r})" for key in given)
        if schedule is not None:
            for index, phase in enumerate(schedule.phases):
                if phase.task == "sft":
                    problems.append(
                        f"schedule[{index}].task: `sft` reads conversations, but `data.task` is {task!r}; set "
                        "`data.task: sft` so the data is loaded as chat / prompt-completion rows"
                    )
        return
    if data.get("loss_on", "completion") not in LOSS_ON:
        problems.append(f"data.loss_on: {data.get('loss_on')!r} is not one of {LOSS_ON}")
    if not isinstance(data.get("packing", False), bool):
        problems.append(f"data.packing: {data.get('packing')!r} is not true or false")
    template = data.get("chat_template")
    if template is not None and not (isinstance(template, str) and template.strip()):
        problems.append(f"data.chat_template: {template!r} is not a Jinja template or the path of one")
    if "text_column" in data:
        problems.append("data.text_column: `sft` reads `messages` or `prompt` + `completion` columns; drop it")
    if schedule is None:
        return
    for index, phase in enumerate(schedule.phases):
        if phase.task not in (None, "sft"):
            problems.append(
                f"schedule[{index}].task: {phase.task!r} in an `sft` run; the rows are conversations, not text "
                "chunks; drop the phase's `task`"
            )
        if data.get("packing") and phase.max_seq_length is not None:
            problems.append(
                f"schedule[{index}].max_seq_length: packed rows are cut at `data.max_seq_length` once, before "
                "training; drop the per-phase length or set `data.packing: false`"
            )
