"""The recipe's ``callbacks:`` section: transformers callbacks the run adds, checked statically (standard library
only until :func:`build_callbacks`).

``early_stopping: {patience, threshold, metric}`` becomes transformers' ``EarlyStoppingCallback`` with the
``TrainingArguments`` it needs (``metric_for_best_model``, ``greater_is_better``, ``load_best_model_at_end`` and
checkpoints saved at the evals). In a schedule, stopping ends the run: later phases do not run, and the model
saved at the end (and exported) is the best checkpoint's, run as the phase that produced it.
"""

from __future__ import annotations

from ..data.labels import METRICS as CLASSIFICATION_METRICS
from ..schedule.data_fields import MASKED_TASKS

CALLBACK_KEYS = ("early_stopping",)
EARLY_STOPPING_KEYS = ("patience", "threshold", "metric")
# eval metrics each task produces (without the `eval_` prefix); a masked run (any mlm / diffusion phase) reports
# masked_accuracy, a causal LM perplexity
TASK_METRICS = {
    "clm": ("loss", "perplexity"),
    "masked": ("loss", "masked_accuracy"),
    "classification": CLASSIFICATION_METRICS,
    "dpo": ("loss", "rewards/accuracies", "rewards/margins"),  # TRL's held-out preference metrics
    "kto": ("loss", "kl"),  # TRL's KTO logs sums per batch; its held-out loss and KL estimate compare across evals
}
LOWER_IS_BETTER = ("loss", "perplexity")
# TrainingArguments early stopping sets; the recipe does not set them itself
OWNED = ("load_best_model_at_end", "metric_for_best_model", "greater_is_better")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


ROW_TASKS = ("classification", "sft")  # the rows (labelled texts, conversations) fix the task of every phase


def run_metrics(data: dict, schedule) -> tuple[str, tuple[str, ...]]:
    """The run's task (as named in messages) and the eval metrics it produces."""
    task = data.get("task", "clm")
    phase_tasks = {p.task or task for p in schedule.phases} if schedule is not None else {task}
    if task in ROW_TASKS:  # its rows fix the task in every phase; a phase `task` there is refused on its own
        phase_tasks = {task}
    if phase_tasks & set(MASKED_TASKS):
        return "mlm / diffusion", TASK_METRICS["masked"]
    return task, TASK_METRICS.get(task, ("loss",))


def check_callbacks(section, data: dict, schedule, training: dict, problems: list[str]) -> dict:
    """Validate ``callbacks:`` against the task, the eval set and the training section; returns it (or {})."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        problems.append(f"callbacks: expected a mapping with keys among {', '.join(CALLBACK_KEYS)}")
        return {}
    for key in section:
        if key not in CALLBACK_KEYS:
            problems.append(f"callbacks.{key}: unknown callback; known callbacks are {', '.join(CALLBACK_KEYS)}")
    stopping = section.get("early_stopping")
    if stopping is None:
        return section
    path = "callbacks.early_stopping"
    if not isinstance(stopping, dict):
        problems.append(f"{path}: expected a mapping like {{patience: 2, threshold: 0.0, metric: loss}}")
        return section
    for key in stopping:
        if key not in EARLY_STOPPING_KEYS:
            problems.append(f"{path}.{key}: unknown setting; known settings are {', '.join(EARLY_STOPPING_KEYS)}")
    patience = stopping.get("patience")
    if not (isinstance(patience, int) and not isinstance(patience, bool) and patience >= 1):
        problems.append(f"{path}.patience: {patience!r} is not a positive integer (evals without improvement)")
    threshold = stopping.get("threshold", 0.0)
    if not (_is_number(threshold) and threshold >= 0):
        problems.append(f"{path}.threshold: {threshold!r} is not a non-negative number (the least improvement)")
    task, metrics = run_metrics(data, schedule)
    metric = stopping.get("metric", "loss")
    if not isinstance(metric, str) or metric.removeprefix("eval_") not in metrics:
        problems.append(f"{path}.metric: {metric!r} is not an eval metric of a `{task}` run; use one of {metrics}")
    if data.get("eval") is None and not data.get("eval_fraction"):
        problems.append(
            f"{path}: early stopping watches an eval metric, and the recipe has no eval set; give "
            "`data.eval` or `data.eval_fraction`"
        )
    evaluate = training.get("eval_strategy", "no")
    if evaluate in ("no", False, None):
        problems.append(
            f"{path}: needs evals during training; set `training.eval_strategy: steps` (with `eval_steps`) or `epoch`"
        )
    else:
        save = training.get("save_strategy")
        if save not in (None, evaluate, "best"):
            problems.append(
                f"training.save_strategy: {save!r}, but early stopping reloads the best checkpoint, so checkpoints "
                f"are saved at the evals: set it to {evaluate!r} (or leave it out)"
            )
        every, save_every = training.get("eval_steps"), training.get("save_steps")
        if evaluate == "steps" and isinstance(every, int) and isinstance(save_every, int) and save_every % every:
            problems.append(
                f"training.save_steps: {save_every} is not a multiple of `eval_steps` ({every}); early stopping "
                "reloads the best eval's checkpoint, so save at the evals (leave `save_steps` out)"
            )
    for key in OWNED:
        if key in training:
            problems.append(f"training.{key}: set by `callbacks.early_stopping`; drop it from `training`")
    return section


def training_arguments(callbacks: dict, training: dict) -> dict:
    """The ``TrainingArguments`` values the callbacks need (none without early stopping)."""
    stopping = (callbacks or {}).get("early_stopping")
    if not stopping:
        return {}
    metric = stopping.get("metric", "loss").removeprefix("eval_")
    values = {
        "load_best_model_at_end": True,
        "metric_for_best_model": metric,
        "greater_is_better": metric not in LOWER_IS_BETTER,
    }
    if training.get("save_strategy") is None:
        values["save_strategy"] = training["eval_strategy"]
        every = training.get("eval_steps", training.get("logging_steps"))
        if training["eval_strategy"] == "steps" and every is not None and "save_steps" not in training:
            values["save_steps"] = every
    return values


def build_callbacks(callbacks: dict) -> list:
    """The transformers callbacks of the recipe's ``callbacks:`` section."""
    stopping = (callbacks or {}).get("early_stopping")
    if not stopping:
        return []
    from transformers import EarlyStoppingCallback

    return [
        EarlyStoppingCallback(
            early_stopping_patience=stopping["patience"], early_stopping_threshold=float(stopping.get("threshold", 0))
        )
    ]
