"""The rack: a model's block list grouped into contiguous stacks.

A *block* is one transformer layer; a *stack* is a contiguous group of blocks; the *rack* is the
ordered list of stacks. Parameters outside the blocks belong to two more units: ``embeddings``
(everything registered before the first block) and ``head`` (everything after the last block:
final norm, LM or MLM head). A parameter shared by both (tied embeddings) belongs to both.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from torch import nn

from ..schedule.layout import stack_sizes
from ..schedule.phases import EMBEDDINGS, HEAD, TRUNK_ADAPTER, RecipeError, lora_unit, stack_unit, trunk_unit

BASE_LAYERS_KEY = "stackwise_base_layers"  # config entry of a grown rack: the block count before growth

# Where known families keep their block list, relative to the model passed in (head model or base model).
KNOWN_LAYER_PATHS = (
    "model.layers",  # Llama, SmolLM2, Qwen2, Mistral, Gemma, Phi-3 (…ForCausalLM)
    "layers",  # the same families' base models, GPT-NeoX base
    "transformer.h",  # GPT-2, GPT-J, Falcon (…LMHeadModel)
    "h",  # GPT-2 base
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "bert.encoder.layer",  # BERT / MiniLM (…ForMaskedLM, …ForSequenceClassification)
    "roberta.encoder.layer",  # RoBERTa
    "encoder.layer",  # BERT / RoBERTa base models
    "model.decoder.layers",  # OPT
)


def num_layers_from_config(config) -> int | None:
    """The block count a transformers config declares (``num_hidden_layers`` or ``n_layer``)."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def find_layers_path(model: nn.Module, layers: str | None = None) -> str:
    """Dotted path of the model's block list: ``layers`` if given, else auto-detected."""
    if layers is not None:
        module = _get_submodule(model, layers)
        if not isinstance(module, nn.ModuleList):
            raise RecipeError(
                f"rack.layers: {layers!r} does not name a torch.nn.ModuleList of blocks in "
                f"{type(model).__name__}; point it at the list of transformer layers"
            )
        return layers
    expected = num_layers_from_config(getattr(model, "config", None))
    for path in KNOWN_LAYER_PATHS:
        module = _get_submodule(model, path)
        if isinstance(module, nn.ModuleList) and (expected is None or len(module) == expected):
            return path
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name and (expected is None or len(module) == expected)
    ]
    if len(candidates) == 1:
        return candidates[0]
    hint = f" (candidates: {', '.join(candidates)})" if candidates else ""
    raise RecipeError(
        f"rack.layers: cannot tell where {type(model).__name__} keeps its transformer blocks{hint}; set "
        "`rack.layers` to the dotted path of the block list, e.g. `model.layers`"
    )


