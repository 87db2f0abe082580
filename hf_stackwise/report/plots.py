"""PNG plots of a run: the schedule as a timeline over t, and train/eval loss coloured by phase.

Reads only JSON a run leaves behind (``stackwise_run.json`` and the Trainer's ``trainer_state.json``);
matplotlib (``pip install 'hf-stackwise[plot]'``) is imported only here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..data.labels import CONFUSION_NAME
from ..persist.checkpoint import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    RUN_MANIFEST_NAME,
    TRAINER_STATE_NAME,
    complete_checkpoints,
    read_json,
)
from ..schedule.layout import stack_sizes
from ..schedule.phases import RecipeError, Schedule, StackwiseError, lora_unit, stack_unit, trunk_unit

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


@dataclass(frozen=True)
class Cell:
    """One rectangle of the timeline: the stack at ``position`` (bottom → top) of phase ``phase``'s rack."""

    phase: int
    position: int  # in the rack as the phase runs it: 0 next to the embeddings
    stack: int  # physical id (`stack_<id>` in logs and optimizer groups)
    mode: str  # full | lora | trunk | frozen | inactive
    new: bool  # grown at the phase's first step
    start: float  # t
    end: float


def phase_spans(schedule: Schedule, total_steps: int | None = None) -> list[tuple[float, float]]:
    """Each phase's ``(start, end)`` in t: the resolved steps over ``total_steps`` (what the run does), or the
    recipe's ``until`` values when the run length is unknown."""
    if total_steps:
        resolved = schedule.resolve(total_steps)
        return [(start / total_steps, end / total_steps) for start, end in resolved.bounds]
    ends = [p.until for p in schedule.phases]
    return list(zip([0.0, *ends[:-1]], ends, strict=True))


def timeline_cells(schedule: Schedule, base, total_steps: int | None = None) -> list[Cell]:
    """What the timeline draws: per phase, one cell per stack of the phase's rack, by position bottom → top.

    ``base``: the model's stack count (or stack sizes) before growth. A phase that grows has more rows than the one
    before it; a stack grown at the bottom is position 0 from its phase on, and the stacks above it move up."""
    layout = schedule.layout(base)
    spans = phase_spans(schedule, total_steps)
    cells = []
    phases = zip(schedule.phases, layout.orders, schedule.phase_units(base), spans, strict=True)
    for index, (phase, order, units, (start, end)) in enumerate(phases):
        depth = phase.active_depth(len(order))
        new = {n.stack for n in layout.grown[index]}
        for position, stack in enumerate(order):
            if position >= depth:
                mode = "inactive"
            elif stack_unit(stack) in units:
                mode = "full"
            elif lora_unit(stack) in units:
                mode = "lora"
            else:
                mode = "trunk" if trunk_unit(stack) in units else "frozen"
            cells.append(Cell(index, position, stack, mode, stack in new, start, end))
    return cells


