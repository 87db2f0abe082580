"""The model card (``README.md``) of an exported folder: base model, the resolved phase table, the loss plot and the
recipe YAML, with Hub metadata (``base_model``, ``library_name``, ``tags``) through ``huggingface_hub.ModelCard``.
"""

from __future__ import annotations

import os

from transformers.utils import logging

from ..persist.checkpoint import RECIPE_NAME, TRAINER_STATE_NAME, read_json, run_task
from ..schedule.layout import stack_sizes
from ..schedule.phases import Schedule, StackwiseError

logger = logging.get_logger(__name__)
CARD_NAME = "README.md"
LOSS_PLOT = "loss.png"
TAGS = ["hf_stackwise", "progressive-training"]


def _looks_like_hub_id(name: str | None) -> bool:
    return bool(name) and name.count("/") == 1 and not os.path.exists(name) and not name.startswith((".", "~"))


def _find_upwards(folder: str, name: str) -> str | None:
    """``name`` in ``folder`` or, for a checkpoint, in its run folder."""
    for candidate in (folder, os.path.dirname(os.path.abspath(folder))):
        path = os.path.join(candidate, name)
        if os.path.isfile(path):
            return path
    return None


def _stacks(indices) -> str:
    return ", ".join(str(i) for i in indices) if indices else "none"


def phase_table(run: dict, total_steps: int | None) -> str:
    """Markdown: one row per phase with its steps, t range, active and trainable stacks, mode and learning rate.

    Phases start and end at the run's resolved steps (t = step / total steps), not at the recipe's ``until``; stacks
    are positions in the phase's rack (after its growth), bottom → top."""
    from .plots import phase_spans

    schedule = Schedule.from_list(run["schedule"])
    layout = schedule.layout(stack_sizes(run["rack"]["boundaries"]))
    base_lr = run.get("defaults", {}).get("learning_rate")
    rows = [
        "| phase | steps | t | active stacks | trains | mode | learning rate |",
        "|---|---|---|---|---|---|---|",
    ]
    bounds = schedule.resolve(total_steps).bounds if total_steps else [(None, None)] * len(schedule.phases)
    spans = phase_spans(schedule, total_steps)
    for index, (phase, (start, end), (t0, t1)) in enumerate(zip(schedule.phases, bounds, spans, strict=True)):
        num_stacks = len(layout.orders[index])
        steps = f"{start}–{end - 1}" if start is not None else "–"
        trains = [f"stacks {_stacks(phase.trainable_stacks(num_stacks, layout.new_positions(index)))}"]
        trains += [
            unit for unit, on in (("embeddings", phase.trains_embeddings()), ("head", phase.trains_head())) if on
        ]
        mode = f"{phase.adapter} (trunk {phase.trunk})"
        if phase.grow is not None:
            mode = f"grow {phase.grow.op} at {_place(phase.grow.at)}, {mode}"
        lr = phase.learning_rate if phase.learning_rate is not None else base_lr
        lr_text = f"{lr:.1e} {phase.lr_schedule}" if lr is not None else phase.lr_schedule
        if phase.warmup:
            lr_text += f", warm-up {phase.warmup:g}"
        if phase.layer_lr_decay != 1.0:
            lr_text += f", layer decay {phase.layer_lr_decay:g}"
        if phase.span is not None:  # a generator entry's shape, once over all its phases
            warm = f", warm-up {phase.span['warmup']:g}" if phase.span["warmup"] else ""
            lr_text += f" × {phase.span['entry']}'s {phase.span['lr_schedule']}{warm} over all its phases"
        depth = phase.active_depth(num_stacks)
        active = f"0–{depth - 1}" if depth > 1 else "0"
        rows.append(
            f"| {phase.name} | {steps} | {t0:.2f}–{t1:.2f} | {active} | {', '.join(trains)} | {mode} | {lr_text} |"
        )
    return "\n".join(rows)


def _growth(run: dict) -> str:
    """``, grown by the schedule to N stacks over B blocks`` for a schedule that grows, else nothing."""
    schedule = Schedule.from_list(run["schedule"])
    if not schedule.grows():
        return ""
    layout = schedule.layout(stack_sizes(run["rack"]["boundaries"]))
    return f"; the schedule grows it to {len(layout.sizes)} stacks over {layout.num_blocks} blocks"


def _place(at) -> str:
    return ", ".join(str(p) for p in at) if isinstance(at, tuple) else at


def _loss_plot(folder: str, target: str) -> str | None:
    """Draw ``loss.png`` into ``target`` from the source's log history; None (and why, in the log) when it cannot."""
    from .plots import PlotError, plot_loss

    path = _find_upwards(folder, TRAINER_STATE_NAME)
    if path is None:
        return "the run kept no log history (no trainer_state.json)"
    try:
        plot_loss(read_json(path).get("log_history", []), os.path.join(target, LOSS_PLOT))
    except PlotError as err:
        return str(err).removeprefix("plot: ")
    return None


