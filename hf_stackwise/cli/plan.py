"""``hf-stackwise plan RECIPE``: what each phase does and what it costs in memory, from the model's config only.

The model is built on the meta device (shapes, no weights), so parameter counts are exact, each tensor counted once
(a tied LM head is the input embeddings' tensor); LoRA adapter sizes come from the adapter plan and the shapes of the
linear layers they target. The recipe passes the same config checks as ``validate`` and ``train``
(:func:`hf_stackwise.cli.pipeline.check_recipe`). Memory per phase, in bytes, for one process (printed in MiB,
2^20 bytes):

1. **weights**: every parameter and buffer at the recipe's dtype; a 4-bit base stores its quantized linear layers
   as half a byte per weight plus the quantization state (absmax per 64 weights, code tables); LoRA adapters are
   float32 (PEFT keeps adapters in float32).
2. **gradients**: the parameters that train in the phase, at their own dtype (frozen units hold no gradient).
3. **optimizer state**: at the end of the phase. Every parameter that ever trains is registered with the optimizer
   from the start (the superset rule), but a state tensor is created only on a parameter's first update, so the
   state covers the union of the units trained *so far* (this phase and all before it). AdamW keeps two tensors
   per value at the parameter's dtype (one byte each for 8-bit variants); SGD none; Lion, RMSprop and Adagrad one.
4. **activations**: the tensors autograd saves for the backward pass of one micro-batch
   (``per_device_train_batch_size`` × the phase's sequence length), with the formula of
   :func:`~hf_stackwise.cli.plan_activations.block_activations` for pre-norm decoder blocks (Llama, Qwen2,
   Mistral, SmolLM2: exact up to a few small tensors; other families approximate). Blocks below the lowest unit
   that trains save nothing; every block above it does. The loss saves the float32 log-probabilities (batch × seq ×
   vocab); the logits themselves and their gradient are transient and not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..cache.policy import format_cache
from ..recipe.loader import Recipe
from ..schedule.phases import TRUNK_ADAPTER, Phase, lora_unit, trunk_unit
from .cache_checks import plan_cache
from .plan_activations import Dims, activation_bytes_per_token

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MIB = 2**20
# Names of the linear layers inside a block, by what their input is (for the LoRA inputs autograd saves).
OPTIMIZER_STATES = (("adam", 2), ("lion", 1), ("rmsprop", 1), ("adagrad", 1), ("sgd", 0), ("adafactor", 0))
DATA_FIELDS = ("max_seq_length", "task", "mask_rate", "data")  # per-phase data fields, where the schedule has them
DATA_LABELS = {"max_seq_length": "seq", "mask_rate": "mask"}


@dataclass
class PhasePlan:
    """One row of the plan."""

    index: int
    name: str
    start: int
    end: int  # exclusive
    active_depth: int
    trainable_stacks: tuple[int, ...]
    units: tuple[str, ...]
    mode: str
    trainable_params: int
    learning_rate: float
    lr_text: str
    data: dict
    memory: dict[str, float] = field(default_factory=dict)
    cache: object = None  # hf_stackwise.cache.policy.PhaseCache: the activation cache's decision
    frozen_memory: dict | None = None  # autofreeze: the memory at the deepest allowed freeze


@dataclass
class Plan:
    """The resolved schedule of a recipe with parameter counts and a memory estimate per phase."""

    recipe_path: str | None
    model: str
    model_type: str
    dtype: str
    quantization: dict | None
    layers: str
    boundaries: list[int]  # physical: the base stacks, then every stack the schedule grows
    base_sizes: tuple[int, ...]  # blocks per stack of the model as loaded, before growth
    total_steps: int
    batch_size: int
    total_params: int
    superset_params: int
    optimizer: str
    phases: list[PhasePlan]
    notes: list[str]
    schedule: object = None
    base_lr: float = 0.0
    unit_tensors: dict = field(default_factory=dict)  # unit -> {tensor name: (numel, bytes)}, for plan_memory
    tensor_rows: dict = field(default_factory=dict)  # tensor name -> dim 0 (FSDP2 shards rows)
    quantized_tensors: set = field(default_factory=set)  # the 4-bit weights (their bytes: packed values and state)

    @property
    def num_stacks(self) -> int:
        return len(self.boundaries) - 1

    def peak(self) -> dict[str, float]:
        """The phase with the largest total, and its components."""
        return max((p.memory for p in self.phases), key=lambda m: m["total"])


def _dtype_name(recipe: Recipe, config) -> str:
    dtype = recipe.model.dtype
    if dtype != "auto":
        return dtype
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(value).removeprefix("torch.") if value is not None else "float32"
    return name if name in DTYPE_BYTES else "float32"


def _in_modules(name: str, modules: list[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def _quantized_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of one bitsandbytes 4-bit weight: packed values, absmax per block of 64, code tables."""
    blocks = math.ceil(numel / 64)
    if double_quant:  # absmax as uint8, plus float32 absmax per 256 of them, a 256-entry code and an offset
        return numel // 2 + blocks + 4 * math.ceil(blocks / 256) + 64 + 1024 + 4
    return numel // 2 + 4 * blocks + 64


