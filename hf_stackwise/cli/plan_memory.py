"""Memory per rank for ``hf-stackwise plan --world-size N``: the plan's one-process estimate under DDP and FSDP2.

Both engines give every rank its own micro-batch, so activations per rank are the one-process figure. Per phase:

- **DDP** replicates the weights and the optimizer state on every rank. Gradients are held twice: in the
  parameters' ``.grad`` and in DDP's flat gradient buckets, which hf_stackwise re-registers at every transition
  so they hold the phase's trainable parameters only (DDP's default ``gradient_as_bucket_view: false``).
- **FSDP2** (``fully_shard`` per block, then the root) shards weights, gradients and optimizer state on dim 0:
  each rank holds ``ceil(rows / N)`` rows of every tensor (the padded shard, what rank 0 holds; about total / N).
  On top, what is all-gathered while it computes: the root's own parameters (embeddings, final norm, head —
  the root stays gathered from forward to backward) and two blocks (the one computing and the one prefetched),
  and the unsharded gradients of one trainable block and of the root's trainable units before their
  reduce-scatter. Buffers are replicated. LoRA tensors shard like the rest (A on its ``r`` rows, B on its output
  rows). A 4-bit weight's packed values shard in their storage dtype (``model.quantization.quant_storage``; ``auto``
  packs them in the dtype FSDP2 gathers in), ``ceil(rows / N)`` rows of ``numel / 2 / storage bytes``; with
  ``uint8`` storage accelerate leaves them whole on every rank. Their quantization state (absmax, code tables) is not
  a parameter and stays whole on every rank.
"""

from __future__ import annotations

import math

from ..cache.policy import per_rank_hit_rates
from ..rack.quantization import quant_storage
from ..schedule.phases import stack_unit
from .plan import MIB, Plan, _mib

ROOT_UNITS = ("embeddings", "head")


STORAGE_BYTES = {"uint8": 1, "float32": 4, "bfloat16": 2, "float16": 2}


