"""Chat and instruction fine-tuning (``data.task: sft``) through TRL's ``SFTTrainer``.

TRL tokenizes (chat template), builds the labels (``completion_only_loss``), truncates and packs; this module
validates the data before any weight loads, and turns ``messages`` conversations into one conversational
``prompt`` + ``completion`` row per assistant turn so that the loss falls on the assistant turns only with any
chat template. (TRL's ``assistant_only_loss`` needs ``{% generation %}`` markers, which most shipped templates
lack; SmolLM2's has none and TRL cannot patch it.) A conversation of k assistant turns gives k rows: turn i is
trained on with turns < i as its context, exactly as in one row with every assistant turn labelled, at the cost
of repeating the context. ``trl`` is imported only when an SFT run starts, so the package imports without it.
"""

from __future__ import annotations

import os

import torch
from datasets import IterableDataset
from transformers.utils import logging

from ..schedule.phases import RecipeError
from .loading import _load
from .sft_recipe import LOSS_ON, SFT_KEYS  # noqa: F401  (re-exported)

logger = logging.get_logger(__name__)

ROLES = ("system", "user", "assistant")
SAMPLE_ROWS = 64  # rows inspected (columns, roles) and rendered with the chat template before any weight loads


# ---- the chat template --------------------------------------------------------------------------------


def resolve_chat_template(data: dict, tokenizer, model_name: str, conversational: bool) -> None:
    """Set ``data.chat_template`` (a Jinja string or the path of a file) on the tokenizer; a conversational
    dataset needs a template from the recipe or the tokenizer."""
    template = data.get("chat_template")
    if template is not None:
        path = os.path.expanduser(template)
        if "{" not in template and "\n" not in template:  # a path, not a Jinja string
            if not os.path.isfile(path):
                raise RecipeError(
                    f"data.chat_template: {template!r} is neither a file nor a Jinja template (a template has "
                    "`{{ ... }}` / `{% ... %}`); give the path of a .jinja file or the template itself"
                )
            with open(path, encoding="utf-8") as f:
                template = f.read()
        tokenizer.chat_template = template  # saved with the tokenizer: checkpoints and exports carry it
    elif conversational and not getattr(tokenizer, "chat_template", None):
        raise RecipeError(
            f"data.chat_template: the tokenizer of {model_name!r} has no chat template, and the data is "
            "conversational; give `data.chat_template` (a Jinja string or the path of a .jinja file)"
        )


# ---- data validation and conversion -----------------------------------------------------------------