def tensor_names(model: nn.Module) -> dict[str, str]:
    """Every parameter name → the name of the tensor it is: a tied parameter (the LM head sharing the input
    embeddings) maps to the tensor it shares, so it is counted once.

    Shared tensors are found by identity, and by the model's tie declarations (``all_tied_weights_keys``, which
    follows ``config.tie_word_embeddings``) where a skeleton has not tied them."""
    first: dict[int, str] = {}
    names = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names[name] = first.setdefault(id(param), name)
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target in names and source in names:
            names[target] = names[source]
    return names


def quantized_weights(skeleton, layers: str, quantization, skip) -> set[str]:
    """Names of the weights a 4-bit base stores quantized: the blocks' linear layers outside ``skip``."""
    if not quantization:
        return set()
    return {
        f"{name}.weight"
        for name, module in skeleton.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(layers + ".") and not _in_modules(name, skip)
    }


def _unit_tensors(skeleton, layers: str, boundaries, dtype_bytes: int, quantization, skip) -> tuple[dict, dict, int]:
    """Parameter bytes and counts per unit (``{unit: {name: (numel, bytes)}}``), the weight bytes of the whole
    model (buffers included), and the parameter count."""
    from ..rack.rack import Rack

    rack = Rack(skeleton, layers, tuple(boundaries))
    quantized = quantized_weights(skeleton, layers, quantization, skip)
    double_quant = bool((quantization or {}).get("double_quant", True))

    def size(name: str, tensor: torch.Tensor) -> tuple[int, int]:
        if name in quantized:
            return tensor.numel(), _quantized_bytes(tensor.numel(), double_quant)
        per = dtype_bytes if tensor.is_floating_point() else tensor.element_size()
        return tensor.numel(), tensor.numel() * per

    names = tensor_names(skeleton)
    units = {
        unit: {names[name]: size(names[name], p) for name, p in params}
        for unit, params in rack.parameter_units().items()
    }
    weights, count = 0, 0
    for name, param in skeleton.named_parameters():
        if names[name] == name:
            count += param.numel()
            weights += size(name, param)[1]
    weights += sum(b.numel() * b.element_size() for b in skeleton.buffers())
    return units, weights, count


def _adapter_tensors(skeleton, layers: str, boundaries, adapter_plan: dict, targets: dict, tensor_rows: dict) -> dict:
    """LoRA parameters per unit (float32): A (``r × in``) and B (``out × r``) per targeted linear layer of each covered
    block; their dim 0 goes into ``tensor_rows``."""
    from transformers.pytorch_utils import Conv1D

    blocks = skeleton.get_submodule(layers)
    stack_of = {b: s for s in range(len(boundaries) - 1) for b in range(boundaries[s], boundaries[s + 1])}
    units: dict[str, dict] = {}
    for adapter, cfg in adapter_plan.items():
        for b in cfg["blocks"]:
            unit = trunk_unit(stack_of[b]) if adapter == TRUNK_ADAPTER else lora_unit(stack_of[b])
            for name, module in blocks[b].named_modules():
                if name.rsplit(".", 1)[-1] not in targets[adapter]:
                    continue
                if isinstance(module, nn.Linear):
                    fan_in, fan_out = module.in_features, module.out_features
                elif isinstance(module, Conv1D):
                    fan_in, fan_out = module.weight.shape
                else:
                    continue
                for part, rows, cols in (("lora_A", cfg["r"], fan_in), ("lora_B", fan_out, cfg["r"])):
                    tensor = f"{layers}.{b}.{name}.{part}.{adapter}"
                    units.setdefault(unit, {})[tensor] = (rows * cols, 4 * rows * cols)
                    tensor_rows[tensor] = rows  # FSDP2 shards dim 0
    return units


