"""QLoRA bases through bitsandbytes: the 4-bit config, which modules stay in full precision, and the
bitsandbytes 0.50.2 CPU repack workaround (:func:`disable_cpu_repack`).

Blocks the schedule ever trains with ``adapter: full`` and every linear layer outside the blocks (the head)
are kept out of quantization; everything else in the blocks is 4-bit and trains only through LoRA.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from ..deferred import bitsandbytes_loaded
from ..schedule.layout import stack_sizes
from ..schedule.phases import RecipeError, Schedule, stack_unit

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def require_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError(
            "model.quantization: needs bitsandbytes, which is not installed; pip install 'hf-stackwise[quant]'"
        )


def full_precision_modules(model: nn.Module, layers_path: str, schedule: Schedule, boundaries) -> list[str]:
    """Module names to keep out of 4-bit: blocks ever trained with `adapter: full`, and linears outside blocks."""
    num_stacks = len(boundaries) - 1
    ever = schedule.ever_trainable_units(stack_sizes(boundaries))
    keep = [
        f"{layers_path}.{b}"
        for s in range(num_stacks)
        if stack_unit(s) in ever
        for b in range(boundaries[s], boundaries[s + 1])
    ]
    prefix = layers_path + "."
    keep += [
        name for name, module in model.named_modules() if isinstance(module, nn.Linear) and not name.startswith(prefix)
    ]
    return keep


def quantization_identity(settings: dict | None = None, bnb: dict | None = None) -> dict | None:
    """The run-identity view of a 4-bit base, from the recipe's settings or from a saved bitsandbytes config."""
    if bnb:
        return {
            "quant_type": bnb.get("bnb_4bit_quant_type"),
            "double_quant": bnb.get("bnb_4bit_use_double_quant"),
            "compute_dtype": str(bnb.get("bnb_4bit_compute_dtype")).removeprefix("torch."),
        }
    if settings:
        return {
            "quant_type": settings.get("quant_type", "nf4"),
            "double_quant": settings.get("double_quant", True),
            "compute_dtype": settings.get("compute_dtype", "float32"),
        }
    return None


STORAGE = ("auto", "uint8", "float32", "bfloat16", "float16")


def quant_storage(settings: dict, training: dict | None = None) -> str:
    """The dtype bitsandbytes packs 4-bit weights in (``bnb_4bit_quant_storage``). ``auto``: ``uint8`` in one process
    or under DDP; under FSDP2 the dtype FSDP2 gathers parameters in (``bfloat16`` with ``bf16: true``, else
    ``float32``), so the packed weights shard like every other parameter (accelerate leaves ``uint8`` ones whole on
    every rank) and a bf16 ``MixedPrecisionPolicy`` does not cast the packed bytes."""
    storage = settings.get("quant_storage", "auto")
    if storage != "auto":
        return storage
    training = training or {}
    if not training.get("fsdp"):
        return "uint8"
    return "bfloat16" if training.get("bf16") else "float32"


def bnb_config(settings: dict, skip_modules: list[str], training: dict | None = None):
    """``BitsAndBytesConfig`` for the recipe's ``model.quantization`` section (``training``: the storage dtype)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.get("quant_type", "nf4"),
        bnb_4bit_use_double_quant=settings.get("double_quant", True),
        bnb_4bit_compute_dtype=DTYPES[settings.get("compute_dtype", "float32")],
        bnb_4bit_quant_storage=getattr(torch, quant_storage(settings, training)),
        llm_int8_skip_modules=skip_modules,
    )


def disable_cpu_repack(model: nn.Module) -> int:
    """Work around bitsandbytes 0.50.2 on AVX512-BF16 CPUs: an eval forward without grad repacks every Linear4bit
    for a gemv kernel, after which gradients through the base, merges and saves go wrong. Returns the count."""
    if not bitsandbytes_loaded() or (not getattr(model, "is_quantized", False) and not hasattr(model, "peft_config")):
        return 0  # no 4-bit layer can exist before bitsandbytes is imported (hf_stackwise.deferred)
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def check_full_blocks_not_quantized(model: nn.Module, rack, schedule: Schedule) -> None:
    """A stack trained with `adapter: full` must hold real (not 4-bit) weights."""
    if not bitsandbytes_loaded():
        return
    import bitsandbytes as bnb

    phase_units = schedule.phase_units(rack.sizes)
    ever = frozenset().union(*phase_units)
    for s in range(rack.num_stacks):
        if stack_unit(s) not in ever:
            continue
        for b in rack.stack_blocks(s):
            if any(isinstance(m, bnb.nn.Linear4bit) for m in rack.blocks[b].modules()):
                index = next(i for i, units in enumerate(phase_units) if stack_unit(s) in units)
                raise RecipeError(
                    f"schedule[{index}].adapter: trains stack {s} with `adapter: full`, but its weights are 4-bit; "
                    f"train it with `adapter: lora`, or keep block {b} out of quantization (llm_int8_skip_modules)"
                )