def _is_conversation(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def _check_messages(messages, where: str, need_assistant: bool = True) -> None:
    """``{role, content}`` messages: an optional leading system message, then user / assistant turns that
    alternate starting with user (what chat templates such as Llama 2's, Mistral's or Gemma's require)."""
    if not _is_conversation(messages) or not messages:
        raise RecipeError(f"{where}: {messages!r:.80} is not a non-empty list of {{role, content}} messages")
    for j, message in enumerate(messages):
        for field in ("role", "content"):
            if field not in message or message[field] is None:
                raise RecipeError(
                    f"{where}[{j}]: the message has no `{field}` ({message!r:.120}); every message needs "
                    "`role` and `content`"
                )
        if message["role"] not in ROLES:
            raise RecipeError(f"{where}[{j}].role: {message['role']!r} is not one of {ROLES}")
        if not isinstance(message["content"], str):
            raise RecipeError(f"{where}[{j}].content: {message['content']!r:.80} is not a string")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for j, message in enumerate(turns):
        expected = "user" if j % 2 == 0 else "assistant"
        if message["role"] != expected:
            index = j + len(messages) - len(turns)
            raise RecipeError(
                f"{where}[{index}].role: {message['role']!r} where the chat template needs {expected!r}; after an "
                "optional first `system` message, roles must alternate user, assistant, user, ..."
            )
    if need_assistant and not any(m["role"] == "assistant" for m in turns):
        raise RecipeError(f"{where}: the conversation has no assistant message, so nothing would be trained on")


def data_format(dataset, key: str) -> str:
    """``messages`` or ``prompt-completion``; refuses any other columns, naming the missing one."""
    columns = list(dataset.column_names or [])
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt-completion"
    missing = "`completion`" if "prompt" in columns else "`prompt`" if "completion" in columns else "`messages`"
    raise RecipeError(
        f"{key}: no {missing} column; `data.task: sft` reads conversational `messages` (a list of {{role, content}}) "
        f"or `prompt` + `completion` columns (columns: {', '.join(columns) or 'none'})"
    )


def sample_rows(dataset) -> list[dict]:
    """The first SAMPLE_ROWS rows, as dicts."""
    if isinstance(dataset, IterableDataset):
        return list(dataset.take(SAMPLE_ROWS))
    return list(dataset.select(range(min(SAMPLE_ROWS, len(dataset)))))


def check_rows(rows: list[dict], key: str, fmt: str) -> bool:
    """Validate sampled rows; returns whether they are conversational (need a chat template)."""
    if not rows:
        raise RecipeError(f"{key}: the dataset is empty")
    conversational = fmt == "messages" or _is_conversation(rows[0]["prompt"])
    for i, row in enumerate(rows):
        if fmt == "messages":
            _check_messages(row["messages"], f"{key} row {i}: messages")
        elif conversational:
            _check_messages(row["prompt"], f"{key} row {i}: prompt", need_assistant=False)
            completion = row["completion"]
            if not _is_conversation(completion) or [m.get("role") for m in completion] != ["assistant"]:
                raise RecipeError(
                    f"{key} row {i}: completion: a conversational prompt needs a completion of one assistant "
                    f"message, e.g. [{{role: assistant, content: ...}}] (got {completion!r:.80})"
                )
            _check_messages(row["prompt"] + completion, f"{key} row {i}: prompt + completion")
        else:
            for column in ("prompt", "completion"):
                if not isinstance(row[column], str):
                    raise RecipeError(
                        f"{key} row {i}: {column}: {row[column]!r:.80} is not a string (plain prompt-completion) "
                        "or a list of messages (conversational)"
                    )
    return conversational


def render_rows(rows: list[dict], key: str, tokenizer, fmt: str, max_length: int) -> None:
    """Apply the chat template to the sampled rows: a template that raises (e.g. on roles it does not accept)
    fails here, before weights load; so does a ``max_seq_length`` that no sampled first prompt fits in."""
    prompt_lengths = []
    for i, row in enumerate(rows):
        conversation = row["messages"] if fmt == "messages" else row["prompt"] + row["completion"]
        first_answer = next(j for j, m in enumerate(conversation) if m["role"] == "assistant")
        try:
            tokenizer.apply_chat_template(conversation, tokenize=False)
            prompt = tokenizer.apply_chat_template(
                conversation[:first_answer], tokenize=False, add_generation_prompt=True
            )
        except Exception as err:  # jinja2's TemplateError, or the template's own raise_exception
            raise RecipeError(
                f"{key} row {i}: the chat template refuses this conversation: {err}; fix the roles or give a "
                "template that accepts them in `data.chat_template`"
            ) from None
        prompt_lengths.append(len(tokenizer(prompt, add_special_tokens=False)["input_ids"]))
    if prompt_lengths and min(prompt_lengths) >= max_length:
        raise RecipeError(
            f"data.max_seq_length: the prompts of the first {len(rows)} rows of {key} take {min(prompt_lengths)} "
            f"tokens or more with the chat template, leaving no room for an answer in {max_length}; raise it"
        )


def turns_to_completions(batch: dict) -> dict:
    """One conversational ``prompt`` + ``completion`` row per assistant turn of each conversation."""
    prompts, completions = [], []
    for messages in batch["messages"]:
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                prompts.append([{"role": m["role"], "content": m["content"]} for m in messages[:i]])
                completions.append([{"role": "assistant", "content": message["content"]}])
    return {"prompt": prompts, "completion": completions}


def as_training_rows(dataset, fmt: str, loss_on: str, key: str):
    """``messages`` become prompt/completion rows per assistant turn when the loss is on completions only."""
    if fmt != "messages" or loss_on == "all":
        return dataset
    kwargs = {} if isinstance(dataset, IterableDataset) else {"desc": f"assistant turns of {key}"}
    return dataset.map(turns_to_completions, batched=True, remove_columns=dataset.column_names, **kwargs)


def load_sft_dataset(spec: dict, key: str, data: dict, tokenizer, model_name: str, max_length: int):
    """Load and validate (columns, messages, the chat template on a sample) a dataset; returns it and its
    format. The first conversational dataset resolves the chat template."""
    dataset = _load(spec, key)
    fmt = data_format(dataset, key)
    rows = sample_rows(dataset)
    if check_rows(rows, key, fmt):
        resolve_chat_template(data, tokenizer, model_name, conversational=True)
        render_rows(rows, key, tokenizer, fmt, max_length)
    else:
        resolve_chat_template(data, tokenizer, model_name, conversational=False)
    return dataset, fmt


def build_sft_datasets(data: dict, tokenizer, model_name: str, max_length: int, seed: int):
    """Train rows (or named mixture sources) and eval rows for ``data.task: sft``, untokenized: TRL tokenizes
    them when the trainer is built. Splits and ``max_eval_samples`` count conversations."""
    loss_on = data.get("loss_on", "completion")
    held_out = []

    def load(spec, key, split_fraction: bool):
        dataset, fmt = load_sft_dataset(spec, key, data, tokenizer, model_name, max_length)
        if split_fraction and data.get("eval_fraction"):
            if isinstance(dataset, IterableDataset):
                raise RecipeError(f"data.eval_fraction: {key} is streamed and cannot be split; give `data.eval`")
            if len(dataset) < 2:
                raise RecipeError(f"{key}: {len(dataset)} row cannot be split by `data.eval_fraction`; add rows")
            split = dataset.train_test_split(test_size=data["eval_fraction"], seed=seed)
            dataset = split["train"]
            held_out.append(as_training_rows(split["test"], fmt, loss_on, key))
        return as_training_rows(dataset, fmt, loss_on, key)

    if data.get("datasets"):
        train = {}
        for name, spec in data["datasets"].items():
            key = f"data.datasets.{name}"
            train[name] = load(spec, key, True)
            if isinstance(train[name], IterableDataset):
                raise RecipeError(
                    f"{key}.streaming: a mixture reads its sources by position; load them without streaming"
                )
    else:
        train = load(data["train"], "data.train", True)
    evaluation = None
    if data.get("eval") is not None:
        evaluation, fmt = load_sft_dataset(data["eval"], "data.eval", data, tokenizer, model_name, max_length)
        if data.get("max_eval_samples") and not isinstance(evaluation, IterableDataset):
            evaluation = evaluation.select(range(min(len(evaluation), data["max_eval_samples"])))
        evaluation = as_training_rows(evaluation, fmt, loss_on, "data.eval")
    elif held_out:
        from datasets import concatenate_datasets

        evaluation = concatenate_datasets(held_out) if len(held_out) > 1 else held_out[0]
    return train, evaluation


def check_causal(config) -> None:
    """``sft`` trains a decoder: refuse encoders (whose causal-LM class, if any, is a BERT-style LM head)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    encoder = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
    if encoder or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise RecipeError(
            f"data.task: `sft` fine-tunes a causal LM (a decoder such as Llama, SmolLM2 or Qwen2), and "
            f"{config.model_type!r} is {'an encoder' if encoder else 'not one'}; use a decoder model, or "
            "`task: mlm` for an encoder"
        )


# ---- the trainer and its arguments --------------------------------------------------------------------


def _truncate(batch: dict, length: int) -> dict:
    """Cut every ``[batch, L]`` tensor to its first ``length`` positions (a shorter phase's rows)."""
    ids = batch["input_ids"]
    rows, total = ids.shape
    if length >= total:
        return batch
    return {
        k: v[:, :length] if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == (rows, total) else v
        for k, v in batch.items()
    }


def truncate_for_phase(batch: dict, length: int, stored: int) -> dict:
    """A phase shorter than the stored rows keeps each conversation's first ``length`` tokens; a pure function of
    (batch, phase), so the data state stays a function of the step. Packed (padding-free) rows never get here:
    per-phase lengths are refused with packing."""
    return _truncate(batch, length) if length < stored else batch


def sft_config_fields(data: dict, max_length: int) -> dict:
    """The ``SFTConfig`` fields the recipe's ``data:`` section sets."""
    return {
        "max_length": max_length,
        "packing": bool(data.get("packing", False)),
        "completion_only_loss": data.get("loss_on", "completion") == "completion",
        "assistant_only_loss": False,  # assistant turns are prompt/completion rows (module docstring)
        "dataset_text_field": "text",
    }