def freeze_lines(manifest: dict) -> list[str]:
    """The card's "Adaptive freezing" section: when each stack froze (``autofreeze`` phases), and why."""
    decisions = manifest.get("freeze_decisions")
    if decisions is None:
        return []
    names = [p.get("name") for p in manifest["run"].get("schedule", [])]
    lines = ["## Adaptive freezing", ""]
    if not decisions:
        return [*lines, "No stack froze (the `autofreeze` criterion never fired).", ""]
    lines += ["| phase | step | stacks frozen | grad-norm change | threshold |", "|---|---|---|---|---|"]
    for d in decisions:
        changes = ", ".join(f"{c:.3g}" for c in d["changes"])
        phase = names[d["phase"]] if d["phase"] < len(names) else d["phase"]
        lines.append(f"| {phase} | {d['step']} | {_stacks(d['stacks'])} | {changes} | {d['threshold']:.3g} |")
    return [*lines, ""]


def build_card(folder: str, target: str, manifest: dict, adapters: bool = False, name: str | None = None) -> str:
    """The card's text for an export of ``folder`` (a run or checkpoint) into ``target``; draws ``loss.png`` there."""
    from huggingface_hub import ModelCard, ModelCardData

    run = manifest["run"]
    base = manifest.get("base_model")
    data = ModelCardData(
        base_model=base if _looks_like_hub_id(base) else None,
        library_name="peft" if adapters else "transformers",
        tags=TAGS + (["lora"] if run.get("adapters") else []),
    )
    total = run.get("total_steps")
    state_path = _find_upwards(folder, TRAINER_STATE_NAME)
    if total is None and state_path:
        total = read_json(state_path).get("max_steps")
    rack = run["rack"]
    phase = manifest.get("phase", {})
    lines = [
        f"# {name or os.path.basename(os.path.abspath(target))}",
        "",
        "Trained with hf_stackwise — progressive, time-scheduled training inside one "
        "`transformers.Trainer` run: the model is a rack of stacks (contiguous groups of transformer blocks), and "
        "each phase of the schedule (over normalized time t from 0 to 1) says which stacks run and which train.",
        "",
        f"- **Base model:** `{base}`",
        f"- **Rack:** {len(rack['boundaries']) - 1} stacks over {rack['num_blocks']} blocks (`{rack['layers']}`), "
        f"boundaries {rack['boundaries']}{_growth(run)}",
        f"- **Exported at:** step {manifest.get('global_step')} (t = {manifest.get('t', 0):.2f}), after phase "
        f"`{phase.get('name')}`",
    ]
    if manifest.get("quantization"):
        lines.append("- **Base precision:** 4-bit (bitsandbytes); adapters were merged into the dequantized base")
    lines += ["", "## Schedule", "", phase_table(run, total), ""]
    lines += freeze_lines(manifest)
    why_no_plot = _loss_plot(folder, target)
    lines += ["## Training loss", ""]
    lines.append(f"![training loss by phase]({LOSS_PLOT})" if why_no_plot is None else f"No plot: {why_no_plot}.")
    recipe = _find_upwards(folder, RECIPE_NAME)
    lines += ["", "## Recipe", ""]
    if recipe:
        with open(recipe) as f:
            lines += ["```yaml", f.read().rstrip(), "```"]
    else:
        lines.append("The run was started from Python (no recipe file); the schedule above is the whole recipe.")
    lines += ["", "## Use", ""]
    if adapters:
        lines.append("PEFT adapter folders, one per adapter; `stackwise_adapters.json` says how to load them.")
    else:
        classifies = run_task(manifest) == "classification"
        auto_class = "AutoModelForSequenceClassification" if classifies else "AutoModelForCausalLM"
        lines += [
            "A plain `transformers` folder (adapters merged, inactive stacks dropped); no hf_stackwise needed:",
            "",
            "```python",
            f"from transformers import {auto_class}, AutoTokenizer",
            "",
            f'model = {auto_class}.from_pretrained("<this folder or repo>")',
            'tokenizer = AutoTokenizer.from_pretrained("<this folder or repo>")',
            "```",
        ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def write_card(folder: str, target: str, manifest: dict, adapters: bool = False, name: str | None = None) -> str:
    """Write ``README.md`` (and ``loss.png`` when there is a log history) into ``target``."""
    try:
        text = build_card(folder, target, manifest, adapters, name)
    except StackwiseError as err:  # an invalid schedule in an old manifest: the export itself is still fine
        logger.warning(f"export: no model card ({err})")
        return ""
    path = os.path.join(target, CARD_NAME)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path
