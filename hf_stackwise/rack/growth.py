"""Growing the rack inside one run: blocks allocated up front, initialised in place at their growth step.

:func:`allocate` appends, once and before the optimizer exists, every block the schedule will ever add
(the superset rule), so parameter identity and optimizer / DDP registration never change.
:func:`initialize` fills a grown stack at the first step of the phase that grows it:

- ``copy``: an exact duplicate of its source blocks (G_stack, StackingBERT);
- ``identity``: a copy whose attention-output and MLP-down projections are zeroed, so the block adds
  nothing to the residual stream and the rack computes the same function (LLaMA Pro);
- ``random``: the architecture's own ``_init_weights``, seeded by (seed, step, block) so every process
  draws the same values and the training RNG stream is untouched.

Only base weights are copied; LoRA adapters on a source block are not.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..schedule.layout import Layout, NewStack
from ..schedule.phases import RecipeError
from .rack import BASE_LAYERS_KEY, per_layer_config_keys

# Module names (inside a block) of the projections that write into the residual stream.
ATTENTION_OUTPUTS = ("self_attn.o_proj", "attn.c_proj", "attention.dense", "self_attn.out_proj", "attn.out_proj")
MLP_OUTPUTS = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc_out", "fc2")
POST_NORM_MARKERS = ("output.LayerNorm",)  # BERT / RoBERTa normalise after the residual add


def output_projections(block: nn.Module) -> tuple[str | None, str | None]:
    """Names of the block's attention-output and MLP-down projections (None where not recognised)."""
    names = {name.replace(".base_layer", "") for name, _ in block.named_modules()}
    attention = next((n for n in ATTENTION_OUTPUTS if n in names), None)
    mlp = next((n for n in MLP_OUTPUTS if n in names), None)
    return attention, mlp


def check_growth(model: nn.Module, layers_path: str, layout: Layout) -> None:
    """Refuse growth the architecture cannot do (works on a weightless meta-device skeleton)."""
    block = model.get_submodule(layers_path)[0]
    kind = type(block).__name__
    problems = []
    for index, grown in enumerate(layout.grown):
        if not any(new.op == "identity" for new in grown):
            continue
        path = f"schedule[{index}].grow.op"
        names = [name for name, _ in block.named_modules()]
        post_norm = any(name.endswith(m) for name in names for m in POST_NORM_MARKERS)
        if post_norm or getattr(model.config, "do_layer_norm_before", True) is False:
            problems.append(
                f"{path}: `identity` needs pre-norm blocks, but {kind} normalises after the residual add, so no "
                "zeroed projection makes it the identity; use `op: copy` or `op: random`"
            )
            continue
        attention, mlp = output_projections(block)
        missing = [
            f"an attention output projection (one of {', '.join(ATTENTION_OUTPUTS)})" if attention is None else "",
            f"an MLP down projection (one of {', '.join(MLP_OUTPUTS)})" if mlp is None else "",
        ]
        missing = [m for m in missing if m]
        if missing:
            problems.append(
                f"{path}: `identity` zeroes each new block's output projections, but {kind} has no "
                f"{' and no '.join(missing)}; use `op: copy` or `op: random`"
            )
    if problems:
        raise RecipeError(problems)


def _dense_copy(block: nn.Module) -> nn.Module:
    """A trainable copy of ``block``: bitsandbytes 4-bit linears become plain ``nn.Linear`` (dequantized)."""
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    floats = [p.dtype for p in block.parameters() if p.dtype.is_floating_point]
    dtype = floats[0] if floats else torch.float32
    memo: dict[int, nn.Module] = {}
    for module in block.modules():
        if type(getattr(module, "weight", None)).__name__ == "Params4bit":
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight = nn.Parameter(dequantize_bnb_weight(module.weight).to(dtype))
            if module.bias is not None:
                dense.bias = nn.Parameter(module.bias.detach().clone().to(dtype))
            memo[id(module)] = dense
    return copy.deepcopy(block, memo)


def allocate(model: nn.Module, layers_path: str, layout: Layout) -> None:
    """Append every block the schedule grows (placeholders until their growth step); a no-op once done."""
    blocks = model.get_submodule(layers_path)
    config = model.config
    base = layout.num_base_blocks
    if len(blocks) == layout.num_blocks and getattr(config, BASE_LAYERS_KEY, None) == base:
        return
    if len(blocks) != base:
        raise ValueError(f"the rack has {len(blocks)} blocks; expected the base model's {base}")
    sources: list[int] = []
    for grown in layout.grown:
        for new in grown:
            for source in new.sources:
                block = _dense_copy(blocks[source])
                for module in block.modules():
                    if isinstance(getattr(module, "layer_idx", None), int):
                        module.layer_idx = len(blocks)
                blocks.append(block)
                sources.append(source)
    for key in per_layer_config_keys(config, base):
        value = list(getattr(config, key))
        for source in sources:
            value.append(value[source])
        setattr(config, key, value)
    config.num_hidden_layers = len(blocks)
    setattr(config, BASE_LAYERS_KEY, base)


def _base_name(name: str) -> str:
    return name.replace(".base_layer", "")


@torch.no_grad()
def initialize(model: nn.Module, layers_path: str, layout: Layout, new: NewStack, seed: int, step: int) -> None:
    """Fill the blocks of ``new`` in place, as its ``op`` says (see the module docstring)."""
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    blocks = model.get_submodule(layers_path)
    init_weights = getattr(model, "_init_weights", None)
    for target, source in zip(layout.stack_blocks(new.stack), new.sources, strict=True):
        block = blocks[target]
        if new.op == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((seed * 1_000_003 + step * 1_009 + target) % (2**63))
                for param in block.parameters():
                    param.__dict__.pop("_is_hf_initialized", None)
                for module in block.modules():
                    init_weights(module)
            continue
        own = {_base_name(n): p for n, p in block.named_parameters() if "lora_" not in n}
        for name, param in blocks[source].named_parameters():
            if "lora_" not in name:
                own[_base_name(name)].copy_(dequantize_bnb_weight(param).reshape(own[_base_name(name)].shape))
        if new.op == "identity":
            for name in output_projections(block):
                module = block.get_submodule(name)
                module = getattr(module, "base_layer", module)  # under a PEFT LoRA wrapper
                module.weight.zero_()
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
