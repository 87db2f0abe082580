"""The activation model of ``plan``: what autograd saves per token for the blocks, head and loss of one phase
(see :func:`block_activations`), from the config's dimensions (:class:`Dims`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..schedule.phases import EMBEDDINGS, HEAD, TRUNK_ADAPTER, lora_unit, stack_unit, trunk_unit

ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj", "c_attn", "query", "key", "value", "qkv_proj", "Wqkv")
MLP_INPUTS = ("gate_proj", "up_proj", "c_fc", "fc1", "dense_h_to_4h", "w1", "w3")
MLP_OUTPUTS = ("down_proj", "fc2", "dense_4h_to_h", "w2")
# Optimizer state tensors per trainable value, by `training.optim` prefix (one byte each for `8bit` variants).


@dataclass
class Dims:
    """What the activation formula needs from the config."""

    hidden: int
    intermediate: int
    heads: int
    kv_dim: int  # key/value width (GQA: fewer heads than the queries)
    q_dim: int
    vocab: int
    gated: bool  # gated MLP (SwiGLU: gate_proj, up_proj) or a plain one (GPT-2's c_fc)
    attention: str  # sdpa / flash_attention_2 (saves q, k, v, out, logsumexp) or eager (also the probabilities)

    @classmethod
    def from_config(cls, config, block: nn.Module) -> Dims:
        def first(*keys, default=None):
            for key in keys:
                value = getattr(config, key, None)
                if isinstance(value, int):
                    return value
            return default

        hidden = first("hidden_size", "n_embd", "d_model")
        heads = first("num_attention_heads", "n_head")
        head_dim = first("head_dim", default=hidden // heads)
        kv_heads = first("num_key_value_heads", default=heads)
        names = {name.rsplit(".", 1)[-1] for name, _ in block.named_modules()}
        return cls(
            hidden=hidden,
            intermediate=first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
            heads=heads,
            kv_dim=kv_heads * head_dim,
            q_dim=heads * head_dim,
            vocab=first("vocab_size"),
            gated="gate_proj" in names or "w3" in names,
            attention=getattr(config, "_attn_implementation", None) or "sdpa",
        )


def block_activations(
    dims: Dims, seq: int, act: int, trains_weights: bool, lora: dict[str, int], input_needs_grad: bool
) -> float:
    """Bytes autograd saves per token for one block that takes part in the backward pass.

    ``act`` is the activation dtype's size; norms and logsumexp are float32. For a pre-norm block (x → norm → attention
    → residual → norm → MLP → residual), with h hidden, i intermediate, kv the key/value width, n the heads:

    - a block with nothing to train that gradients flow through: both norms' float32 inputs (2·4h + 2 rsqrt), the
      attention's q, k, v and output (2h + 2kv) and logsumexp (4n; eager attention: the n·seq probabilities and the
      repeated keys/values instead), the MLP's gate input, activation output and up output (3i; i for a plain MLP);
    - trainable block weights add every linear layer's input (norm outputs h + h, MLP hidden i, attention output
      already counted) and the norm outputs their weights multiply (h + h);
    - a LoRA adapter adds the inputs of the linear layers it targets and its rank-r intermediate (4r per target);
    - the lowest block that trains (nothing below it needs a gradient) does not keep its first norm's input.
    """
    h, i, kv, n = dims.hidden, dims.intermediate, dims.kv_dim, dims.heads
    norms = 2 * (4 * h + 4)
    if dims.attention == "eager":
        attention = act * (dims.q_dim + 2 * dims.q_dim + h) + act * n * seq
    else:
        attention = act * (dims.q_dim + 2 * kv + h) + 4 * n
    mlp = act * (3 * i if dims.gated else i)
    total = norms + attention + mlp
    if trains_weights:
        total += act * (4 * h + i)
    elif lora:
        targets = set(lora)
        if targets & set(ATTENTION_INPUTS):
            total += act * h
        if targets & set(MLP_INPUTS):
            total += act * h
        if targets & set(MLP_OUTPUTS):
            total += act * i
        total += 4 * sum(lora.values())
    if not input_needs_grad:
        total -= 4 * h + 4
    return total


def activation_bytes_per_token(
    dims: Dims, seq: int, act: int, trainable: frozenset, stacks, ranks, checkpointing: bool
) -> float:
    """Saved-for-backward bytes per token of the active blocks, the final norm, the head and the loss.

    ``stacks``: ``(physical stack id, its blocks)`` of the active stacks, bottom → top."""
    needs_grad = EMBEDDINGS in trainable
    per_block = []
    for s, blocks in stacks:
        for b in blocks:
            full = stack_unit(s) in trainable
            lora = {}
            for adapter, targets in ranks.get(b, {}).items():
                unit = trunk_unit(s) if adapter == TRUNK_ADAPTER else lora_unit(s)
                if unit in trainable:
                    for target, r in targets.items():
                        lora[target] = lora.get(target, 0) + r
            if needs_grad or full or lora:
                per_block.append(block_activations(dims, seq, act, full, lora, needs_grad))
                needs_grad = True
    h = dims.hidden
    if checkpointing and per_block:  # each block keeps its input; one block is recomputed at a time
        blocks = len(per_block) * act * h + max(per_block)
    else:
        blocks = sum(per_block)
    head = 4 * dims.vocab + 8  # float32 log-probabilities and the shifted labels
    if needs_grad:
        head += 4 * h + 4  # final norm input (float32) and rsqrt
    if HEAD in trainable:
        head += 2 * act * h  # the final norm's output (for its weight) and the LM head's input
    return blocks + head
