"""Sharded training: FSDP2 with phase transitions, and why FSDP1 and DeepSpeed are refused when the trainable set
changes.

FSDP2 (``torch.distributed.fsdp.fully_shard``, what accelerate and the Trainer run with ``fsdp_config.version: 2``)
keeps one sharded ``DTensor`` per parameter, so flipping ``requires_grad`` on it between steps is a per-parameter
change it supports. The trainer keeps the superset rule as under DDP: every parameter that trains in any phase is
trainable when the optimizer is built and accelerate wraps the model (so accelerate's fp32 upcast under mixed
precision and the optimizer's swap to the sharded parameters see all of them); phase 0's freezing is applied at the
first training step, after wrapping, on the sharded parameters, identically on every rank. Three details need help:

- FSDP2 fixes each parameter group's original and reduce dtypes at its first forward from the parameters trainable
  then; with a bf16 ``MixedPrecisionPolicy`` a block frozen at that moment and unfrozen later fails in backward
  ("attempting to assign a gradient with dtype BFloat16 to a tensor with grad_dtype Float"). After every transition
  the groups' mixed-precision dtypes are computed again (:func:`refresh_mixed_precision`); that uses FSDP2 internals,
  verified on torch :data:`VERIFIED_TORCH` only, so other versions are refused when they would need it.
- A forward (an evaluation) leaves modules with ``reshard_after_forward=False`` holding unsharded parameters, which
  would not see a ``requires_grad`` change and are not the optimizer's: the modules are resharded before the
  optimizer is built and before every transition (:func:`reshard`).
- Resume loads the optimizer state through torch's distributed state-dict API, which first creates state for every
  trainable parameter; only parameters with saved state are trainable while it loads
  (:func:`only_saved_state_trainable`), so a resumed run is bitwise the uninterrupted one.
- The trainer's frozen-parameter checksums read each rank's local shard (:func:`local`); checkpoints and the final
  model are full state dicts gathered on rank 0 (``FULL_STATE_DICT``), the files export reads.
- Growth initialises a new stack from the full tensors of its blocks and sources (:func:`gathered`), so a random
  stack draws what one process draws. LoRA adapters are sharded like full weights; adapter runs gather them to save
  and shard them to load. A 4-bit base shards when its packed weights are stored in the dtype FSDP2 gathers in
  (``model.quantization.quant_storage: auto``); a float32 storage under a bf16 policy is refused (cast, measured).

DeepSpeed ZeRO and FSDP1 fix the optimizer's partition (flat parameters) when they wrap the model: parameters frozen
then are left out of the optimizer for good, and parameters frozen later keep moving through momentum and weight
decay (DeepSpeed ZeRO-2/3 with two processes: 1.4e-2 off, no error). They are refused for schedules whose trainable set
changes; with one fixed trainable set they would be correct in principle, but no test runs them
(DeepSpeed is not installed on the CPU test machines, and accelerate's FSDP1 does not start on CPU), so they are
refused as unverified too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping

import torch

from ..errors import RecipeError

VERIFIED_TORCH = (2, 13)  # the torch minor version the mixed-precision refresh was verified on

# `fsdp_config` keys transformers' TrainingArguments reads (a leading `fsdp_` is stripped, as transformers does)
FSDP_CONFIG_KEYS = frozenset(
    {
        "version",
        "min_num_params",
        "transformer_layer_cls_to_wrap",
        "auto_wrap_policy",
        "cpu_offload",
        "cpu_ram_efficient_loading",
        "state_dict_type",
        "activation_checkpointing",
        "reshard_after_forward",
        "forward_prefetch",
        "backward_prefetch",
        "use_orig_params",
        "sync_module_states",
        "limit_all_gathers",
        "xla",
        "xla_fsdp_v2",
        "xla_fsdp_grad_ckpt",
        "xla_fsdp_settings",
    }
)
DDP_CONFIG = "recipes/accelerate/multi_gpu_ddp.yaml"
FSDP2_CONFIG = "recipes/accelerate/fsdp2.yaml"
DEEPSPEED_REASON = (
    "DeepSpeed ZeRO fixes the optimizer's partition when it wraps the model: parameters frozen then never enter "
    "the optimizer, and parameters frozen later keep moving through momentum and weight decay (measured on 2 "
    "processes: 1.4e-2 off, no error)"
)
FSDP1_REASON = (
    "FSDP1 (deprecated in transformers) flattens each wrapped module's parameters into one flat parameter whose "
    "trainability and optimizer state are fixed at wrapping, the same design as ZeRO's partition (which measured "
    "1.4e-2 off with a changing trainable set, no error)"
)


def _flag(env: Mapping[str, str], key: str) -> bool:
    return env.get(key, "").lower() in ("1", "true")


def requested_engine(training: Mapping, env: Mapping[str, str] | None = None) -> tuple[str | None, str, dict]:
    """The sharding engine a run asks for (``deepspeed``, ``fsdp1``, ``fsdp2`` or None), the key that asks, and the
    FSDP settings (the recipe's ``fsdp_config``, or accelerate's ``FSDP_*`` environment)."""
    env = os.environ if env is None else env
    if training.get("deepspeed"):
        return "deepspeed", "training.deepspeed", {}
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed", "the accelerate config (distributed_type: DEEPSPEED)", {}
    if training.get("fsdp"):
        config = training.get("fsdp_config") or {}
        if not isinstance(config, Mapping):
            raise RecipeError(
                "training.fsdp_config: give the FSDP settings as a mapping in the recipe, e.g. "
                "{version: 2, state_dict_type: FULL_STATE_DICT}"
            )
        config = {(str(k)[5:] if str(k).startswith("fsdp_") else str(k)): v for k, v in config.items()}
        if config.get("version", 2) not in (1, 2, "1", "2"):
            raise RecipeError(
                f"training.fsdp_config.version: {config['version']!r}; use 2 (FSDP2; 1 is FSDP1, deprecated)"
            )
        engine = "fsdp2" if int(config.get("version", 2)) == 2 else "fsdp1"
        return engine, "training.fsdp", config
    if _flag(env, "ACCELERATE_USE_FSDP"):
        version = env.get("FSDP_VERSION", "1")
        config = {"version": int(version), "state_dict_type": env.get("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT")}
        engine = "fsdp2" if version == "2" else "fsdp1"
        return engine, "the accelerate config (distributed_type: FSDP)", config
    return None, "", {}


def check_sharding(
    training: Mapping,
    schedule,
    base: int | tuple[int, ...],
    quantized: bool | Mapping = False,
    env: Mapping[str, str] | None = None,
) -> str | None:
    """Refuse, naming the key and the reason, a sharded run that would be wrong or is not verified; returns the
    engine (None without sharding). Reads the recipe and the rack only, so it runs before any weight loads.
    ``quantized``: the recipe's ``model.quantization`` (or True for a 4-bit base)."""
    engine, where, config = requested_engine(training, env)
    if engine is None:
        return None
    changes = len(set(schedule.phase_units(base))) > 1 or schedule.grows()
    if engine in ("deepspeed", "fsdp1"):
        reason = DEEPSPEED_REASON if engine == "deepspeed" else FSDP1_REASON
        if changes:
            raise RecipeError(
                f"{where}: the schedule changes which parameters train, and {reason}; shard with FSDP2 "
                f"(training.fsdp_config: {{version: 2}}, or {FSDP2_CONFIG}) or launch with DDP ({DDP_CONFIG})"
            )
        what = "DeepSpeed" if engine == "deepspeed" else "FSDP1 (deprecated in transformers)"
        raise RecipeError(
            f"{where}: the trainable set never changes here, but {what} is not verified with hf_stackwise (no test "
            "runs it: the tests run on CPU), so its per-unit optimizer groups and checkpoints could be silently "
            f"wrong; shard with FSDP2 (training.fsdp_config: {{version: 2}}, or {FSDP2_CONFIG}) or launch with "
            f"DDP ({DDP_CONFIG})"
        )
    unknown = sorted(k for k in config if k not in FSDP_CONFIG_KEYS)
    if unknown:
        known = ", ".join(sorted(k for k in FSDP_CONFIG_KEYS if not k.startswith("xla")))
        raise RecipeError(
            f"training.fsdp_config.{unknown[0]}: not an FSDP setting transformers reads (it would be ignored "
            f"silently); use one of {known}"
        )
    state_dict_type = str(config.get("state_dict_type", "FULL_STATE_DICT")).upper()
    if state_dict_type != "FULL_STATE_DICT":
        key = "training.fsdp_config.state_dict_type" if where == "training.fsdp" else "fsdp_state_dict_type"
        raise RecipeError(
            f"{key}: {state_dict_type} saves no model file in checkpoints or at the end of the run (the Trainer "
            "writes only sharded state), so neither `hf-stackwise export` nor the checkpoint layout work; use "
            "FULL_STATE_DICT"
        )
    launched = (env if env is not None else os.environ).get("ACCELERATE_MIXED_PRECISION", "no")
    mixed = bool(training.get("bf16") or training.get("fp16")) or launched in ("bf16", "fp16")
    if training.get("fp16") or launched == "fp16":
        raise RecipeError(
            f"training.fp16 with {where} (FSDP2): fp16 loss scaling of sharded gradients is not verified with phase "
            "transitions; use `bf16: true`"
        )
    storage = quantized.get("quant_storage", "auto") if isinstance(quantized, Mapping) else "auto"
    if quantized and mixed and storage in ("float32", "float16"):
        raise RecipeError(
            f"model.quantization.quant_storage: {storage} with bf16 under {where} (FSDP2): the bf16 mixed-precision "
            "policy casts every floating parameter to bfloat16 before gathering it, the packed 4-bit bytes included "
            "(measured: RuntimeError \"shape '[64, 32]' is invalid for input of size 1024\"); use "
            "`quant_storage: bfloat16` (or `auto`)"
        )
    if mixed and changes:
        check_torch_version()
    return engine


