"""Data from ``datasets.load_dataset``: tokenize, chunk to ``max_seq_length``, split off eval.

Tokenization and chunking go through ``Dataset.map`` so the datasets cache makes a second run skip them.
Rows are stored at the longest length any phase uses; the trainer splits them for shorter phases and
corrupts them for masked tasks (:mod:`hf_stackwise.data.masking`). Named ``datasets`` become the sources of a
per-phase mixture (:mod:`hf_stackwise.data.mixture`).
"""

from __future__ import annotations

from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, concatenate_datasets, load_dataset

from ..schedule.phases import RecipeError


def _load(spec: dict, key: str) -> Dataset:
    spec = dict(spec)
    split = spec.pop("split", "train")
    try:
        loaded = load_dataset(**spec, split=split)
    except FileNotFoundError as err:
        raise RecipeError(f"{key}: {err}; check `data_files` / `path`") from None
    except (TypeError, ValueError, ConnectionError) as err:  # arguments load_dataset does not take
        detail = " ".join(str(err).split())[:300]
        raise RecipeError(
            f"{key}: datasets.load_dataset refuses these arguments ({type(err).__name__}: {detail}); give it "
            "`path`, `data_files`, `split` and the builder's own options"
        ) from None
    if isinstance(loaded, (DatasetDict, IterableDatasetDict)):  # a split that was not a plain name
        loaded = loaded[next(iter(loaded))]
    return loaded


def tokenize_and_chunk(dataset: Dataset, tokenizer, text_column: str, max_seq_length: int, key: str) -> Dataset:
    """Tokenize ``text_column``, append EOS per text, concatenate and cut into full ``max_seq_length`` chunks."""
    if dataset.column_names is not None and text_column not in dataset.column_names:
        raise RecipeError(
            f"data.text_column: {text_column!r} is not a column of {key} (columns: {', '.join(dataset.column_names)})"
        )
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch):
        texts = [t for t in batch[text_column] if t and t.strip()]
        if not texts:  # a batch of blank lines (the tokenizer refuses an empty list)
            return {"input_ids": []}
        return {"input_ids": [ids + eos for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]}

    def chunk(batch):
        flat = [tok for ids in batch["input_ids"] for tok in ids]
        usable = len(flat) // max_seq_length * max_seq_length
        chunks = [flat[i : i + max_seq_length] for i in range(0, usable, max_seq_length)]
        return {"input_ids": chunks, "labels": [list(c) for c in chunks]}

    streaming = isinstance(dataset, IterableDataset)
    tokenize_kwargs = {} if streaming else {"desc": f"tokenize {key}"}
    chunk_kwargs = {} if streaming else {"desc": f"chunk {key} to {max_seq_length}"}
    tokens = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, **tokenize_kwargs)
    chunks = tokens.map(chunk, batched=True, batch_size=1000, **chunk_kwargs)
    if isinstance(chunks, IterableDataset):  # streaming: its length is unknown until read
        return chunks
    if len(chunks) == 0:
        raise RecipeError(
            f"{key}: no example of {max_seq_length} tokens after tokenizing; add text or lower `data.max_seq_length`"
        )
    return chunks


def build_datasets(data: dict, tokenizer, max_seq_length: int, seed: int) -> tuple[Dataset, Dataset | None]:
    """Train and (optional) eval datasets for the recipe's ``data`` section."""
    text_column = data.get("text_column", "text")
    train = tokenize_and_chunk(
        _load(data["train"], "data.train"), tokenizer, text_column, max_seq_length, "data.train"
    )
    evaluation = None
    if data.get("eval") is not None:
        evaluation = tokenize_and_chunk(
            _load(data["eval"], "data.eval"), tokenizer, text_column, max_seq_length, "data.eval"
        )
    elif data.get("eval_fraction"):
        if isinstance(train, IterableDataset):
            raise RecipeError("data.eval_fraction: a streaming dataset cannot be split; give `data.eval` instead")
        split = train.train_test_split(test_size=data["eval_fraction"], seed=seed)
        train, evaluation = split["train"], split["test"]
    if isinstance(evaluation, IterableDataset) and data.get("max_eval_samples"):
        evaluation = evaluation.take(data["max_eval_samples"])
    elif evaluation is not None and data.get("max_eval_samples"):
        evaluation = evaluation.select(range(min(len(evaluation), data["max_eval_samples"])))
    return train, evaluation


def build_sources(data: dict, tokenizer, max_seq_length: int, seed: int) -> tuple[dict[str, Dataset], Dataset | None]:
    """The named sources of ``data.datasets`` (tokenized and chunked) and the eval set.

    With ``eval_fraction``, each source gives that fraction of its chunks to one shared eval set.
    """
    text_column = data.get("text_column", "text")
    sources: dict[str, Dataset] = {}
    held_out = []
    for name, spec in data["datasets"].items():
        key = f"data.datasets.{name}"
        chunks = tokenize_and_chunk(_load(spec, key), tokenizer, text_column, max_seq_length, key)
        if isinstance(chunks, IterableDataset):
            raise RecipeError(f"{key}.streaming: a mixture reads its sources by position; load them without streaming")
        if data.get("eval_fraction"):
            if len(chunks) < 2:
                raise RecipeError(f"{key}: {len(chunks)} chunk cannot be split by `data.eval_fraction`; add text")
            split = chunks.train_test_split(test_size=data["eval_fraction"], seed=seed)
            chunks = split["train"]
            held_out.append(split["test"])
        sources[name] = chunks
    evaluation = None
    if data.get("eval") is not None:
        evaluation = tokenize_and_chunk(
            _load(data["eval"], "data.eval"), tokenizer, text_column, max_seq_length, "data.eval"
        )
    elif held_out:
        evaluation = concatenate_datasets(held_out)
    if evaluation is not None and data.get("max_eval_samples"):
        evaluation = evaluation.select(range(min(len(evaluation), data["max_eval_samples"])))
    return sources, evaluation
