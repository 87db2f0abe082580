"""The classification task's recipe side, standard library only: its static checks and its eval metrics.

The data, the label set and the metrics themselves are in :mod:`hf_stackwise.data.classification`.
"""

from __future__ import annotations

TASK = "classification"
METRICS = ("loss", "accuracy", "f1", "precision", "recall")  # what each eval reports (eval_ prefixed)
KEYS = ("label_column", "text_pair_column", "padding")  # data keys only a classification run reads
PADDING = ("longest", "max_length")  # a batch padded to its longest row (default), or every row to max_seq_length
CONFUSION_NAME = "confusion.json"  # beside the logs: every eval's confusion matrix (rows: true, columns: predicted)


def check_recipe(data: dict, schedule, problems: list[str]) -> None:
    """Static checks of a classification recipe: keys that only fit it, and phase fields that do not."""
    task = data.get("task", "clm")
    for key in KEYS:
        value = data.get(key)
        if value is not None and task != TASK:
            problems.append(f"data.{key}: only `data.task: classification` reads labels; drop it or set the task")
        elif key == "padding" and value is not None and value not in PADDING:
            problems.append(
                f"data.padding: {value!r} is not one of {', '.join(PADDING)} (`max_length` pads every row to "
                "`data.max_seq_length`, so a row's inputs are the same at every visit and the activation cache can "
                "replay it)"
            )
        elif key != "padding" and value is not None and not (isinstance(value, str) and value):
            problems.append(f"data.{key}: {value!r} is not a column name")
    if task != TASK:
        for index, phase in enumerate(schedule.phases if schedule is not None else ()):
            if phase.task == TASK:
                problems.append(
                    f"schedule[{index}].task: `classification` is a whole run's task (a new model class); set "
                    "`data.task: classification` instead"
                )
        return
    if data.get("datasets"):
        problems.append(
            "data.datasets: a mixture streams language-model chunks; a classification run reads one labelled "
            "`data.train` (and `data.eval`)"
        )
    for index, phase in enumerate(schedule.phases if schedule is not None else ()):
        for key in ("task", "max_seq_length"):
            if getattr(phase, key) is not None and not (key == "task" and phase.task == TASK):
                problems.append(
                    f"schedule[{index}].{key}: a classification run keeps its task and its rows (whole texts cut at "
                    f"`data.max_seq_length`) in every phase; drop `{key}` from phase {phase.name!r}"
                )
