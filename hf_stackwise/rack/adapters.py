"""LoRA through PEFT: a named adapter per stack that trains with ``adapter: lora``, and one ``trunk`` adapter
over the stacks that carry ``trunk: lora`` while they do not train.

All adapters are attached when the trainer is built and stay active for the whole run: an adapter that has
not trained yet has ``B = 0`` and adds nothing, and one that has trained keeps contributing in later phases.
Phases only flip which adapters' parameters train (the superset rule: all are in the optimizer from the start).
"""

from __future__ import annotations

import warnings

from torch import nn

from ..deferred import without_bitsandbytes
from ..schedule.layout import Layout
from ..schedule.phases import DEFAULT_LORA, LORA_KEYS, TRUNK_ADAPTER, RecipeError, Schedule

PEFT_PREFIX = "base_model.model."  # where PeftModel keeps the wrapped model


def plan_adapters(schedule: Schedule, settings: dict | None, layout: Layout) -> dict[str, dict]:
    """Adapter name → LoRA settings and the (physical) blocks it covers; a pure function of the recipe."""
    settings = settings or {}
    base = {**DEFAULT_LORA, **{k: settings[k] for k in LORA_KEYS if k in settings}}
    plan: dict[str, dict] = {}
    trunk_blocks: set[int] = set()
    for index, phase in enumerate(schedule.phases):
        order = layout.orders[index]
        trained = phase.trainable_stacks(len(order), layout.new_positions(index))
        if phase.adapter == "lora":
            for i in trained:
                name = f"stack_{order[i]}"
                if name not in plan:  # the first phase that trains the stack through LoRA decides its settings
                    plan[name] = {**base, **(phase.lora or {}), "blocks": list(layout.stack_blocks(order[i]))}
        if phase.trunk == "lora":
            for i in range(phase.active_depth(len(order))):
                if i not in trained:
                    trunk_blocks.update(layout.stack_blocks(order[i]))
    if trunk_blocks:
        r = settings.get("trunk_r", max(1, base["r"] // 4))  # smaller than the stack adapters, as in StackWise
        plan[TRUNK_ADAPTER] = {
            **base,
            "r": r,
            "alpha": settings.get("trunk_alpha", 2 * r),
            "blocks": sorted(trunk_blocks),
        }
    return plan


def linear_module_names(block: nn.Module) -> list[str]:
    """Short names of the linear layers inside a block (``q_proj``, ``c_attn``, ...): what `all-linear` means."""
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, m in block.named_modules() if isinstance(m, (nn.Linear, Conv1D))})


def resolve_targets(plan: dict[str, dict], blocks: nn.ModuleList) -> dict[str, list[str]]:
    """Each adapter's target module names, checked against the blocks it covers."""
    targets = {}
    for name, cfg in plan.items():
        present = set()
        for b in cfg["blocks"]:
            present |= set(linear_module_names(blocks[b]))
        wanted = sorted(present) if cfg["target_modules"] == "all-linear" else list(cfg["target_modules"])
        matched = [t for t in wanted if t in present]
        if not matched:
            key = "adapters.trunk_r" if name == TRUNK_ADAPTER else "adapters.target_modules (or the phase's lora)"
            raise RecipeError(
                f"{key}: target_modules {wanted} match no linear layer of the blocks adapter {name!r} covers "
                f"(they have {sorted(present)}); use `all-linear` or names from that list"
            )
        targets[name] = matched
    return targets


def classifier_modules(model: nn.Module) -> list[str] | None:
    """A sequence classifier's head modules (``classifier``, ``score``: its top-level modules besides the backbone
    that hold weights), which train as PEFT's ``modules_to_save``; None for other models."""
    if not type(model).__name__.endswith("ForSequenceClassification"):
        return None
    backbone = getattr(model, "base_model_prefix", "")
    return [n for n, m in model.named_children() if n != backbone and any(True for _ in m.parameters())] or None


def attach_adapters(model: nn.Module, plan: dict[str, dict], layers_path: str):
    """Wrap ``model`` in a PeftModel carrying every planned adapter, all active."""
    from peft import LoraConfig, get_peft_model

    targets = resolve_targets(plan, model.get_submodule(layers_path))
    pattern = layers_path.rpartition(".")[2]
    peft_model = None
    heads = classifier_modules(model)
    # the classifier's copy belongs to the first adapter created: sorted, so the export (which reads the plan back
    # from JSON) names it as training did
    for name in sorted(plan) if heads else plan:
        cfg = plan[name]
        config = LoraConfig(
            modules_to_save=heads if peft_model is None else None,  # once: one trained copy of the classifier
            r=cfg["r"],
            lora_alpha=cfg["alpha"],
            lora_dropout=cfg["dropout"],
            target_modules=targets[name],
            layers_to_transform=cfg["blocks"],
            layers_pattern=pattern,
        )
        with without_bitsandbytes(), warnings.catch_warnings():  # a full-precision base: no bitsandbytes import
            # PEFT 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`: not the user's doing
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            if peft_model is None:
                peft_model = get_peft_model(model, config, adapter_name=name)
            else:
                peft_model.add_adapter(name, config)
    peft_model.base_model.set_adapter(list(plan))
    return peft_model