def _shard(numel_bytes: tuple[int, int], rows: int | None, world: int, storage: int = 0) -> float:
    """Bytes a rank holds of one tensor; ``storage``: a 4-bit weight's storage bytes (0: not 4-bit)."""
    numel, nbytes = numel_bytes
    if storage:  # half a byte per value, packed in the storage dtype, then the quantization state
        if storage == 1:  # uint8: accelerate excludes it from sharding
            return nbytes
        packed = numel // 2
        return math.ceil(packed // storage / world) * storage + (nbytes - packed)
    if not rows or numel == 0:
        return nbytes / world
    return nbytes * math.ceil(rows / world) / rows


def _unit_bytes(plan: Plan, units) -> dict[str, tuple[int, int]]:
    """Distinct tensors (name → (numel, bytes)) of the given units (a tied tensor once)."""
    found: dict[str, tuple[int, int]] = {}
    for unit in units:
        found.update(plan.unit_tensors.get(unit, {}))
    return found


def per_rank(plan: Plan, world: int, training: dict | None = None) -> list[dict]:
    """One row per phase: ``{"phase", "ddp": {...}, "fsdp2": {...}}`` in bytes per rank (``training``: the recipe's
    section, which picks a 4-bit base's storage dtype)."""
    rows_of = plan.tensor_rows
    storage = STORAGE_BYTES[quant_storage(plan.quantization or {}, {**(training or {}), "fsdp": True})]
    every = _unit_bytes(plan, plan.unit_tensors)
    params = sum(b for _, b in every.values())
    buffers = max(plan.phases[0].memory["weights"] - params, 0) if plan.phases else 0
    four_bit = plan.quantized_tensors
    sharded = sum(_shard(t, rows_of.get(n), world, storage if n in four_bit else 0) for n, t in every.items())
    sharded_weights = sharded + buffers
    root = _unit_bytes(plan, [u for u in plan.unit_tensors if u in ROOT_UNITS])
    blocks = [
        (plan.boundaries[s + 1] - plan.boundaries[s], sum(b for _, b in _unit_bytes(plan, [stack_unit(s)]).values()))
        for s in range(plan.num_stacks)
    ]
    block = max((size / count for count, size in blocks if count), default=0.0)
    gathered_weights = sum(b for _, b in root.values()) + 2 * block
    out = []
    for phase in plan.phases:
        m = phase.memory
        ddp = {
            "weights": m["weights"],
            "gradients": m["gradients"],
            "buckets": m["gradients"],
            "optimizer": m["optimizer"],
            "activations": m["activations"],
        }
        ddp["total"] = sum(ddp.values())
        trainable = _unit_bytes(plan, phase.units)
        root_grads = sum(b for _, b in _unit_bytes(plan, [u for u in phase.units if u in ROOT_UNITS]).values())
        block_grads = max((_per_block(plan, u) for u in phase.units if u not in ROOT_UNITS), default=0.0)
        fsdp = {
            "weights": sharded_weights,
            "gathered": gathered_weights + root_grads + block_grads,
            "gradients": sum(_shard(t, rows_of.get(n), world) for n, t in trainable.items()),
            "optimizer": m["optimizer"] * _shard_fraction(plan, world),
            "activations": m["activations"],
        }
        fsdp["total"] = sum(fsdp.values())
        out.append({"phase": phase.name, "ddp": ddp, "fsdp2": fsdp})
    return out


def _per_block(plan: Plan, unit: str) -> float:
    """Bytes of one block's share of a stack unit (``stack_3``, ``stack_3.lora``, ...)."""
    try:
        s = int(unit.split("_", 1)[1].split(".", 1)[0])
    except (IndexError, ValueError):
        return 0.0
    blocks = plan.boundaries[s + 1] - plan.boundaries[s]
    return sum(b for _, b in plan.unit_tensors.get(unit, {}).values()) / max(blocks, 1)


def _shard_fraction(plan: Plan, world: int) -> float:
    """Bytes a rank holds of a sharded tensor set, as a fraction of the whole (padding included)."""
    every = {n: t for n, t in _unit_bytes(plan, plan.unit_tensors).items() if n not in plan.quantized_tensors}
    total = sum(b for _, b in every.values())
    return sum(_shard(t, plan.tensor_rows.get(n), world) for n, t in every.items()) / max(total, 1)


def format_per_rank(plan: Plan, world: int, training: dict | None = None) -> str:
    """The per-rank tables printed under the one-process estimate."""
    rows = per_rank(plan, world, training)
    lines = [
        "",
        f"memory per rank on {world} ranks in MiB, DDP: weights and optimizer state replicated, the phase's "
        "gradients in .grad and in DDP's buckets",
        f"{'phase':<14} {'weights':>10} {'gradients':>10} {'buckets':>10} {'optimizer':>10} {'activations':>12} "
        f"{'total':>10}",
    ]
    for row in rows:
        d = row["ddp"]
        lines.append(
            f"{row['phase']:<14} {_mib(d['weights']):>10} {_mib(d['gradients']):>10} {_mib(d['buckets']):>10} "
            f"{_mib(d['optimizer']):>10} {_mib(d['activations']):>12} {_mib(d['total']):>10}"
        )
    lines += [
        "",
        f"memory per rank on {world} ranks in MiB, FSDP2: weights, gradients and optimizer state sharded 1/{world}; "
        "gathered: the root's parameters and two blocks while they compute, and their gradients before the "
        "reduce-scatter",
        f"{'phase':<14} {'weights':>10} {'gathered':>10} {'gradients':>10} {'optimizer':>10} {'activations':>12} "
        f"{'total':>10}",
    ]
    for row in rows:
        f = row["fsdp2"]
        lines.append(
            f"{row['phase']:<14} {_mib(f['weights']):>10} {_mib(f['gathered']):>10} {_mib(f['gradients']):>10} "
            f"{_mib(f['optimizer']):>10} {_mib(f['activations']):>12} {_mib(f['total']):>10}"
        )
    lines += format_cache_per_rank(plan, world)
    ddp_peak = max(r["ddp"]["total"] for r in rows)
    fsdp_peak = max(r["fsdp2"]["total"] for r in rows)
    lines.append(f"peak per rank: DDP {ddp_peak / MIB:,.1f} MiB, FSDP2 {fsdp_peak / MIB:,.1f} MiB")
    return "\n".join(lines)


def format_cache_per_rank(plan: Plan, world: int) -> list[str]:
    """The activation cache under DDP on one node: its ranks share one store, so each hits as one process would with
    their rows; beside it, what one store per rank (each node of one rank) would hit."""
    decisions = [p.cache for p in plan.phases]
    if not any(d is not None and d.on and d.cut for d in decisions):
        return []
    rates = per_rank_hit_rates(decisions, world, stores=1)
    separate = per_rank_hit_rates(decisions, world)
    batch = plan.batch_size
    lines = [
        "",
        f"activation cache per rank on {world} ranks of one node, DDP: the node's ranks share one store, so a row "
        "stored by any of them hits on all (one store per rank: a row hits only where that rank stored it)",
        f"{'phase':<14} {'cache':<5} {f'hit rate per rank, batch {batch} each':>32} "
        f"{'one store per rank':>20} {'one process':>12}",
    ]
    for phase, d, rate, apart in zip(plan.phases, decisions, rates, separate):
        if rate is None:
            lines.append(f"{phase.name:<14} {'off':<5}")
            continue
        lines.append(f"{phase.name:<14} {'on':<5} {rate:>32.0%} {apart:>20.0%} {d.hit_rate:>12.0%}")
    return lines
