"""``data.task: classification``: labelled text rows, the label set, the model class and the eval metrics.

Each row is one text (plus an optional second text, ``data.text_pair_column``), tokenized and truncated to
``data.max_seq_length``, with ``labels`` = the class id; batches are padded per batch
(``DataCollatorWithPadding``), or every row to ``data.max_seq_length`` with ``data.padding: max_length``. The label
names come from a ``ClassLabel`` feature, else the sorted distinct values of the training labels; they go into the
model config (``id2label``, ``label2id``, ``num_labels``) before any weight loads. Metrics are scikit-learn's; the
confusion matrix of every eval is kept as JSON."""

from __future__ import annotations

import json
import os

from datasets import ClassLabel, Dataset, IterableDataset
from transformers import DataCollatorWithPadding, TrainerCallback

from ..errors import RecipeError
from .labels import CONFUSION_NAME
from .loading import _load


def needs_model_class(config) -> None:
    """Refuse a model type with no sequence-classification class (before any weight loads)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise RecipeError(
            f"data.task: `classification` needs a sequence-classification architecture (AutoModelForSequence"
            f"Classification), and {config.model_type!r} has none; pick an encoder such as BERT / RoBERTa / MiniLM "
            "or a decoder such as Llama / Qwen2"
        )


def label_names(dataset: Dataset, column: str, key: str) -> list:
    """The class names: a ``ClassLabel`` feature's names, else the sorted distinct values (ints or strings)."""
    if column not in dataset.column_names:
        raise RecipeError(
            f"data.label_column: {column!r} is not a column of {key} (columns: {', '.join(dataset.column_names)}); "
            "name the column that holds the class"
        )
    feature = dataset.features[column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    else:
        values = [v for v in dataset[column] if v is not None]
        kinds = sorted({_kind(v) for v in values})
        if len(kinds) > 1:
            raise RecipeError(
                f"data.label_column: the labels of {key} mix {' and '.join(kinds)} values; give every row the same "
                "type of label (all class names, or all integer ids)"
            )
        if kinds and kinds[0] not in ("integer", "string"):
            raise RecipeError(
                f"data.label_column: the labels of {key} are {kinds[0]} values; classification takes class names "
                "(strings) or integer ids"
            )
        names = sorted(set(values))
    if len(names) < 2:
        raise RecipeError(
            f"data.label_column: {key} has {len(names)} class ({names}); classification needs at least two classes"
        )
    return names


def _kind(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


def configure(config, names: list, tokenizer) -> None:
    """Label names and count into the config (what the exported model keeps); decoders need a pad token id."""
    config.num_labels = len(names)
    config.id2label = {i: str(name) for i, name in enumerate(names)}
    config.label2id = {str(name): i for i, name in enumerate(names)}
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id


def _encode(dataset: Dataset, tokenizer, data: dict, names: list, max_length: int, key: str) -> Dataset:
    text_column = data.get("text_column", "text")
    pair_column = data.get("text_pair_column")
    label_column = data.get("label_column", "label")
    for option, column in (("text_column", text_column), ("text_pair_column", pair_column)):
        if column is not None and column not in dataset.column_names:
            raise RecipeError(
                f"data.{option}: {column!r} is not a column of {key} (columns: {', '.join(dataset.column_names)})"
            )
    if label_column not in dataset.column_names:
        raise RecipeError(
            f"data.label_column: {label_column!r} is not a column of {key} (columns: "
            f"{', '.join(dataset.column_names)}); name the column that holds the class"
        )
    feature = dataset.features[label_column]
    index = {name: i for i, name in enumerate(names)}
    if not isinstance(feature, ClassLabel):
        unknown = sorted({str(v) for v in dataset[label_column]} - {str(n) for n in names})
        if unknown:
            raise RecipeError(
                f"data.label_column: {key} has labels the training set does not ({', '.join(unknown[:5])}); the "
                f"classes are {', '.join(map(str, names))}"
            )

    def tokenize(batch):
        texts = [t or "" for t in batch[text_column]]
        pairs = [t or "" for t in batch[pair_column]] if pair_column else None
        encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        labels = batch[label_column] if isinstance(feature, ClassLabel) else [index[v] for v in batch[label_column]]
        return {**encoded, "labels": labels}

    return dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc=f"tokenize {key}")


def build_datasets(data: dict, tokenizer, max_length: int, seed: int, config) -> tuple[Dataset, Dataset | None]:
    """Tokenized train and (optional) eval rows with class ids; the label set goes into ``config``."""
    train = _load(data["train"], "data.train")
    if isinstance(train, IterableDataset):
        raise RecipeError(
            "data.train.streaming: classification reads the whole label set before training; load without streaming"
        )
    names = label_names(train, data.get("label_column", "label"), "data.train")
    configure(config, names, tokenizer)
    evaluation = _load(data["eval"], "data.eval") if data.get("eval") is not None else None
    if isinstance(evaluation, IterableDataset):
        raise RecipeError("data.eval.streaming: load the classification eval set without streaming")
    train = _encode(train, tokenizer, data, names, max_length, "data.train")
    if evaluation is not None:
        evaluation = _encode(evaluation, tokenizer, data, names, max_length, "data.eval")
    elif data.get("eval_fraction"):
        split = train.train_test_split(test_size=data["eval_fraction"], seed=seed)
        train, evaluation = split["train"], split["test"]
    if evaluation is not None and data.get("max_eval_samples"):
        evaluation = evaluation.select(range(min(len(evaluation), data["max_eval_samples"])))
    return train, evaluation


class Metrics:
    """``compute_metrics`` for the Trainer: accuracy, macro F1 / precision / recall and the confusion matrix
    (kept as :attr:`confusion` for :class:`ConfusionLog`), all from scikit-learn."""

    def __init__(self, num_labels: int):
        self.labels = list(range(num_labels))
        self.confusion: list[list[int]] | None = None

    def __call__(self, prediction) -> dict[str, float]:
        from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

        logits = prediction.predictions
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        predicted = logits.argmax(-1)
        truth = prediction.label_ids
        precision, recall, f1, _ = precision_recall_fscore_support(
            truth, predicted, labels=self.labels, average="macro", zero_division=0
        )
        self.confusion = confusion_matrix(truth, predicted, labels=self.labels).tolist()
        return {
            "accuracy": float(accuracy_score(truth, predicted)),
            "f1": float(f1),
            "precision": float(precision),
            "recall": float(recall),
        }


class ConfusionLog(TrainerCallback):
    """Append every eval's confusion matrix, with its step, to ``output_dir/confusion.json``."""

    def __init__(self, metrics: Metrics, names: list[str]):
        self.metrics, self.names = metrics, names

    def _path(self, args) -> str:
        return os.path.join(args.output_dir, CONFUSION_NAME)

    def _read(self, args) -> dict:
        path = self._path(args)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        return {"labels": self.names, "rows": "true label", "columns": "predicted label", "evals": []}

    def _write(self, args, record: dict) -> None:
        path = self._path(args)
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)

    def on_train_begin(self, args, state, control, **kwargs):
        """A fresh run starts the file afresh; a resumed one drops the evals after its checkpoint."""
        if state.is_world_process_zero and os.path.isdir(args.output_dir):
            record = self._read(args)
            resumed = state.global_step > 0
            record["evals"] = [e for e in record["evals"] if resumed and e["step"] <= state.global_step]
            self._write(args, record)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.is_world_process_zero and self.metrics.confusion is not None:
            os.makedirs(args.output_dir, exist_ok=True)
            record = self._read(args)
            record["evals"].append({"step": state.global_step, "matrix": self.metrics.confusion})
            self._write(args, record)
            self.metrics.confusion = None


def trainer_kwargs(config, tokenizer, padding: str = "longest", max_length: int | None = None) -> dict:
    """What the Trainer takes for a classification run: padding collator, metrics, the confusion log. ``padding``:
    ``data.padding`` (``max_length`` pads every row to ``max_length``, ``data.max_seq_length``)."""
    metrics = Metrics(config.num_labels)
    names = [config.id2label[i] for i in range(config.num_labels)]
    padding = {"padding": "max_length", "max_length": max_length} if padding == "max_length" else {}
    return {
        "data_collator": DataCollatorWithPadding(tokenizer, **padding),
        "compute_metrics": metrics,
        "callbacks": [ConfusionLog(metrics, names)],
    }
