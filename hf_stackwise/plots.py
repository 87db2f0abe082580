"""PNG plots of a run: the schedule as a timeline over t, and train/eval loss coloured by phase.

Reads only JSON a run leaves behind (``stackwise_run.json`` and the Trainer's ``trainer_state.json``);
matplotlib (``pip install 'hf-stackwise[plot]'``) is imported only here.
"""

from __future__ import annotations

import os

from .checkpoint import FORMAT_VERSION, RUN_MANIFEST_NAME, TRAINER_STATE_NAME, complete_checkpoints, read_json
from .labels import CONFUSION_NAME
from .layout import stack_sizes
from .schedule import RecipeError, Schedule, StackwiseError, lora_unit, stack_unit, trunk_unit

SIZE = (10, 4)  # inches
DPI = 100
COLORS = {"full": "#d62728", "lora": "#ff7f0e", "trunk": "#9ecae1", "frozen": "#e0e0e0", "inactive": "#ffffff"}


class PlotError(StackwiseError):
    """The folder is not a run, or has nothing to plot yet."""


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("plot: needs matplotlib; pip install 'hf-stackwise[plot]'") from None
    return plt


def stack_modes(schedule: Schedule, base) -> list[list[str]]:
    """Per phase, how each physical stack takes part: full, lora, trunk, frozen or inactive (also: not grown yet).

    ``base``: the model's stack count (or stack sizes) before growth."""
    layout = schedule.layout(base)
    modes = []
    for phase, order, units in zip(schedule.phases, layout.orders, schedule.phase_units(base), strict=True):
        active = order[: phase.active_depth(len(order))]
        row = []
        for stack in range(len(layout.sizes)):
            if stack not in active:
                row.append("inactive")
            elif stack_unit(stack) in units:
                row.append("full")
            elif lora_unit(stack) in units:
                row.append("lora")
            else:
                row.append("trunk" if trunk_unit(stack) in units else "frozen")
        modes.append(row)
    return modes


def stack_mode(schedule: Schedule, phase_index: int, stack: int, base) -> str:
    """How physical ``stack`` takes part in phase ``phase_index`` (see :func:`stack_modes`)."""
    return stack_modes(schedule, base)[phase_index][stack]