def adapter_of(name: str) -> str | None:
    """The LoRA adapter a parameter belongs to (``...q_proj.lora_A.stack_3.weight`` → ``stack_3``), or None."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith("lora_"):
            return parts[i + 1]
    return None


def _get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def resolve_boundaries(
    num_blocks: int, blocks_per_stack: int | None = None, boundaries: list[int] | None = None
) -> tuple[int, ...]:
    """Block boundaries of the stacks: ``(0, b1, ..., num_blocks)``; stack i holds blocks [b_i, b_{i+1})."""
    if blocks_per_stack is not None and boundaries is not None:
        raise RecipeError("rack: give either `blocks_per_stack` or `boundaries`, not both")
    if boundaries is not None:
        b = list(boundaries)
        if not b or any(not isinstance(x, int) or isinstance(x, bool) for x in b):
            raise RecipeError(f"rack.boundaries: {boundaries!r} is not a list of block indices")
        if b[0] != 0:
            b = [0, *b]
        if b[-1] != num_blocks:
            if b[-1] > num_blocks:
                raise RecipeError(
                    f"rack.boundaries: {boundaries!r} goes beyond the model's {num_blocks} blocks; "
                    f"the last boundary must be at most {num_blocks}"
                )
            b.append(num_blocks)
        if any(b2 <= b1 for b1, b2 in zip(b, b[1:], strict=False)):
            raise RecipeError(f"rack.boundaries: {boundaries!r} must be strictly increasing block indices")
        return tuple(b)
    if blocks_per_stack is None:
        blocks_per_stack = 1
    if not isinstance(blocks_per_stack, int) or isinstance(blocks_per_stack, bool) or blocks_per_stack < 1:
        raise RecipeError(f"rack.blocks_per_stack: {blocks_per_stack!r} is not a positive integer")
    if num_blocks % blocks_per_stack:
        raise RecipeError(
            f"rack.blocks_per_stack: {blocks_per_stack} does not divide the model's {num_blocks} blocks; "
            "pick a divisor or give explicit `rack.boundaries`"
        )
    return tuple(range(0, num_blocks + 1, blocks_per_stack))


@dataclass
class Rack:
    """A model seen as stacks of blocks; owns the parameter → unit map and the active-depth switch."""

    model: nn.Module
    layers_path: str
    boundaries: tuple[int, ...]

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        layers: str | None = None,
        blocks_per_stack: int | None = None,
        boundaries: list[int] | None = None,
    ) -> Rack:
        path = find_layers_path(model, layers)
        # A model whose rack was already grown (hf_stackwise.rack.growth.allocate) keeps its base block count.
        num_blocks = getattr(getattr(model, "config", None), BASE_LAYERS_KEY, None) or len(model.get_submodule(path))
        return cls(model, path, resolve_boundaries(num_blocks, blocks_per_stack, boundaries))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_path)

    @property
    def num_stacks(self) -> int:
        return len(self.boundaries) - 1

    @property
    def num_blocks(self) -> int:
        return self.boundaries[-1]

    @property
    def sizes(self) -> tuple[int, ...]:
        """Blocks per stack."""
        return stack_sizes(self.boundaries)

    def stack_blocks(self, index: int) -> range:
        """Block indices of stack ``index``."""
        return range(self.boundaries[index], self.boundaries[index + 1])

    def topology(self) -> dict:
        """Plain description stored in checkpoint manifests."""
        return {"layers": self.layers_path, "num_blocks": self.num_blocks, "boundaries": list(self.boundaries)}

    def parameter_units(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Parameters per unit, in registration order; a tied parameter is listed under each unit that uses it."""
        block_stack = {}
        for s in range(self.num_stacks):
            for b in self.stack_blocks(s):
                block_stack[b] = s
        prefix = self.layers_path + "."
        units: dict[str, list[tuple[str, nn.Parameter]]] = {EMBEDDINGS: []}
        for s in range(self.num_stacks):
            units.update({stack_unit(s): [], lora_unit(s): [], trunk_unit(s): []})
        units[HEAD] = []
        seen_blocks = False
        seen: dict[str, set[int]] = {u: set() for u in units}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            if name.startswith(prefix):
                seen_blocks = True
                stack = block_stack[int(name[len(prefix) :].split(".", 1)[0])]
                adapter = adapter_of(name)
                if adapter is None:
                    unit = stack_unit(stack)
                else:
                    unit = trunk_unit(stack) if adapter == TRUNK_ADAPTER else lora_unit(stack)
            else:
                unit = HEAD if seen_blocks else EMBEDDINGS
            if id(param) not in seen[unit]:
                seen[unit].add(id(param))
                units[unit].append((name, param))
        return {u: params for u, params in units.items() if params or u in (EMBEDDINGS, HEAD) or "." not in u}

    def arranged(self, blocks: list[int], replace: dict[int, nn.Module] | None = None):
        """Context: the forward runs the physical blocks ``blocks`` in that order (see :func:`arranged`)."""
        return arranged(self.model, self.layers_path, blocks, replace)

    def active_depth(self, stacks: int):
        """Context: run only the first ``stacks`` stacks; the head reads after the last of them.

        The full block list stays registered (state dicts, checkpoints and optimizer see every block);
        only the forward pass sees the truncated list (see :func:`arranged`).
        """
        if not 1 <= stacks <= self.num_stacks:
            raise ValueError(f"active depth {stacks} is not in 1..{self.num_stacks}")
        return self.arranged(list(range(self.boundaries[stacks])))


PHYSICAL_CONFIG = "_stackwise_physical_config"  # on the block list's parent while an arrangement is active


