"""Units: the names of the parameter groups a phase trains (a stack's own weights, its LoRA adapter, the trunk
adapter inside it, the embeddings, the head), and the LoRA settings they take. Standard library only."""

from __future__ import annotations

LORA_KEYS = ("r", "alpha", "dropout", "target_modules")
DEFAULT_LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}  # `adapters:` defaults
EMBEDDINGS = "embeddings"
HEAD = "head"
TRUNK_ADAPTER = "trunk"  # PEFT adapter name of the trunk LoRA; stack adapters are named stack_<i>


def stack_unit(index: int) -> str:
    """Name of the parameter unit (and optimizer group) of stack ``index``'s own weights."""
    return f"stack_{index}"


def lora_unit(index: int) -> str:
    """Unit of the LoRA adapter that trains stack ``index`` (``adapter: lora``)."""
    return f"stack_{index}.lora"


def trunk_unit(index: int) -> str:
    """Unit of the trunk adapter's parameters inside stack ``index`` (``trunk: lora``)."""
    return f"stack_{index}.trunk"


def unit_level(unit: str) -> int:
    """Stack index of a stack unit (any kind); -1 for the embeddings."""
    if unit == EMBEDDINGS:
        return -1
    return int(unit.removeprefix("stack_").split(".")[0])


def check_lora(value, path: str, problems: list[str]) -> None:
    """Validate a LoRA settings mapping (`adapters:` section or a phase's `lora:`)."""
    if not isinstance(value, dict):
        problems.append(f"{path}: expected a mapping with keys among {', '.join(LORA_KEYS)}")
        return
    for key in value:
        if key not in LORA_KEYS:
            problems.append(f"{path}.{key}: unknown LoRA setting; known settings are {', '.join(LORA_KEYS)}")
    r = value.get("r")
    if r is not None and not (_is_int(r) and r >= 1):
        problems.append(f"{path}.r: {r!r} is not a positive integer (the LoRA rank)")
    alpha = value.get("alpha")
    if alpha is not None and not (_is_number(alpha) and alpha > 0):
        problems.append(f"{path}.alpha: {alpha!r} is not a positive number")
    dropout = value.get("dropout")
    if dropout is not None and not (_is_number(dropout) and 0 <= dropout < 1):
        problems.append(f"{path}.dropout: {dropout!r} is not a probability in [0, 1)")
    targets = value.get("target_modules")
    if (
        targets is not None
        and targets != "all-linear"
        and not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))
    ):
        problems.append(f"{path}.target_modules: {targets!r} is not `all-linear` or a list of module names")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