def plot_timeline(schedule: Schedule, base, path: str, base_lr: float = 1.0) -> str:
    """The schedule over t: one row per stack (bottom = stack 0), coloured by mode; the phase LR as a line.

    ``base``: the model's stack count (or stack sizes); stacks a phase grows get rows above the base ones."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    layout = schedule.layout(base)
    num_stacks = len(layout.sizes)
    modes = stack_modes(schedule, base)

    fig, ax = plt.subplots(figsize=SIZE, dpi=DPI)
    start = 0.0
    for index, phase in enumerate(schedule.phases):
        for stack in range(num_stacks):
            color = COLORS[modes[index][stack]]
            ax.barh(stack, phase.until - start, left=start, color=color, edgecolor="#555555", height=0.8)
        ax.text((start + phase.until) / 2, num_stacks - 0.35, phase.name, ha="center", va="bottom", fontsize=8)
        start = phase.until
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.6, num_stacks + 0.2)
    labels = [f"stack {i}" + (" (grown)" if i >= layout.num_base else "") for i in range(num_stacks)]
    ax.set_yticks(range(num_stacks), labels)
    ax.set_xlabel("t")
    lr = ax.twinx()
    start, peak = 0.0, 0.0
    for phase in schedule.phases:
        value = phase.learning_rate if phase.learning_rate is not None else base_lr
        lr.plot([start, phase.until], [value, value], color="black", linewidth=1.5)
        start, peak = phase.until, max(peak, value)
    lr.set_ylabel("peak learning rate (line)")
    lr.set_ylim(0, peak * 1.35 or 1.0)
    handles = [Patch(facecolor=c, edgecolor="#555555", label=m) for m, c in COLORS.items()]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, ncol=5, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_loss(log_history: list[dict], path: str) -> str:
    """Train loss (dots, coloured by phase) and eval loss (line) against the step."""
    train = [h for h in log_history if "loss" in h and "step" in h]
    evals = [h for h in log_history if "eval_loss" in h and "step" in h]
    if not train and not evals:
        raise PlotError("plot: the run has logged no loss yet; plot it after the first logging step")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE, dpi=DPI)
    phases = list(dict.fromkeys(h.get("phase", "?") for h in train))
    cmap = plt.get_cmap("tab10")
    for i, name in enumerate(phases):
        points = [h for h in train if h.get("phase", "?") == name]
        ax.scatter([h["step"] for h in points], [h["loss"] for h in points], s=12, color=cmap(i % 10), label=name)
    if evals:
        ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], color="black", marker="o", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_confusion(record: dict, path: str) -> str:
    """The latest eval's confusion matrix (rows: true label, columns: predicted), counts in the cells."""
    evaluation = record["evals"][-1]
    matrix, labels = evaluation["matrix"], record["labels"]
    plt = _pyplot()
    side = max(4.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(side, side), dpi=DPI)
    ax.imshow(matrix, cmap="Blues")
    peak = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(f"confusion at step {evaluation['step']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def log_history(run_dir: str) -> list[dict]:
    """The run's log history: the final trainer_state.json, else the last complete checkpoint's."""
    candidates = [os.path.join(run_dir, TRAINER_STATE_NAME)]
    candidates += [os.path.join(c, TRAINER_STATE_NAME) for c in reversed(complete_checkpoints(run_dir))]
    for path in candidates:
        if os.path.isfile(path):
            return read_json(path).get("log_history", [])
    raise PlotError(f"plot: {run_dir!r} has no trainer_state.json yet (no checkpoint, no finished run)")


def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Write ``schedule.png`` and ``loss.png`` for a run folder (into ``out_dir``, default the run folder), and
    ``confusion.png`` for a classification run that has evaluated."""
    manifest = os.path.join(run_dir, RUN_MANIFEST_NAME)
    if not os.path.isfile(manifest):
        hint = " (for a recipe, `hf-stackwise plan RECIPE --plot OUT.png` draws the timeline)"
        raise PlotError(
            f"plot: {run_dir!r} is not an hf_stackwise run (no {RUN_MANIFEST_NAME}); give a training.output_dir"
            + (hint if run_dir.endswith((".yaml", ".yml")) else "")
        )
    try:
        run = read_json(manifest)
    except (OSError, ValueError) as err:
        raise PlotError(f"plot: cannot read {manifest}: {err}") from None
    if run.get("format_version") != FORMAT_VERSION:
        raise PlotError(
            f"plot: {manifest} has format version {run.get('format_version')!r}, and this hf_stackwise reads version "
            f"{FORMAT_VERSION}; plot it with the hf_stackwise version that trained it"
        )
    history = log_history(run_dir)  # before writing anything: a run with no logs is an error, not an empty plot
    try:
        schedule = Schedule.from_list(run["schedule"])
    except RecipeError as err:
        raise PlotError(f"plot: {manifest} holds an invalid schedule: {err}") from None
    out_dir = out_dir or run_dir
    os.makedirs(out_dir, exist_ok=True)
    bounds = run["rack"]["boundaries"]
    base_lr = run.get("defaults", {}).get("learning_rate", 1.0)
    loss = plot_loss(history, os.path.join(out_dir, "loss.png"))
    timeline = plot_timeline(schedule, stack_sizes(bounds), os.path.join(out_dir, "schedule.png"), base_lr)
    written = [timeline, loss]
    confusion = os.path.join(run_dir, CONFUSION_NAME)
    if os.path.isfile(confusion) and read_json(confusion).get("evals"):
        written.append(plot_confusion(read_json(confusion), os.path.join(out_dir, "confusion.png")))
    return written
