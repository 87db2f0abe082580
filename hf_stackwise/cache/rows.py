"""What the cache decision needs to know about the training rows: how many, how long, and how often a row's inputs
repeat between visits when a padding collator pads it to the longest row of its micro-batch. A preference pair
(TRL's ``prompt_ids``/``chosen_ids``/``rejected_ids``) counts here as one row of its longer sequence: its chosen and
rejected rows are always in the same micro-batch, padded to the same length."""

from __future__ import annotations

import numpy as np

FINGERPRINTED = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
PAIR = ("prompt_ids", "chosen_ids", "rejected_ids")  # TRL's tokenized preference pairs
MAX_PROBED_LENGTHS = 256  # distinct row lengths probed through the collator (beyond: padded length = max length)


def dataset_rows(dataset) -> int | None:
    from ..data.mixture import MixtureDataset

    if isinstance(dataset, MixtureDataset):
        return sum(len(s) for s in dataset.sources.values())
    try:
        return len(dataset)
    except TypeError:
        return None


def _arrow_lengths(dataset) -> np.ndarray:
    """``input_ids`` length per row of a ``datasets.Dataset``, read from its Arrow table without decoding the rows;
    a selected, shuffled or filtered dataset reads its rows through its indices mapping (its table holds them all)."""
    import pyarrow.compute as pc

    def length(column: str) -> np.ndarray:
        return np.asarray(pc.list_value_length(dataset.data.column(column)).to_numpy(), np.int64)

    if "input_ids" in dataset.column_names:
        lengths = length("input_ids")
    else:  # a preference pair: the prompt and its longer answer
        lengths = length("prompt_ids") + np.maximum(length("chosen_ids"), length("rejected_ids"))
    indices = getattr(dataset, "_indices", None)
    if indices is not None:
        lengths = lengths[np.asarray(indices.column(0).to_numpy(), np.int64)]
    return lengths


def longest_row(dataset) -> int | None:
    """Tokens in the longest ``input_ids`` row of a (non-mixture) dataset, or None (a ``datasets.Dataset``: read from
    its Arrow table without decoding the rows)."""
    try:
        import datasets

        if isinstance(dataset, datasets.Dataset):
            lengths = _arrow_lengths(dataset)
            return int(lengths.max()) if len(lengths) else None
        column = dataset["input_ids"]
        return max((len(r) for r in column), default=None)
    except (KeyError, TypeError, IndexError, ValueError):
        return None


def row_lengths(dataset) -> np.ndarray | None:
    """``input_ids`` length per row of a ``datasets.Dataset`` (from its Arrow table), else None."""
    try:
        import datasets

        if isinstance(dataset, datasets.Dataset) and (
            "input_ids" in dataset.column_names or set(PAIR) <= set(dataset.column_names)
        ):
            return _arrow_lengths(dataset)
    except (KeyError, TypeError, ValueError):
        pass
    return None


def _inputs(row: dict) -> dict:
    return {k: row[k] for k in (*FINGERPRINTED, *PAIR) if k in row}


def _collated_length(collator, rows: list[dict], index: int = 0) -> int | None:
    try:
        batch = collator([_inputs(r) for r in rows])
        return int(batch["input_ids"][index].shape[-1])
    except Exception:  # noqa: BLE001 - a collator that cannot take the probe: treat rows as unpadded
        return None


def padding_repeat(dataset, collator, micro_batch: int) -> tuple[float, str]:
    """(chance that a row's inputs at a visit equal those at its previous visit, why it is below 1).

    With rows of several lengths, a collator that pads to the longest row of the micro-batch gives a row another
    padded length (so other inputs, so a miss) whenever its batch-mates change. Probed, not assumed: the shortest row
    is collated alone and beside the longest; if its padded length differs, the collator pads per batch, and each
    length's padded length (``pad_to_multiple_of`` included) is read by collating one row of that length. Then, for
    a row of length ``l`` and ``b - 1`` batch-mates drawn from the length distribution, the padded length ``v`` has
    probability ``P_l(v)``, and two visits agree with probability ``Σ_v P_l(v)²``, averaged over the rows."""
    lengths = row_lengths(dataset)
    if lengths is None or len(lengths) == 0 or lengths.min() == lengths.max() or collator is None:
        return 1.0, ""
    short, long = int(lengths.argmin()), int(lengths.argmax())
    alone = _collated_length(collator, [dataset[short]])
    beside = _collated_length(collator, [dataset[short], dataset[long]])
    if alone is None or beside is None or alone == beside:
        return 1.0, ""  # padded to a fixed length (or not padded): a row's inputs do not depend on its batch
    distinct, counts = np.unique(lengths, return_counts=True)
    padded = distinct.copy()
    if len(distinct) <= MAX_PROBED_LENGTHS:
        firsts = {int(length): int(np.flatnonzero(lengths == length)[0]) for length in distinct}
        probed = [_collated_length(collator, [dataset[firsts[int(length)]]]) for length in distinct]
        padded = np.array([p if p is not None else int(length) for p, length in zip(probed, distinct, strict=True)])
    total, mates = int(counts.sum()), max(0, micro_batch - 1)
    others = (np.cumsum(counts) - 1).astype(float)  # for a row of length <= distinct[m]: other rows that short
    at_most = np.ones(len(distinct))  # P(all mates <= distinct[m]): mates drawn without replacement
    for t in range(min(mates, total - 1)):
        at_most *= np.clip(others - t, 0, None) / (total - 1 - t)
    order = np.argsort(padded, kind="stable")  # group equal padded lengths (monotone in the length anyway)
    groups = np.searchsorted(np.unique(padded), padded[order])
    repeat = 0.0
    for i, count in enumerate(counts):
        p_max = np.diff(at_most, prepend=0.0)  # P(batch max = distinct[j]) for j > i ...
        p_max[i] = at_most[i]  # ... and = the row's own length when every mate is as short or shorter
        p_max[:i] = 0.0
        grouped = np.bincount(groups, weights=p_max[order])
        repeat += count * float(np.sum(grouped**2))
    repeat = float(repeat / total)
    note = (
        f"rows of {len(distinct)} lengths are padded to the longest of their micro-batch of {micro_batch}, so a "
        f"row's inputs repeat in {repeat:.0%} of its visits"
    )
    return repeat, note
