"""What makes a frozen prefix's output differ between two visits of one row, or makes the loss read more than the
cut: found in the settings, the model config and, once the trainer holds the model, the modules below the cut.

- **settings**: ``training.neftune_noise_alpha`` (the Trainer hooks fresh noise onto the embedding output);
- **config**: any probability of a stochastic operation (keys naming dropout, drop, jitter or noise: dropout,
  layer drop, MoE router jitter, ...) and outputs collected from every layer (``output_router_logits`` for an MoE
  load-balancing loss, ``output_hidden_states``, ``output_attentions``: on a hit the prefix never runs);
- **modules** that run below the cut (the embeddings and whatever the model registers before its block list, and
  the prefix blocks): dropout modules with ``p > 0``, stochastic probabilities kept as module attributes (what a
  functional dropout or a router jitter reads), and forward hooks or pre-hooks (one on the embeddings is kept when
  a probe shows its output equals the module's own; any other hook is a hazard), as well as global module hooks.

Every hazard is a sentence that starts with the key or the module it comes from.
"""

from __future__ import annotations

import re

STOCHASTIC = re.compile(r"dropout|drop|jitter|noise")
AFTER_THE_CUT = ("classifier", "summary", "cls_", "head_", "final_")  # config keys of heads, never below the cut
COLLECTED = {
    "output_router_logits": "the MoE load-balancing loss collects router logits from every layer",
    "output_hidden_states": "the outputs collect every layer's hidden state",
    "output_attentions": "the outputs collect every layer's attention weights",
}
NEFTUNE = (
    "training.neftune_noise_alpha: the noise changes the embeddings on every step, so the cache cannot replay them"
)


def _probability(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1


def config_hazard(config) -> str | None:
    """The first stochastic probability or collected output in ``config`` (and its text config), else None."""
    configs = [config]
    text = getattr(config, "get_text_config", lambda: config)()
    if text is not config:
        configs.append(text)
    for cfg in configs:
        values = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
        for key, why in COLLECTED.items():
            if getattr(cfg, key, False) is True:
                return f"model.config.{key}: {why}; on a hit the prefix does not run, so they would be missing"
        for key in sorted(values):
            if STOCHASTIC.search(key) and not key.startswith(AFTER_THE_CUT) and _probability(values[key]):
                return (
                    f"model.config.{key}={values[key]}: the prefix is stochastic in training mode, so its output "
                    "differs between visits"
                )
    return None


def settings_hazard(neftune_noise_alpha) -> str | None:
    return NEFTUNE if neftune_noise_alpha else None


def prefix_modules(model, layers_path: str, blocks, prefix) -> list[tuple]:
    """``(name, module, kind)`` of what runs below the cut: ``"before"`` (registered before the block list and not
    containing it: embeddings, embedding dropout, rotary tables), ``"around"`` (the modules that contain the block
    list: only their attributes apply to every block), ``"block"`` (inside a prefix block)."""
    out: list[tuple] = []
    for name, module in model.named_modules():
        if name == layers_path:
            break
        if layers_path.startswith(name + ".") or not name:
            out.append((name, module, "around"))
        else:
            out.append((name, module, "before"))
    for b in prefix:
        out.extend((f"{layers_path}.{b}.{n}".rstrip("."), m, "block") for n, m in blocks[b].named_modules())
    return out


def _hooks(module) -> list:
    return [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]


def _same_output_probe(module) -> bool:
    """For an embedding with hooks: whether two hooked calls in training mode equal the unhooked forward (the RNG
    streams are kept as they were)."""
    import torch
    from torch import nn

    if not isinstance(module, nn.Embedding):
        return False
    ids = torch.arange(min(4, module.num_embeddings), device=module.weight.device)[None]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    mode = module.training
    try:
        module.train(True)  # what the hooks see in a training step (NEFTune adds noise only then)
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            plain = module.forward(ids)
            hooked = [module(ids) for _ in range(2)]
    finally:
        module.train(mode)
    return all(isinstance(h, torch.Tensor) and torch.equal(h, plain) for h in hooked)


def module_hazard(modules: list[tuple]) -> str | None:
    """The first module below the cut that is stochastic in training mode or carries a forward hook, else None."""
    from torch import nn
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return "a global module forward hook is registered: it may change the prefix's output between visits"
    for name, module, kind in modules:
        where = f"model.{name}" if name else "the model"
        if kind != "around" and isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"{where}: {type(module).__name__}(p={module.p}) is random in training mode, so the prefix differs"
        for key, value in vars(module).items():
            if not key.startswith("_") and STOCHASTIC.search(key) and _probability(value):
                return f"{where}.{key}={value}: the prefix is stochastic in training mode, so its output differs"
        hooks = _hooks(module) if kind != "around" else []
        if hooks and not _same_output_probe(module):
            names = ", ".join(getattr(h, "__name__", type(h).__name__) for h in hooks)
            return (
                f"{where}: a forward hook ({names}) changes what the prefix computes on each call, so a stored "
                "hidden state is stale"
            )
    return None
