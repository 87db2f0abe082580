"""What the trainer's logs measure: per-unit gradient norms (unscaled under fp16 loss scaling) and whether an
eval's loss is a causal language model's, whose exponential is a perplexity."""

from __future__ import annotations

import torch

CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def grad_scale(accelerator) -> float:
    """The loss scale the gradients carry right after ``backward``: the GradScaler's under fp16, else 1.

    accelerate multiplies the loss by ``scaler.get_scale()`` before ``backward`` and divides the gradients only
    when the Trainer clips them or the optimizer steps, so a norm read in the training step must be divided."""
    scaler = getattr(accelerator, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0


def unit_grad_norms(params, scale: float = 1.0) -> dict[str, float]:
    """L2 norm of each unit's gradient divided by ``scale``; ``params`` holds (name, parameter, owning units) and a
    tied tensor counts for its first unit."""
    squares: dict[str, torch.Tensor] = {}
    for _, param, owners in params:
        if param.grad is not None:
            value = param.grad.detach().float().pow(2).sum()
            squares[owners[0]] = squares[owners[0]] + value if owners[0] in squares else value
    return {unit: float(total.sqrt()) / scale for unit, total in squares.items()}


def is_causal_lm(model) -> bool:
    """Whether ``model`` (unwrapped from PEFT) is a causal language model: a class of transformers' causal-LM
    mapping, or one named like them (``…ForCausalLM``, ``…LMHeadModel``, e.g. remote code)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    return name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or name.endswith(CAUSAL_LM_SUFFIXES)
