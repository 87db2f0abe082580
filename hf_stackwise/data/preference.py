"""Preference data for TRL's ``DPOTrainer`` (``data.task: dpo``: pairs) and ``KTOTrainer`` (``data.task: kto``: pairs,
which TRL unpairs, or unpaired ``prompt``/``completion``/``label`` rows): TRL's explicit-prompt formats, standard
(strings) or conversational (a ``prompt`` list of messages, each answer one assistant message). Sampled rows are
checked before any weight loads; TRL tokenizes them when the trainer is built. The recipe-level checks are in
:mod:`hf_stackwise.data.preference_recipe`."""

from __future__ import annotations

from datasets import IterableDataset

from ..schedule.phases import RecipeError
from .loading import _load
from .sft import _check_messages, _is_conversation, resolve_chat_template, sample_rows

COLUMNS = ("prompt", "chosen", "rejected")
UNPAIRED = ("prompt", "completion", "label")  # KTO's own format


def check_pairs(rows: list[dict], key: str, task: str = "dpo") -> bool:
    """Validate sampled pairs (or, for ``kto``, unpaired rows); returns whether they are conversational (need a chat
    template)."""
    if not rows:
        raise RecipeError(f"{key}: the dataset is empty")
    if task == "kto" and "completion" in rows[0]:
        return check_unpaired(rows, key)
    missing = [c for c in COLUMNS if c not in rows[0]]
    if missing:
        raise RecipeError(
            f"{key}: no `{missing[0]}` column; `data.task: {task}` reads `prompt`, `chosen` and `rejected` (strings, "
            "or messages: a prompt conversation and one assistant message each)"
            + (", or `prompt`, `completion` and `label`" if task == "kto" else "")
            + f" (columns: {', '.join(rows[0])})"
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
            raise RecipeError(f"{where}: prompt: empty; {task.upper()} compares answers to one prompt; drop or fill")
        if row["chosen"] == row["rejected"]:
            raise RecipeError(
                f"{where}: chosen == rejected ({str(row['chosen'])!r:.60}); the pair carries no preference and its "
                "loss is constant; drop it"
            )
    return conversational


def check_unpaired(rows: list[dict], key: str) -> bool:
    """KTO's unpaired rows: a prompt, one completion, a boolean label (desirable or not)."""
    missing = [c for c in UNPAIRED if c not in rows[0]]
    if missing:
        raise RecipeError(
            f"{key}: no `{missing[0]}` column; unpaired `data.task: kto` rows have `prompt`, `completion` and "
            f"`label` (true: desirable) (columns: {', '.join(rows[0])})"
        )
    conversational = _is_conversation(rows[0]["prompt"])
    for i, row in enumerate(rows):
        where = f"{key} row {i}"
        if not isinstance(row["label"], bool):
            raise RecipeError(f"{where}: label: {row['label']!r:.40} is not true or false (desirable or not)")
        if conversational:
            _check_messages(row["prompt"], f"{where}: prompt", need_assistant=False)
            answer = row["completion"]
            if not _is_conversation(answer) or [m.get("role") for m in answer] != ["assistant"]:
                raise RecipeError(f"{where}: completion: a conversational prompt needs one assistant message")
            empty = not any(str(m.get("content") or "").strip() for m in row["prompt"])
            blank = not str(answer[0].get("content") or "").strip()
        else:
            for column in ("prompt", "completion"):
                if not isinstance(row[column], str):
                    raise RecipeError(f"{where}: {column}: {row[column]!r:.80} is not a string (or messages)")
            empty, blank = not row["prompt"].strip(), not row["completion"].strip()
        if empty:
            raise RecipeError(f"{where}: prompt: empty; KTO judges an answer to a prompt; drop or fill the row")
        if blank:
            raise RecipeError(f"{where}: completion: empty; there is no answer to judge; drop the row")
    return conversational


def load_pairs(spec: dict, key: str, data: dict, tokenizer, model_name: str):
    dataset = _load(spec, key)
    conversational = check_pairs(sample_rows(dataset), key, data.get("task", "dpo"))
    resolve_chat_template(data, tokenizer, model_name, conversational=conversational)
    return dataset


def build_preference_datasets(data: dict, tokenizer, model_name: str, seed: int):
    """Train and eval rows for ``data.task: dpo`` / ``kto``, untokenized (``data.eval`` or an ``eval_fraction``
    split)."""
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