def _parent(model: nn.Module, layers_path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = layers_path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


def _config(model: nn.Module, parent: nn.Module):
    return getattr(parent, "config", None) or getattr(model, "config", None)


def _physical_config(parent: nn.Module, config, num_blocks: int) -> dict:
    """The config's per-layer lists and layer count for the physical block list (as recorded by the outermost
    active arrangement, else as they are now)."""
    recorded = parent.__dict__.get(PHYSICAL_CONFIG)
    if recorded is not None:
        return recorded
    if config is None:
        return {}
    values = {key: getattr(config, key) for key in per_layer_config_keys(config, num_blocks)}
    values["num_hidden_layers"] = config.num_hidden_layers
    return values


def _arrange_config(config, physical: dict, blocks: list[int]) -> list[tuple[object, str, object]]:
    """Make the config describe ``blocks`` (layer count, per-layer lists); returns what to restore."""
    restore = []
    for key, value in physical.items():
        restore.append((config, key, getattr(config, key)))
        setattr(config, key, len(blocks) if key == "num_hidden_layers" else [value[b] for b in blocks])
    return restore


@contextlib.contextmanager
def arranged(model: nn.Module, layers_path: str, blocks: list[int], replace: dict[int, nn.Module] | None = None):
    """Run the physical blocks ``blocks`` in that order inside this context (a grown rack's forward view).

    As :meth:`Rack.active_depth`, the registered block list is untouched. Each block's ``layer_idx`` (what KV
    caches index by) and the config's layer count and per-layer lists follow the positions in ``blocks`` for the
    duration. Contexts nest: ``blocks`` always names physical blocks, and leaving a context restores the enclosing
    one's view exactly. ``replace`` maps positions to modules that run there instead of the block (the activation
    cache's replay modules, which wrap the block at that position); ``layer_idx`` and the config still follow
    ``blocks``.
    """
    parent, attr = _parent(model, layers_path)
    physical = list(parent._modules[attr])
    nested = attr in parent.__dict__
    replace = replace or {}
    if not nested and not replace and blocks == list(range(len(physical))):
        yield
        return
    config = _config(model, parent)
    outer = parent.__dict__.get(attr)
    physical_config = _physical_config(parent, config, len(physical))
    restore: list[tuple[object, str, object]] = [
        (module, "layer_idx", module.layer_idx)
        for block in physical
        for module in block.modules()
        if isinstance(getattr(module, "layer_idx", None), int)
    ]
    try:
        parent.__dict__[PHYSICAL_CONFIG] = physical_config
        # Shadow the attribute in the instance dict: forward sees this list (instance attributes win over
        # nn.Module.__getattr__), while _modules, state_dict and named_parameters keep every block.
        parent.__dict__[attr] = nn.ModuleList([replace.get(i, physical[b]) for i, b in enumerate(blocks)])
        for position, b in enumerate(blocks):
            for module in physical[b].modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = position
        if config is not None:
            restore += _arrange_config(config, physical_config, blocks)
        yield
    finally:
        for owner, key, value in reversed(restore):
            setattr(owner, key, value)
        if nested:
            parent.__dict__[attr] = outer
        else:
            parent.__dict__.pop(attr, None)
            parent.__dict__.pop(PHYSICAL_CONFIG, None)


@contextlib.contextmanager
def stored_as(model: nn.Module, layers_path: str, blocks: list[int]):
    """Context: the *registered* block list and the config are those of a plain model that runs the physical blocks
    ``blocks`` in that order (what ``state_dict`` and ``save_pretrained`` write); everything is restored on exit."""
    parent, attr = _parent(model, layers_path)
    physical = parent._modules[attr]
    config = model.config
    restore = _arrange_config(config, _physical_config(parent, config, len(physical)), blocks)
    base_layers = config.__dict__.pop(BASE_LAYERS_KEY, None)
    parent._modules[attr] = type(physical)([physical[b] for b in blocks])
    try:
        yield
    finally:
        parent._modules[attr] = physical
        for owner, key, value in reversed(restore):
            setattr(owner, key, value)
        if base_layers is not None:
            setattr(config, BASE_LAYERS_KEY, base_layers)


def per_layer_config_keys(config, num_blocks: int) -> list[str]:
    """Config entries holding one value per block (e.g. Qwen2's ``layer_types``)."""
    return [
        key
        for key, value in vars(config).items()
        if isinstance(value, list) and len(value) == num_blocks and key != "architectures"
    ]