def _adapter_ranks(adapter_plan: dict, targets: dict) -> dict[int, dict[str, dict[str, int]]]:
    """Block → adapter → {target module: rank}."""
    ranks: dict[int, dict[str, dict[str, int]]] = {}
    for adapter, cfg in adapter_plan.items():
        for b in cfg["blocks"]:
            ranks.setdefault(b, {})[adapter] = {t: cfg["r"] for t in targets[adapter]}
    return ranks


def _optimizer_states(optim: str) -> tuple[int, int | None]:
    """State tensors per trainable value and bytes per state element (None: the parameter's dtype)."""
    name = str(getattr(optim, "value", optim)).lower()
    per_element = 1 if "8bit" in name else None
    for prefix, states in OPTIMIZER_STATES:
        if prefix in name:
            return states, per_element
    return 2, per_element


def _releases(schedule) -> bool:
    return any(p.optimizer_state in ("reset", "release_idle") for p in schedule.phases)


def _mode(phase: Phase, num_stacks: int, new: tuple[int, ...] = ()) -> str:
    parts = [f"stacks {phase.adapter}" if phase.trainable_stacks(num_stacks, new) else "no stack"]
    if phase.autofreeze is not None:
        parts[0] += " (adaptive)"
    if phase.grow is not None:
        parts.insert(0, f"grow {phase.grow.op}")
    parts.append(f"trunk {phase.trunk}")
    if phase.trains_embeddings():
        parts.append("+emb")
    if phase.trains_head():
        parts.append("+head")
    return ", ".join(parts)


def _lr_text(phase: Phase, base_lr: float) -> tuple[float, str]:
    lr = phase.learning_rate if phase.learning_rate is not None else base_lr
    text = f"{lr:.1e} {phase.lr_schedule}"
    if phase.warmup:
        text += f", warmup {phase.warmup:g}"
    if phase.layer_lr_decay != 1.0:
        text += f", decay {phase.layer_lr_decay:g}"
    if phase.span is not None:  # a generator entry's shape runs once over all its phases
        span = phase.span
        text += f" × {span['entry']}'s {span['lr_schedule']}" + (
            f", warmup {span['warmup']:g}" if span["warmup"] else ""
        )
        text += " once over all its phases"
    return lr, text


def _phase_data(phase: Phase, recipe: Recipe) -> dict:
    data = {}
    for key in DATA_FIELDS:
        value = getattr(phase, key, None)
        if value is None and key in ("max_seq_length", "task"):
            value = recipe.data.plane.max_seq_length if key == "max_seq_length" else recipe.data.task
        if value is not None:
            data[key] = value
    return data


def resolve_steps(recipe: Recipe, args, config, known):
    """The phase boundaries: from ``training.max_steps`` (``known``); without it, epochs × steps per epoch, which
    needs the tokenized data."""
    from .pipeline import TOKENIZER_KEYS, planned_total_steps

    if known is not None:
        return known
    from ..data.loading import build_datasets
    from .preflight import load_tokenizer

    tokenizer = load_tokenizer(recipe, config, TOKENIZER_KEYS)
    train, _ = build_datasets(recipe.data, tokenizer, recipe.data.plane.max_seq_length, args.seed)
    return recipe.schedule.resolve(planned_total_steps(args, len(train) if hasattr(train, "__len__") else None))


