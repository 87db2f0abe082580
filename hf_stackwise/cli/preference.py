"""``data.task: dpo`` / ``kto`` in the pipeline: TRL's classes (imported only for such a run), the config fields the
recipe's ``data:`` sets, the reference checks that run before any weight loads, and the reference's memory per phase
for ``plan``."""

from __future__ import annotations

from ..schedule.phases import HEAD, RecipeError
from ..schedule.reference import check_dpo_schedule, check_shared, reference_cuts

# DPOConfig fields a recipe sets elsewhere, with where
DPO_OWNED_ELSEWHERE = {
    "max_length": "`data.max_seq_length`",
    "precompute_ref_log_probs": "`training.reference: precompute`",
}


def is_dpo(recipe) -> bool:
    """Whether the run is preference tuning against a reference model (``data.task: dpo`` or ``kto``)."""
    return recipe.data.get("task") in ("dpo", "kto")


def dpo_classes(task: str = "dpo"):
    """``(StackwiseDPOConfig, StackwiseDPOTrainer)`` from :mod:`~hf_stackwise.integrations.dpo_trainer`, or the KTO
    pair from :mod:`~hf_stackwise.integrations.kto_trainer` (trl)."""
    try:
        if task == "kto":
            from ..integrations.kto_trainer import StackwiseKTOConfig, StackwiseKTOTrainer

            return StackwiseKTOConfig, StackwiseKTOTrainer
        from ..integrations.dpo_trainer import StackwiseDPOConfig, StackwiseDPOTrainer
    except ImportError as err:
        if "trl" not in str(err):
            raise
        trainer = "KTOTrainer" if task == "kto" else "DPOTrainer"
        raise RecipeError(
            f"data.task: `{task}` runs through TRL's {trainer}, and trl is not installed; pip install "
            "'hf-stackwise[trl]'"
        ) from None
    return StackwiseDPOConfig, StackwiseDPOTrainer


def dpo_fields(recipe, max_length: int) -> dict:
    """The ``DPOConfig`` fields the recipe's ``data:`` section sets; refuses the ones it owns under ``training:``."""
    owned = [
        f"training.{k}: set by the recipe; use {where}"
        for k, where in DPO_OWNED_ELSEWHERE.items()
        if k in recipe.training
    ]
    if owned:
        raise RecipeError(owned)
    return {"max_length": max_length}


def check_reference(recipe, config, sizes: tuple[int, ...]) -> None:
    """What the trainer would refuse about the reference, from the recipe and the config (before any weight)."""
    check_dpo_schedule(recipe.schedule, sizes)
    way = recipe.training.get("reference", "auto")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if way == "shared":
        check_shared(recipe.schedule, sizes, tied)
    if way == "copy" and recipe.model.get("quantization"):
        raise RecipeError(
            "training.reference: `copy` of a 4-bit base would hold a second quantized model and dequantize it on "
            "every reference forward; use `shared` (the base's tensors are shared) or `precompute`"
        )
    if way == "precompute" and recipe.data.get("train", {}).get("streaming"):
        raise RecipeError(
            "training.reference: `precompute` stores a log-prob per training row, and data.train is streamed; use "
            "`shared` or `copy`"
        )


def format_reference(plan, recipe, config) -> str:
    """Per phase, what the reference holds and runs for each way (MiB, 2^20 bytes)."""
    units = {u: t for u, t in plan.unit_tensors.items() if "." not in u}  # the base's own tensors, no adapters
    tensors = {n: b for t in units.values() for n, (_, b) in t.items()}
    full = sum(tensors.values())
    ever = recipe.schedule.ever_trainable_units(plan.base_sizes)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    copied = sum({n: b for u in ever if u in units for n, (_, b) in units[u].items()}.values())
    if tied and HEAD in ever:
        copied = full  # the head is the embeddings' tensor: nothing below it stays initial
    cuts = reference_cuts(plan.schedule, plan.base_sizes, tied)
    way = recipe.training.get("reference", "auto")
    blocks = plan.boundaries[len(plan.base_sizes)]
    lines = [
        f"{recipe.data.task.upper()} reference (training.reference: {way}) in MiB: copy = a frozen full copy, "
        "precompute = none in memory "
        "(one forward per pair before training, 8 bytes per pair stored), shared = initial copies of what ever trains "
        "(forward from the cut on the policy's hidden state)",
        f"{'phase':<14} {'copy':>8} {'precompute':>10} {'shared':>8}  shared forward",
    ]
    for p in plan.phases:
        cut = plan.boundaries[cuts[p.index]]
        shared = f"{copied / 2**20:8.1f}" if cuts[-1] else f"{'-':>8}"
        runs = (
            f"blocks {cut}-{blocks - 1} + head ({(blocks - cut) / blocks:.0%} of the blocks)"
            if cuts[-1]
            else "refused: "
        )
        if not cuts[-1]:
            runs += "no stack stays frozen for the whole run"
        lines.append(f"{p.name:<14} {full / 2**20:8.1f} {0.0:10.1f} {shared}  {runs}")
    return "\n".join(lines)
