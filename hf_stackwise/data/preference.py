"""Preference pairs (``data.task: dpo``) for TRL's ``DPOTrainer``: TRL's explicit-prompt formats, standard
(``prompt``/``chosen``/``rejected`` strings) or conversational (a ``prompt`` list of messages, ``chosen`` and
``rejected`` one assistant message each). Sampled rows are checked before any weight loads; TRL tokenizes them when
the trainer is built. The recipe-level checks are in :mod:`hf_stackwise.data.preference_recipe`."""

from __future__ import annotations

from datasets import IterableDataset

from ..schedule.phases import RecipeError
from .loading import _load
from .sft import _check_messages, _is_conversation, resolve_chat_template, sample_rows

COLUMNS = ("prompt", "chosen", "rejected")


def check_pairs(rows: list[dict], key: str) -> bool:
    """Validate sampled pairs; returns whether they are conversational (need a chat template)."""
    if not rows:
        raise RecipeError(f"{key}: the dataset is empty")
    missing = [c for c in COLUMNS if c not in rows[0]]
    if missing:
        raise RecipeError(
            f"{key}: no `{missing[0]}` column; `data.task: dpo` reads `prompt`, `chosen` and `rejected` (strings, or "
            f"messages: a prompt conversation and one assistant message each) (columns: {', '.join(rows[0])})"
        )
    conversational = _is_conversation(rows[0]["prompt"])
    for i, row in enumerate(rows):
        where = f"{key} row {i}"
        if conversational:
            _check_messages(row["prompt"], f"{where}: prompt", need_assistant=False)
            for column in ("chosen", "rejected"):
                answer = row[column]
                if not _is_conversation(answer) or [m.get("role") for m in answer] != ["assistant"]:
                    raise RecipeError(
                        f"{where}: {column}: a conversational prompt needs one assistant message, e.g. "
                        f"[{{role: assistant, content: ...}}] (got {answer!r:.80})"
                    )
            empty = not any(str(m.get("content") or "").strip() for m in row["prompt"])
        else:
            for column in COLUMNS:
                if not isinstance(row[column], str):
                    raise RecipeError(
                        f"{where}: {column}: {row[column]!r:.80} is not a string (or a list of messages)"
                    )
            empty = not row["prompt"].strip()
        if empty:
            raise RecipeError(f"{where}: prompt: empty; DPO compares two answers to one prompt; drop or fill the row")
        if row["chosen"] == row["rejected"]:
            raise RecipeError(
                f"{where}: chosen == rejected ({str(row['chosen'])!r:.60}); the pair carries no preference and its "
                "loss is constant; drop it"
            )
    return conversational


def load_pairs(spec: dict, key: str, data: dict, tokenizer, model_name: str):
    dataset = _load(spec, key)
    conversational = check_pairs(sample_rows(dataset), key)
    resolve_chat_template(data, tokenizer, model_name, conversational=conversational)
    return dataset


def build_preference_datasets(data: dict, tokenizer, model_name: str, seed: int):
    """Train and eval pairs for ``data.task: dpo``, untokenized (``data.eval`` or an ``eval_fraction`` split)."""
    train = load_pairs(data["train"], "data.train", data, tokenizer, model_name)
    evaluation = None
    if data.get("eval") is not None:
        evaluation = load_pairs(data["eval"], "data.eval", data, tokenizer, model_name)
        if data.get("max_eval_samples") and not isinstance(evaluation, IterableDataset):
            evaluation = evaluation.select(range(min(len(evaluation), data["max_eval_samples"])))
    elif data.get("eval_fraction"):
        if isinstance(train, IterableDataset):
            raise RecipeError("data.eval_fraction: data.train is streamed and cannot be split; give `data.eval`")
        split = train.train_test_split(test_size=data["eval_fraction"], seed=seed)
        train, evaluation = split["train"], split["test"]
    return train, evaluation