def storage_settings(training: Mapping, env: Mapping[str, str] | None = None) -> dict:
    """What picks a 4-bit base's storage dtype (``quant_storage: auto``): whether the run shards with FSDP2 and
    computes in bf16, from the recipe or from accelerate's launch environment."""
    env = os.environ if env is None else env
    engine = requested_engine(training, env)[0]
    bf16 = bool(training.get("bf16")) or env.get("ACCELERATE_MIXED_PRECISION", "no") == "bf16"
    return {"fsdp": engine == "fsdp2", "bf16": bf16}


def check_torch_version(version: str | None = None) -> None:
    """FSDP2 with mixed precision and a changing trainable set needs the dtype refresh, verified on one version."""
    version = torch.__version__ if version is None else version
    major, minor = (int(x) for x in version.split("+")[0].split(".")[:2])
    if (major, minor) != VERIFIED_TORCH:
        raise RecipeError(
            f"training.bf16 with training.fsdp (FSDP2): torch {version} is installed, but refreshing FSDP2's "
            f"mixed-precision dtypes after a phase unfreezes a block (needed because FSDP2 fixes them at its first "
            f"forward) was verified on torch {VERIFIED_TORCH[0]}.{VERIFIED_TORCH[1]} only; install torch "
            f"{VERIFIED_TORCH[0]}.{VERIFIED_TORCH[1]}, or train in float32 (bf16: false), or use DDP"
        )


