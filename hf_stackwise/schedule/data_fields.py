"""A phase's data-plane fields (``task``, ``max_seq_length``, ``mask_rate``, ``mask_schedule``, ``data``), parsed
and checked with the standard library only; :mod:`hf_stackwise.data.plane` turns them into per-step values."""

from __future__ import annotations


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# causal LM; masked LM (80/10/10); masked diffusion (rate drawn per sequence); chat / instruction SFT; sequence
# classification; preference pairs (DPO through TRL)
TASKS = ("clm", "mlm", "diffusion", "sft", "classification", "dpo", "kto")
MASKED_TASKS = ("mlm", "diffusion")
MASK_SCHEDULES = ("linear", "cosine")  # how a `mask_rate: [start, end]` ramp moves across its phase


# What a task changes in every phase that does not say otherwise: a classifier head is new, so it trains
PHASE_DEFAULTS = {"classification": {"head": "train"}}


def phase_defaults(task: str | None) -> dict:
    """Phase fields the run's task sets for phases that do not give them (``head: train`` for classification)."""
    return dict(PHASE_DEFAULTS.get(task or "clm", {}))


def _is_rate(value) -> bool:
    return _is_number(value) and 0 < value < 1


def parse_data_fields(raw: dict, path: str, problems: list[str]) -> dict:
    """The phase's data-plane fields: ``task``, ``max_seq_length``, ``mask_rate`` (+ ``mask_schedule``), ``data``."""
    values: dict = {}
    task = raw.get("task")
    if task is not None and task not in TASKS:
        problems.append(f"{path}.task: {task!r} is not one of {TASKS}")
        task = None
    values["task"] = task

    length = raw.get("max_seq_length")
    if length is not None and not (_is_int(length) and length >= 2):
        problems.append(f"{path}.max_seq_length: {length!r} is not an integer >= 2 (tokens per training row)")
        length = None
    values["max_seq_length"] = length

    rate = raw.get("mask_rate")
    if isinstance(rate, list) and len(rate) == 2 and all(_is_rate(r) for r in rate):
        rate = (float(rate[0]), float(rate[1]))
    elif _is_rate(rate):
        rate = float(rate)
    elif rate is not None:
        problems.append(
            f"{path}.mask_rate: {rate!r} is not a rate in (0, 1) or a `[start, end]` ramp of two such rates "
            "(e.g. `mask_rate: [0.15, 0.5]`)"
        )
        rate = None
    values["mask_rate"] = rate

    shape = raw.get("mask_schedule", "linear")
    if shape not in MASK_SCHEDULES:
        problems.append(f"{path}.mask_schedule: {shape!r} is not one of {MASK_SCHEDULES}")
        shape = "linear"
    values["mask_schedule"] = shape

    weights = raw.get("data")
    if weights is not None:
        if not isinstance(weights, dict) or not weights:
            problems.append(
                f"{path}.data: {weights!r} is not a mapping of mixture weights over the datasets named in "
                "`data.datasets` (e.g. `data: {general: 0.7, domain: 0.3}`)"
            )
            weights = None
        else:
            bad = {k: w for k, w in weights.items() if not (_is_number(w) and w >= 0)}
            if bad:
                problems.append(f"{path}.data: weights {bad!r} are not non-negative numbers")
            elif not any(w > 0 for w in weights.values()):
                problems.append(f"{path}.data: every mixture weight is 0; give at least one dataset a positive weight")
            weights = {str(k): float(w) for k, w in weights.items() if _is_number(w)}
    values["data"] = weights
    return values
