"""DDP that pays only for what trains: the reducer holds gradient buckets for the phase's parameters alone.

``DistributedDataParallel`` registers, when it wraps the model, every parameter that requires a gradient then,
and allocates flat gradient buckets for all of them. hf_stackwise wraps with the whole superset trainable (a
parameter frozen at wrap time would never be synchronized), so without help a block-coordinate schedule keeps
bucket memory for every block and all-reduces zeros for the frozen ones at every step. At each transition,
:func:`register_trainable` rebuilds the wrapper's reducer, in place, over the parameters that require a
gradient now — the same steps DDP itself takes when it is unpickled. The wrapper object stays the one the
Trainer and accelerate hold (``no_sync`` and gradient accumulation keep working), nothing is broadcast (ranks
are already identical), and each rank does the same at the same step, so the ranks stay bitwise equal: an
element's all-reduce does not depend on which bucket holds it.

Because the reducer holds exactly the phase's trainable parameters, DDP needs no search for unused parameters
(``find_unused_parameters``, an extra autograd-graph walk per step and a warning on every rank when it finds
none) as long as every trainable parameter takes part in every forward: the schedule sees to that for stacks,
adapters, embeddings and head. What it cannot promise is a model that skips parameters by itself — MoE routing
(an expert no token chose), layer drop, stochastic depth — which :func:`unused_parameter_reason` reads from the
config; only then does hf_stackwise ask DDP to search (:func:`find_unused_parameters`).
"""

from __future__ import annotations

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..errors import RecipeError

KEY = "training.ddp_find_unused_parameters"


def unused_parameter_reason(config) -> str | None:
    """Why a forward of this model may leave a trainable parameter without gradient, or None: a mixture of
    experts (routing), layer drop or stochastic depth in the config."""
    if config is None:
        return None
    values = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    for section in ("text_config", "decoder", "encoder"):  # composite configs keep the blocks' keys one level down
        if isinstance(values.get(section), dict):
            values = {**values[section], **values}
    for key, value in sorted(values.items()):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if "experts" in key and not key.endswith("per_tok") and value > 1:
            return f"the model routes tokens to experts ({key}: {value}); an expert no token chose gets no gradient"
        if ("layerdrop" in key or "drop_path" in key) and value > 0:
            return f"the model drops whole layers at random ({key}: {value}); a dropped layer gets no gradient"
    return None


def find_unused_parameters(setting: bool | None, config) -> bool:
    """DDP's ``find_unused_parameters`` for a run: the user's setting, else search only where the model may skip
    parameters. Refuses ``false`` where it would fail ("Expected to have finished reduction ...")."""
    reason = unused_parameter_reason(config)
    if setting is False and reason is not None:
        raise RecipeError(
            f"{KEY}: false, but {reason}, and DDP then stops with 'Expected to have finished reduction in the prior "
            "iteration'; leave it unset (hf_stackwise turns the search on for this model)"
        )
    return reason is not None if setting is None else setting


def ddp_wrapper(model) -> DistributedDataParallel | None:
    """The ``DistributedDataParallel`` wrapper around the trained model, if the run has one."""
    return model if isinstance(model, DistributedDataParallel) else None


def bucket_bytes(ddp: DistributedDataParallel) -> int:
    """Bytes of the reducer's flat gradient buckets (as DDP's own logging data reports them)."""
    sizes = str(ddp._get_ddp_logging_data().get("bucket_sizes", ""))
    return sum(int(size) for size in sizes.split(",") if size.strip())


def register_trainable(ddp: DistributedDataParallel) -> bool:
    """Rebuild ``ddp``'s reducer over the parameters that require a gradient now; False if it already holds
    exactly those. Call it on every rank at the same step, outside forward and backward."""
    parameters, expect_sparse = ddp._build_params_for_reducer()
    current = getattr(ddp, "_stackwise_registered", None)
    if not parameters or (current is not None and [id(p) for p in current] == [id(p) for p in parameters]):
        return False
    if ddp.mixed_precision is not None or ddp._use_python_reducer or ddp._delay_all_reduce_params:
        raise NotImplementedError(
            "hf_stackwise re-registers DDP's trainable parameters at phase transitions; DDP's own mixed "
            "precision, python reducer and delayed all-reduce are not supported with it"
        )
    ddp._remove_autograd_hooks()
    ddp.reducer = None  # free the old buckets before the new ones are allocated
    ddp.logger = None
    mapping = ddp._build_debug_param_to_name_mapping(parameters)
    ddp._ddp_init_helper(parameters, expect_sparse, mapping, ddp.static_graph)
    if ddp.static_graph:
        ddp.reducer._set_static_graph()
    for hook, state in ddp._comm_hooks:
        dist._register_comm_hook(ddp.reducer, state, hook)
    ddp._has_rebuilt_buckets = False  # re-order the new buckets by the next backward's execution order
    ddp._stackwise_registered = parameters
    return True