def make_plan(recipe: Recipe) -> Plan:
    """Resolve the recipe against the model's config (no weights, no data unless epochs need it, nothing written)."""
    from ..freezing import deepest_state
    from ..rack.adapters import resolve_targets
    from ..rack.growth import allocate
    from ..schedule.layout import stack_sizes
    from .pipeline import check_recipe, meta_model

    args, config, rack, skip, adapter_plan, recipe, known = check_recipe(recipe)  # the checks `validate`/`train` run
    skeleton = meta_model(config, recipe)
    layers, base_boundaries = rack["layers"], rack["boundaries"]
    base = stack_sizes(base_boundaries)
    layout = recipe.schedule.layout(base)
    boundaries = list(layout.boundaries)  # physical: the base stacks, then every stack the schedule grows
    if layout.grows:  # grown blocks exist from the start (the superset rule) and stay in full precision
        allocate(skeleton, layers, layout)
        skip = [*skip, *(f"{layers}.{b}" for b in range(layout.num_base_blocks, layout.num_blocks))]
    resolved = resolve_steps(recipe, args, config, known)
    total_steps = resolved.total_steps

    dtype = _dtype_name(recipe, config)
    dtype_bytes = DTYPE_BYTES[dtype]
    quantization = recipe.model.quantization
    units, weight_bytes, total_params = _unit_tensors(skeleton, layers, boundaries, dtype_bytes, quantization, skip)
    targets = resolve_targets(adapter_plan, skeleton.get_submodule(layers)) if adapter_plan else {}
    tensor_rows = {n: p.shape[0] for n, p in skeleton.named_parameters() if p.dim()}
    for unit, tensors in _adapter_tensors(skeleton, layers, boundaries, adapter_plan, targets, tensor_rows).items():
        units.setdefault(unit, {}).update(tensors)
        weight_bytes += sum(b for _, b in tensors.values())
    ranks = _adapter_ranks(adapter_plan, targets)
    dims = Dims.from_config(config, skeleton.get_submodule(layers)[0])
    act = 4 if quantization else dtype_bytes  # a 4-bit base computes in compute_dtype; float32 unless given
    if quantization:
        act = DTYPE_BYTES[quantization.get("compute_dtype", "float32")]
    states, state_bytes = _optimizer_states(args.optim)
    batch = args.per_device_train_batch_size
    checkpointing = bool(args.gradient_checkpointing)

    def tensors_of(unit_names) -> dict:
        found: dict = {}
        for unit in unit_names:
            found.update(units.get(unit, {}))
        return found

    head = skeleton.get_output_embeddings()
    head_params = head.weight.numel() if head is not None else dims.hidden * dims.vocab
    cache = plan_cache(recipe, args, config, resolved, layout, base, skeleton.get_submodule(layers), head_params, act)
    ever = recipe.schedule.ever_trainable_units(base)
    phases, trained_so_far = [], set()
    for index, (start, end) in enumerate(resolved.bounds):
        phase = recipe.schedule.phases[index]
        state = resolved.state_at(start, base)
        trainable = tensors_of(state.trainable_units)
        if phase.optimizer_state in ("reset", "release_idle"):  # reset: all freed; release_idle: the idle units'
            trained_so_far = set()  # (either way only this phase's units hold state from its first step on)
        trained_so_far |= set(state.trainable_units)
        data = _phase_data(phase, recipe)
        seq = data["max_seq_length"]

        def memory_of(state, trained, seq=seq) -> dict:
            activations = (
                batch
                * seq
                * activation_bytes_per_token(
                    dims,
                    seq,
                    act,
                    state.trainable_units,
                    [(s, layout.stack_blocks(s)) for s in state.order],
                    ranks,
                    checkpointing,
                )
            )
            grads = sum(b for _, b in tensors_of(state.trainable_units).values())
            optimizer = states * sum(n * state_bytes if state_bytes else b for n, b in tensors_of(trained).values())
            memory = {"weights": weight_bytes, "gradients": grads, "optimizer": optimizer, "activations": activations}
            memory["total"] = sum(memory.values())
            return memory

        memory = memory_of(state, trained_so_far)
        frozen_memory = None
        if phase.autofreeze is not None:  # the deepest freeze: `release_idle` frees the frozen stacks' state
            deepest = deepest_state(phase, state)
            kept = deepest.trainable_units if phase.optimizer_state == "release_idle" else trained_so_far
            frozen_memory = memory_of(deepest, kept)
        lr, lr_text = _lr_text(phase, args.learning_rate)
        phases.append(
            PhasePlan(
                index=index,
                name=phase.name,
                start=start,
                end=end,
                active_depth=state.active_depth,
                trainable_stacks=state.trainable_stacks,
                units=tuple(sorted(state.trainable_units)),
                mode=_mode(phase, len(layout.orders[index]), layout.new_positions(index)),
                trainable_params=sum(n for n, _ in trainable.values()),
                learning_rate=lr,
                lr_text=lr_text,
                data=data,
                memory=memory,
                cache=cache[index] if cache else None,
                frozen_memory=frozen_memory,
            )
        )
    notes = [
        f"optimizer state: {states} tensor(s) per trained value ({getattr(args.optim, 'value', args.optim)}), for "
        "the units trained so far "
        "(state appears on a parameter's first update and stays"
        + ("; `reset` / `release_idle` phases keep only the units they train" if _releases(recipe.schedule) else "")
        + ")",
        "activations: tensors saved for backward of one micro-batch "
        f"({batch} x sequence length; {dims.attention} attention"
        + (", gradient checkpointing" if checkpointing else "")
        + "); the logits and their gradient come on top, transiently",
    ]
    if args.gradient_accumulation_steps > 1:
        notes.append(f"gradient accumulation {args.gradient_accumulation_steps}: activations are per micro-batch")
    return Plan(
        recipe_path=recipe.path,
        model=recipe.model.name_or_path,
        model_type=config.model_type,
        dtype=dtype,
        quantization=quantization,
        layers=layers,
        boundaries=list(boundaries),
        base_sizes=base,
        total_steps=total_steps,
        batch_size=batch,
        total_params=total_params,
        superset_params=sum(n for n, _ in tensors_of(ever).values()),
        optimizer=str(getattr(args.optim, "value", args.optim)),
        phases=phases,
        notes=notes,
        schedule=recipe.schedule,
        base_lr=args.learning_rate,
        unit_tensors=units,
        tensor_rows=tensor_rows,
        quantized_tensors=quantized_weights(skeleton, layers, quantization, skip),
    )