def sharding_settings(args) -> dict:
    """The sharding-related fields of ``TrainingArguments``, as :func:`check_sharding` reads them from a recipe."""
    keys = ("fsdp", "fsdp_config", "deepspeed", "bf16", "fp16")
    return {k: getattr(args, k, None) for k in keys}


def quantized(model) -> dict | bool:
    """A quantized model's storage dtype as ``model.quantization`` names it (``{"quant_storage": ...}``), else
    False."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return False
    config = config if isinstance(config, dict) else config.to_dict()
    return {"quant_storage": str(config.get("bnb_4bit_quant_storage", "uint8")).removeprefix("torch.")}


# ---- what the trainer calls under FSDP2 ------------------------------------------------------------------------


def is_fsdp2(accelerator) -> bool:
    """Whether the run shards with FSDP2."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return plugin is not None and getattr(plugin, "fsdp_version", 1) == 2


def fsdp_modules(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(model) -> None:
    """Free the unsharded parameters a forward left behind (modules with ``reshard_after_forward=False``), so the
    parameters the optimizer and checksums see are the sharded ones."""
    for module in fsdp_modules(model):
        module.reshard()


def refresh_mixed_precision(model) -> None:
    """After a transition, recompute every FSDP2 parameter group's mixed-precision dtypes from the parameters that
    are trainable now (FSDP2 computes them once, at its first forward)."""
    for module in fsdp_modules(model):
        state = module._get_fsdp_state()
        group = getattr(state, "_fsdp_param_group", None)
        if group is None:
            continue
        if not hasattr(group, "_init_mp_dtypes"):
            check_torch_version()  # a version without the verified internals
            raise RuntimeError("FSDP2 parameter groups have no `_init_mp_dtypes` on this torch version")
        group._init_mp_dtypes()


def mixed_precision(accelerator) -> bool:
    """Whether FSDP2 casts parameters for compute (a ``MixedPrecisionPolicy`` with a ``param_dtype``)."""
    policy = getattr(accelerator.state.fsdp_plugin, "mixed_precision_policy", None)
    return policy is not None and getattr(policy, "param_dtype", None) is not None


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A rank's own shard of a sharded parameter (the tensor itself otherwise)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@contextlib.contextmanager
def gathered(*modules: torch.nn.Module):
    """Inside the context the modules hold full (unsharded) plain tensors in place of their FSDP2 shards; on exit
    each rank keeps its own shard of what the context left in them. Every rank must enter it, with the same modules
    (each full tensor is one all-gather). Growth initialises new stacks this way, so a grown stack is the same
    function of the full tensors, the seed and the step whatever the number of ranks (DTensor's random ops draw
    per shard: measured 0.13 off). Without sharded parameters it changes nothing."""
    from torch.distributed.tensor import distribute_tensor

    swapped, seen = [], set()
    for module in modules:
        for owner in module.modules():
            if id(owner) in seen:
                continue
            seen.add(id(owner))
            for name, param in list(owner._parameters.items()):
                if param is None or not hasattr(param, "full_tensor"):
                    continue
                full = torch.nn.Parameter(param.full_tensor().detach().clone(), requires_grad=param.requires_grad)
                if name == "weight" and getattr(owner, "quant_state", None) is not None:  # packed 4-bit bytes
                    full = _packed_4bit(full, owner)
                owner._parameters[name] = full
                swapped.append((owner, name, param, full))
    try:
        yield
    finally:
        with torch.no_grad():
            for owner, name, param, full in swapped:
                owner._parameters[name] = param
                shard = distribute_tensor(full.detach(), param.device_mesh, param.placements, src_data_rank=None)
                param.to_local().copy_(shard.to_local())


def _packed_4bit(full: torch.Tensor, module) -> torch.nn.Parameter:
    """A gathered packed weight as the ``Params4bit`` it is in one process (FSDP2 keeps its quantization state on the
    module, as bitsandbytes does for FSDP), so growth can dequantize it."""
    from bitsandbytes.nn import Params4bit

    return Params4bit(
        full.data,
        requires_grad=False,
        quant_state=module.quant_state,
        quant_storage=full.dtype,
        bnb_quantized=True,
    )


def arranged_state_dict(state_dict: dict, layers_path: str, blocks: list[int]) -> dict:
    """A gathered full state dict (every physical block) renamed as ``rack.stored_as`` registers the blocks: block
    ``blocks[i]`` becomes block ``i``, blocks not in ``blocks`` are dropped."""
    prefix, position = layers_path + ".", {b: i for i, b in enumerate(blocks)}
    arranged = {}
    for name, tensor in state_dict.items():
        if not name.startswith(prefix):
            arranged[name] = tensor
            continue
        block, rest = name[len(prefix) :].split(".", 1)
        if int(block) in position:
            arranged[f"{prefix}{position[int(block)]}.{rest}"] = tensor
    return arranged


@contextlib.contextmanager
def only_saved_state_trainable(trainer, checkpoint: str | None):
    """Resume under FSDP2: while the optimizer state loads, only the parameters the checkpoint holds state for are
    trainable. torch's loader first steps every trainable parameter with zero gradients to create its state; a
    superset parameter that had not trained before the checkpoint would keep that state (an Adam step count of 1
    instead of none) and train differently from the uninterrupted run. The phase sets the flags again at the next
    step."""
    if checkpoint is None or not is_fsdp2(trainer.accelerator):
        yield
        return
    import torch.distributed as dist
    from accelerate.utils.constants import OPTIMIZER_NAME

    names = [None]
    if trainer.accelerator.is_main_process:  # with a full state dict, rank 0 reads the file and broadcasts it
        path = os.path.join(checkpoint, f"{OPTIMIZER_NAME}.bin")
        names = [sorted(torch.load(path, weights_only=True, mmap=True)["state"]) if os.path.isfile(path) else None]
    if dist.is_initialized():
        dist.broadcast_object_list(names, src=0)
    if names[0] is None:  # no full optimizer file: leave the loader as it is
        yield
        return
    saved = set(names[0])
    reshard(trainer.model)
    frozen = [p for n, p in trainer.model.named_parameters() if p.requires_grad and n not in saved]
    for param in frozen:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in frozen:
            param.requires_grad_(True)