def plot_timeline(
    schedule: Schedule,
    base,
    path: str,
    base_lr: float = 1.0,
    total_steps: int | None = None,
    freezes: list[dict] | None = None,
) -> str:
    """The schedule over t: per phase, one row per rack position (bottom = position 0), coloured by mode, stacks
    grown at the phase's start hatched; the phase's peak learning rate as a line.

    ``base``: the model's stack count (or stack sizes) before growth; ``total_steps``: the run length, so phases
    end where the run's resolved steps end them (without it, at the recipe's ``until``); ``freezes``: the run's
    ``autofreeze`` decisions, drawn as a dashed line at each freeze step and the frozen stacks grey from there."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    cells = timeline_cells(schedule, base, total_steps)
    spans = phase_spans(schedule, total_steps)
    rows = 1 + max(c.position for c in cells)
    grows = schedule.grows()

    fig, ax = plt.subplots(figsize=SIZE, dpi=DPI)
    for c in cells:
        ax.barh(
            c.position,
            c.end - c.start,
            left=c.start,
            color=COLORS[c.mode],
            edgecolor="#555555",
            height=0.8,
            hatch="///" if c.new else None,
        )
        if grows and c.end - c.start >= 0.04 and rows <= 16:  # which physical stack sits there
            ax.text((c.start + c.end) / 2, c.position, f"id {c.stack}", ha="center", va="center", fontsize=7)
    for phase, (start, end) in zip(schedule.phases, spans, strict=True):
        ax.text((start + end) / 2, rows - 0.35, phase.name, ha="center", va="bottom", fontsize=8)
    for freeze in freezes or [] if total_steps else []:
        t, end = freeze["step"] / total_steps, spans[freeze["phase"]][1]
        for position in freeze["positions"]:
            ax.barh(position, end - t, left=t, color=COLORS["frozen"], edgecolor="#555555", height=0.8)
        ax.axvline(t, color="#1f77b4", linestyle="--", linewidth=1)
        label = f"froze {', '.join(map(str, freeze['positions']))}"
        ax.text(t, -0.55, label, color="#1f77b4", fontsize=7, ha="left", va="bottom")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.6, rows + 0.2)
    ticks = range(0, rows, max(1, rows // 16))
    ax.set_yticks(list(ticks), [f"position {i}" for i in ticks], fontsize=8)
    ax.set_ylabel("stack position (0 = bottom)", fontsize=8)
    ax.set_xlabel("t (phase ends at the run's resolved steps)" if total_steps else "t")
    lr = ax.twinx()
    peak = 0.0
    for phase, (start, end) in zip(schedule.phases, spans, strict=True):
        value = phase.learning_rate if phase.learning_rate is not None else base_lr
        lr.plot([start, end], [value, value], color="black", linewidth=1.5)
        peak = max(peak, value)
    lr.set_ylabel("peak learning rate (line)")
    lr.set_ylim(0, peak * 1.35 or 1.0)
    handles = [Patch(facecolor=c, edgecolor="#555555", label=m) for m, c in COLORS.items()]
    if grows:
        handles.append(
            Patch(facecolor="white", edgecolor="#555555", hatch="///", label="grown here (id: physical stack)")
        )
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, ncol=6, frameon=False)
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


def _trainer_state(run_dir: str) -> dict | None:
    """The final ``trainer_state.json`` of a run, else its last complete checkpoint's; None before either exists."""
    candidates = [os.path.join(run_dir, TRAINER_STATE_NAME)]
    candidates += [os.path.join(c, TRAINER_STATE_NAME) for c in reversed(complete_checkpoints(run_dir))]
    for path in candidates:
        if os.path.isfile(path):
            return read_json(path)
    return None


def freeze_points(run_dir: str) -> list[dict]:
    """The run's ``autofreeze`` decisions (``{phase, step, positions, ...}``): from the final save's
    ``stackwise_state.json``, else the last complete checkpoint's; empty when none froze."""
    candidates = [os.path.join(run_dir, MANIFEST_NAME)]
    candidates += [os.path.join(c, MANIFEST_NAME) for c in reversed(complete_checkpoints(run_dir))]
    for path in candidates:
        if os.path.isfile(path):
            return read_json(path).get("freeze_decisions") or []
    return []


def log_history(run_dir: str) -> list[dict]:
    """The run's log history: the final trainer_state.json, else the last complete checkpoint's."""
    state = _trainer_state(run_dir)
    if state is None:
        raise PlotError(f"plot: {run_dir!r} has no trainer_state.json yet (no checkpoint, no finished run)")
    return state.get("log_history", [])


def run_total_steps(run_dir: str) -> int | None:
    """The run's length as the Trainer resolved it (``max_steps`` of its trainer_state.json), if known."""
    return (_trainer_state(run_dir) or {}).get("max_steps") or None


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
    bounds = run["rack"]["boundaries"]  # the rack as loaded, before growth
    base_lr = run.get("defaults", {}).get("learning_rate", 1.0)
    total_steps = run.get("total_steps") or run_total_steps(run_dir)
    loss = plot_loss(history, os.path.join(out_dir, "loss.png"))
    schedule_png = os.path.join(out_dir, "schedule.png")
    freezes = freeze_points(run_dir)
    timeline = plot_timeline(schedule, stack_sizes(bounds), schedule_png, base_lr, total_steps, freezes)
    written = [timeline, loss]
    confusion = os.path.join(run_dir, CONFUSION_NAME)
    if os.path.isfile(confusion) and read_json(confusion).get("evals"):
        written.append(plot_confusion(read_json(confusion), os.path.join(out_dir, "confusion.png")))
    return written