# ---- printing -----------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / MIB:,.1f}"


def _count(n: int) -> str:
    if n >= 10**9:
        return f"{n / 1e9:.2f}B"
    if n >= 10**6:
        return f"{n / 1e6:.2f}M"
    if n >= 10**3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def _stacks(indices) -> str:
    if not indices:
        return "-"
    indices = list(indices)
    if indices == list(range(indices[0], indices[-1] + 1)) and len(indices) > 1:
        return f"{indices[0]}-{indices[-1]}"
    return ",".join(str(i) for i in indices)


def format_plan(plan: Plan) -> str:
    """The plan as text: a header, one row per phase, the memory per phase, and the peak."""
    quant = ", 4-bit base" if plan.quantization else ""
    base_bounds = plan.boundaries[: len(plan.base_sizes) + 1]
    grown = ""
    if plan.num_stacks > len(plan.base_sizes):
        grown = f", growing to {plan.num_stacks} stacks over {plan.boundaries[-1]} blocks"
    lines = [
        f"{plan.recipe_path or 'recipe'}: {plan.model} ({plan.model_type}, {_count(plan.total_params)} parameters, "
        f"{plan.dtype}{quant})",
        f"rack: {len(plan.base_sizes)} stacks over {sum(plan.base_sizes)} blocks ({plan.layers}), boundaries "
        f"{base_bounds}{grown}; {plan.total_steps} steps; {_count(plan.superset_params)} parameters ever train",
        "",
        f"{'phase':<14} {'steps':>11}  {'t':<9}  {'active':<6} {'train':<7} {'mode':<38} {'trainable':>9}  "
        f"{'lr':<28} data",
    ]
    for p in plan.phases:
        t = f"{p.start / plan.total_steps:.2f}-{p.end / plan.total_steps:.2f}"
        data = ", ".join(f"{DATA_LABELS.get(k, k)} {v}" for k, v in p.data.items())
        lines.append(
            f"{p.name:<14} {f'{p.start}-{p.end - 1}':>11}  {t:<9}  {_stacks(range(p.active_depth)):<6} "
            f"{_stacks(p.trainable_stacks):<7} {p.mode:<38} {_count(p.trainable_params):>9}  {p.lr_text:<28} {data}"
        )
    lines += ["", f"memory estimate in MiB, 1 MiB = 2^20 bytes (batch {plan.batch_size}, one process)"]
    header = ("phase", "weights", "gradients", "optimizer", "activations", "total")
    lines.append(" ".join(f"{h:<14}" if i == 0 else f"{h:>{12 if i == 4 else 10}}" for i, h in enumerate(header)))
    for p in plan.phases:
        m = p.memory
        lines.append(
            f"{p.name:<14} {_mib(m['weights']):>10} {_mib(m['gradients']):>10} {_mib(m['optimizer']):>10} "
            f"{_mib(m['activations']):>12} {_mib(m['total']):>10}"
        )
        if p.frozen_memory is not None:  # autofreeze: the same phase at its deepest allowed freeze
            m = p.frozen_memory
            lines.append(
                f"{'  frozen':<14} {_mib(m['weights']):>10} {_mib(m['gradients']):>10} {_mib(m['optimizer']):>10} "
                f"{_mib(m['activations']):>12} {_mib(m['total']):>10}  ({p.name} at its deepest autofreeze)"
            )
    peak = max(plan.phases, key=lambda p: p.memory["total"])
    lines.append(f"{'peak':<14} {'':>10} {'':>10} {'':>10} {'':>12} {_mib(peak.memory['total']):>10}  ({peak.name})")
    decisions = [p.cache for p in plan.phases] if plan.phases[0].cache else None
    lines += [""] + format_cache(decisions, [p.name for p in plan.phases])
    lines += [""] + [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
