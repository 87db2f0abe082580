"""`data.task: classification` and `callbacks: early_stopping`: labels, metrics, the head, runs, export, bad input."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_config, write_recipe

from hf_stackwise.cli import pipeline as run
from hf_stackwise.cli.commands import main
from hf_stackwise.data.classification import Metrics, label_names
from hf_stackwise.errors import RecipeError
from hf_stackwise.rack.rack import Rack
from hf_stackwise.recipe.loader import load_recipe, validate_recipe
from hf_stackwise.schedule.phases import HEAD, Schedule, phase_defaults


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """The real classification set of `make assets` (stdlib docstrings labelled by package), written afresh."""
    from demo_assets import classification_set

    return classification_set(str(tmp_path_factory.mktemp("assets")))


@pytest.fixture(scope="module")
def tiny_bert_cls_dir(tmp_path_factory, tokenizer):
    """A saved tiny BERT encoder (4 blocks, no classifier yet) with the tiny tokenizer."""
    from transformers import AutoModel

    folder = tmp_path_factory.mktemp("tiny-bert-cls")
    torch.manual_seed(0)
    AutoModel.from_config(tiny_config("bert", layers=4)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def cls_recipe(tmp_path, model_dir, labelled, schedule=None, **training) -> dict:
    train, evaluation = labelled
    return {
        "model": {"name_or_path": model_dir, "dtype": "float32"},
        "data": {
            "task": "classification",
            "train": {"path": "json", "data_files": train},
            "eval": {"path": "json", "data_files": evaluation},
            "max_seq_length": 32,
            "max_eval_samples": 48,
        },
        "schedule": schedule
        or [{"name": "top", "until": 0.5, "train": ["top"]}, {"name": "all", "until": 1.0, "train": "all"}],
        "training": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 6,
            "per_device_train_batch_size": 8,
            "learning_rate": 3e-3,
            "eval_strategy": "steps",
            "eval_steps": 3,
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
            "seed": 0,
            **training,
        },
    }


CLEAN_CLASSIFY = (
    "import sys, torch, json; from transformers import AutoModelForSequenceClassification as A;"
    "m = A.from_pretrained(sys.argv[1]).eval(); ids = torch.tensor(json.loads(sys.argv[2]));"
    "torch.save(m(input_ids=ids).logits.detach(), sys.argv[3]);"
    "print(json.dumps(m.config.id2label), any(k in sys.modules for k in ('peft', 'hf_stackwise')))"
)


def clean_logits(folder, ids, tmp_path):
    """Logits of ``folder`` loaded by plain ``AutoModelForSequenceClassification`` in a fresh process, and its
    ``id2label``."""
    out_file = tmp_path / "clean.pt"
    out = subprocess.run(
        [sys.executable, "-c", CLEAN_CLASSIFY, str(folder), json.dumps(ids.tolist()), str(out_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    labels, needed = out.stdout.strip().rsplit(" ", 1)
    assert needed == "False", "the export needed hf_stackwise or peft to load"
    return torch.load(out_file), {int(k): v for k, v in json.loads(labels).items()}


# ---- labels, metrics, the head ---------------------------------------------------------------------------


def test_metrics_on_a_known_confusion():
    """Confusion [[3, 1, 0], [0, 2, 2], [1, 0, 1]] (rows: true): the numbers worked out by hand, and scikit-learn's."""
    from sklearn.metrics import f1_score
    from transformers import EvalPrediction

    confusion = [[3, 1, 0], [0, 2, 2], [1, 0, 1]]
    truth, predicted = [], []
    for t, row in enumerate(confusion):
        for p, n in enumerate(row):
            truth += [t] * n
            predicted += [p] * n
    logits = torch.nn.functional.one_hot(torch.tensor(predicted), 3).float().numpy()
    metrics = Metrics(3)
    values = metrics(EvalPrediction(predictions=logits, label_ids=torch.tensor(truth).numpy()))
    precision = (3 / 4 + 2 / 3 + 1 / 3) / 3
    recall = (3 / 4 + 2 / 4 + 1 / 2) / 3
    f1 = (0.75 + 4 / 7 + 0.4) / 3
    assert values["accuracy"] == pytest.approx(6 / 10, abs=1e-12)
    assert values["precision"] == pytest.approx(precision, abs=1e-12)
    assert values["recall"] == pytest.approx(recall, abs=1e-12)
    assert values["f1"] == pytest.approx(f1, abs=1e-12)
    assert values["f1"] == f1_score(truth, predicted, average="macro")
    assert metrics.confusion == confusion


def test_label_names_from_class_label_strings_and_ints():
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos", "mixed"])})
    assert label_names(Dataset.from_dict({"text": ["a", "b"], "label": [0, 0]}, features), "label", "k") == [
        "neg",
        "pos",
        "mixed",
    ]
    assert label_names(Dataset.from_dict({"label": ["b", "a", "c", "a"]}), "label", "k") == ["a", "b", "c"]
    assert label_names(Dataset.from_dict({"label": [3, 1, 3]}), "label", "k") == [1, 3]
    with pytest.raises(RecipeError, match="data.label_column: the labels of k are float values"):
        label_names(Dataset.from_dict({"label": [0.5, 1.5]}), "label", "k")


def test_the_head_trains_in_every_phase_unless_frozen():
    raw = [
        {"name": "head", "until": 0.3, "train": "none"},
        {"name": "top", "until": 0.6, "train": ["top"]},
        {"name": "frozen", "until": 1.0, "train": "all", "head": "freeze"},
    ]
    schedule = Schedule.from_list(raw, phase_defaults("classification"))
    assert [HEAD in units for units in schedule.phase_units(4)] == [True, True, False]
    assert [HEAD in units for units in Schedule.from_list(raw).phase_units(4)] == [False, False, False]
    assert schedule.to_list()[0]["head"] == "train"  # the default is part of the schedule (and its fingerprint)
    assert schedule.fingerprint() != Schedule.from_list(raw).fingerprint()


@pytest.mark.parametrize(
    "family, names",
    [("bert", ["bert.pooler.dense.weight", "classifier.weight"]), ("llama", ["model.norm.weight", "score.weight"])],
)
def test_the_classifier_is_the_head_unit(family, names):
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(tiny_config(family, layers=4))
    head = [name for name, _ in Rack.from_model(model).parameter_units()[HEAD]]
    assert all(name in head for name in names) and not any(".layer" in n or "embed" in n for n in head)


# ---- runs ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_llama_classification_run_logs_metrics_and_exports_a_plain_classifier(
    tmp_path, tiny_llama_dir, labelled, tokenizer
):
    """The decoder path: Llama with a pad token; top stack then everything, the head in both phases."""
    raw = cls_recipe(tmp_path, tiny_llama_dir, labelled, logging_steps=1)
    recipe = validate_recipe(raw)
    prepared = run.prepare(recipe)
    assert prepared.config.id2label == dict(enumerate(["asyncio", "email", "http", "logging", "unittest", "xml"]))
    assert prepared.config.pad_token_id == tokenizer.pad_token_id
    trainer = run.build_trainer(prepared)
    trainer.train()
    trainer.save_model(prepared.args.output_dir)
    trainer.save_state()  # trainer_state.json at the run's root, as `hf-stackwise train` leaves it
    history = trainer.state.log_history
    evals = [h for h in history if "eval_accuracy" in h]
    assert [h["step"] for h in evals] == [3, 6]
    assert all({"eval_f1", "eval_precision", "eval_recall", "eval_loss"} <= set(h) for h in evals)
    assert not any("eval_perplexity" in h for h in history)
    assert all(h["learning_rate/head"] > 0 for h in history if "loss" in h)  # the new head trains in `top` too
    confusion = json.loads((tmp_path / "run" / "confusion.json").read_text())
    assert [e["step"] for e in confusion["evals"]] == [3, 6] and confusion["labels"][0] == "asyncio"
    assert sum(map(sum, confusion["evals"][-1]["matrix"])) == 48
    correct = sum(confusion["evals"][-1]["matrix"][i][i] for i in range(6))
    assert correct / 48 == pytest.approx(evals[-1]["eval_accuracy"])

    from hf_stackwise.export.folder import export

    export(str(tmp_path / "run"), str(tmp_path / "export"))
    ids = torch.tensor([tokenizer("Return the logger with the given name.")["input_ids"]])
    model = trainer.model.eval()
    with torch.no_grad(), trainer.arranged():
        trained = model(input_ids=ids).logits
    logits, id2label = clean_logits(tmp_path / "export", ids, tmp_path)
    assert id2label == prepared.config.id2label
    assert torch.allclose(logits, trained, atol=1e-5) and logits.argmax(-1) == trained.argmax(-1)
    assert "AutoModelForSequenceClassification" in (tmp_path / "export" / "README.md").read_text()

    from hf_stackwise.report.plots import plot_run

    written = plot_run(str(tmp_path / "run"), str(tmp_path / "plots"))
    assert (
        written[-1].endswith("confusion.png") and (tmp_path / "plots" / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    )


@pytest.mark.slow
def test_early_stopping_ends_a_three_phase_run_at_the_best_checkpoint(
    tmp_path, tiny_bert_cls_dir, labelled, tokenizer
):
    """Phase `shallow` (2 of 4 stacks) improves; phase `blowup` (all stacks, a huge rate) makes eval worse, so early
    stopping fires inside it; phase `late` never runs. The saved and exported model is the best checkpoint, run as
    the phase that produced it: 2 blocks."""
    schedule = [
        {"name": "shallow", "until": 0.3, "stacks": 2, "train": "all"},
        {"name": "blowup", "until": 0.6, "train": "all", "learning_rate": 3.0},
        {"name": "late", "until": 1.0, "train": "all"},
    ]
    raw = cls_recipe(tmp_path, tiny_bert_cls_dir, labelled, schedule, max_steps=10, eval_steps=1, logging_steps=1)
    del raw["training"]["save_strategy"]
    raw["callbacks"] = {"early_stopping": {"patience": 2, "metric": "loss"}}
    raw["rack"] = {"blocks_per_stack": 1}
    prepared = run.prepare(validate_recipe(raw))
    assert prepared.args.load_best_model_at_end and prepared.args.save_strategy == "steps"
    assert prepared.args.metric_for_best_model == "loss" and prepared.args.greater_is_better is False
    trainer = run.build_trainer(prepared)
    trainer.train()
    trainer.save_model(prepared.args.output_dir)
    state = trainer.state
    history = state.log_history
    losses = {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}
    assert state.global_step < 10
    assert max(h.get("phase_index", 0) for h in history) == 1, "early stopping fires in phase 2; phase 3 never runs"
    best = state.best_global_step
    assert losses[best] == min(losses.values()) and best <= 3  # the best eval is one of phase 1's
    assert [s for s in losses if s > best] == list(range(best + 1, state.global_step + 1))  # patience evals
    run_dir = tmp_path / "run"
    manifest = json.loads((run_dir / "stackwise_state.json").read_text())
    assert manifest["phase"]["name"] == "shallow" and manifest["phase"]["blocks"] == [0, 1]
    assert manifest["global_step"] == best and manifest["stopped_at_step"] == state.global_step

    from safetensors.torch import load_file

    saved = load_file(run_dir / "model.safetensors")  # the 2 blocks phase `shallow` runs, as a plain model
    # the checkpoint keeps every block (it does not load as the 2-block model): the saved tensors are its first two
    at_best = load_file(run_dir / f"checkpoint-{best}" / "model.unarranged.safetensors")
    assert not (run_dir / f"checkpoint-{best}" / "model.safetensors").exists()
    assert saved.keys() < at_best.keys() and all(torch.equal(saved[k], at_best[k]) for k in saved)

    from hf_stackwise.export.folder import export

    export(str(run_dir), str(tmp_path / "export"))
    export(str(run_dir / f"checkpoint-{best}"), str(tmp_path / "export-best"))
    ids = torch.tensor([tokenizer("Send an HTTP request to the server.")["input_ids"]])
    logits, _ = clean_logits(tmp_path / "export", ids, tmp_path)
    best_logits, _ = clean_logits(tmp_path / "export-best", ids, tmp_path)
    assert torch.equal(logits, best_logits)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["num_hidden_layers"] == 2
    with torch.no_grad(), trainer.arranged():
        trained = trainer.model.eval()(input_ids=ids).logits
    assert torch.allclose(logits, trained, atol=1e-5)


@pytest.mark.slow
def test_minilm_classify_ulmfit_recipe_runs_briefly(tmp_path, tiny_bert_cls_dir, monkeypatch):
    """The shipped recipe, unchanged but for the model (a tiny 4-block BERT, 2 stacks) and the run length; early
    stopping stays on."""
    monkeypatch.chdir(ROOT)  # the recipe names its data relative to the project root (`make assets`)
    overrides = ["--model.name_or_path", tiny_bert_cls_dir, "--training.output_dir", str(tmp_path / "run")]
    overrides += ["--training.max_steps", "8", "--training.per_device_train_batch_size", "4"]
    overrides += ["--training.eval_steps", "4", "--data.max_seq_length", "32", "--training.logging_steps", "1"]
    summary = run.train(load_recipe("recipes/minilm/classify_ulmfit.yaml", overrides))
    assert [name for _, name, _ in summary["trace"]] == ["head", "top", "all"]
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert any("eval_f1" in h for h in state["log_history"])
    assert state["best_global_step"] in (4, 8)
    phases = {h["phase"] for h in state["log_history"] if "loss" in h}
    assert phases == {"head", "top", "all"} or summary["global_step"] < 8


def test_max_length_padding_pads_every_row_so_the_cache_replays_a_frozen_prefix(tmp_path, tiny_bert_cls_dir, labelled):
    """``data.padding: max_length``: every batch is ``max_seq_length`` wide (per batch by default), so a row's inputs
    are the same at each visit and the activation cache serves the frozen prefix at every visit after the first."""
    trainers = {}
    for padding in ("max_length", "longest"):
        top = [{"name": "top", "until": 1.0, "train": ["top"]}]
        raw = cls_recipe(tmp_path / padding, tiny_bert_cls_dir, labelled, top)
        raw["model"]["config"] = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
        raw["data"]["padding"] = padding
        raw["training"].update(max_steps=18, per_device_train_batch_size=64, eval_strategy="no")  # 2 epochs of 9
        trainer = trainers[padding] = run.build_trainer(run.prepare(validate_recipe(raw)))
        widths = {trainer.data_collator([trainer.train_dataset[i] for i in rows])["input_ids"].shape[1]
                  for rows in ([0], [1, 2, 3])}  # fmt: skip
        assert (widths == {32}) == (padding == "max_length"), widths
    trainers["max_length"].train()
    stats = trainers["max_length"].cache_stats()
    assert stats["rows"] == 2 * 517 and stats["hits"] == 517  # the 517 training rows, each a hit at its second visit


LORA_PHASES = [
    {"name": "head", "until": 0.34, "train": "none"},
    {"name": "top", "until": 0.67, "train": ["top"], "adapter": "lora", "lora": {"r": 4, "alpha": 8}},
    {"name": "all", "until": 1.0, "train": "all", "adapter": "lora", "trunk": "lora"},
]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_lora_phases_train_the_head_as_modules_to_save_and_export_a_plain_classifier(
    tmp_path, family, tiny_bert_cls_dir, tiny_llama_dir, labelled, tokenizer
):
    """LoRA phases on an encoder (BERT) and a decoder (Llama) classifier: the classifier trains as PEFT's
    `modules_to_save`, and both the run folder (merged at the end of `train`) and `hf-stackwise export` load in plain
    AutoModelForSequenceClassification with the run's labels and the trained model's logits."""
    from peft.utils import ModulesToSaveWrapper

    from hf_stackwise.export.folder import export, merge_into

    model_dir = tiny_bert_cls_dir if family == "bert" else tiny_llama_dir
    raw = cls_recipe(tmp_path, model_dir, labelled, LORA_PHASES, eval_strategy="no")
    prepared = run.prepare(validate_recipe(raw))
    trainer = run.build_trainer(prepared)
    head = "classifier" if family == "bert" else "score"
    wrapper = trainer.model.get_submodule(f"base_model.model.{head}")
    assert isinstance(wrapper, ModulesToSaveWrapper)
    before = wrapper.original_module.weight.detach().clone()
    trainer.train()
    trained_head = wrapper.modules_to_save[wrapper.active_adapter].weight
    assert not torch.equal(trained_head, before)  # the copy PEFT keeps trained; its original stays the base's
    assert torch.equal(wrapper.original_module.weight, before)
    trainer.save_model(prepared.args.output_dir)
    merge_into(prepared.args.output_dir)  # what `hf-stackwise train` does at the end of an adapter run
    export(str(tmp_path / "run"), str(tmp_path / "export"))
    ids = torch.tensor([tokenizer("Return the logger with the given name.")["input_ids"]])
    model = trainer.model.eval()
    with torch.no_grad(), trainer.arranged():
        trained = model(input_ids=ids).logits
    for folder in (tmp_path / "run", tmp_path / "export"):
        logits, id2label = clean_logits(folder, ids, tmp_path)
        assert id2label == prepared.config.id2label
        assert logits.shape == trained.shape and (logits - trained).abs().max() <= 1e-5, folder


@pytest.mark.slow
def test_the_ulmfit_recipe_repeats_bitwise_in_separate_processes(tmp_path, tiny_bert_cls_dir):
    """The same recipe and seed in two fresh processes (different hash seeds) give the same weights, bit for bit:
    the new classifier head is initialised while the model loads, so the seed must be set before that."""
    overrides = ["--model.name_or_path", tiny_bert_cls_dir, "--training.max_steps", "6"]
    overrides += ["--training.per_device_train_batch_size", "4", "--training.eval_steps", "3"]
    overrides += ["--data.max_seq_length", "32", "--training.logging_steps", "1"]
    recipe = os.path.join(ROOT, "recipes", "minilm", "classify_ulmfit.yaml")
    runs, procs = [tmp_path / "run-1", tmp_path / "run-2"], []
    for hash_seed, out in zip(("1", "2"), runs, strict=True):  # both at once: one core each
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        cmd = [sys.executable, "-m", "hf_stackwise", "train", recipe, *overrides, "--training.output_dir", str(out)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-3000:]
    from safetensors.torch import load_file

    first, second = (load_file(str(out / "model.safetensors")) for out in runs)
    assert first.keys() == second.keys()
    for name, value in first.items():
        assert torch.equal(value, second[name]), name
    losses = [
        [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
        for out in runs
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 6


# ---- bad input -------------------------------------------------------------------------------------------


def bad_cases(tmp_path, model_dir, labelled) -> list[tuple[dict, str]]:
    base = cls_recipe(tmp_path, model_dir, labelled)
    folder = tmp_path / "data"
    folder.mkdir()
    rows = {
        "mixed.jsonl": [{"text": "a", "label": "x"}, {"text": "b", "label": 1}],
        "single.jsonl": [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}],
        "nolabel.jsonl": [{"text": "a", "category": "x"}, {"text": "b", "category": "y"}],
    }
    for name, items in rows.items():
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in items))

    def with_train(name):
        raw = copy.deepcopy(base)
        raw["data"]["train"] = {"path": "json", "data_files": str(folder / name)}
        return raw

    no_eval = copy.deepcopy(base)
    del no_eval["data"]["eval"], no_eval["training"]["save_strategy"]
    no_eval["callbacks"] = {"early_stopping": {"patience": 1}}
    clm_f1 = copy.deepcopy(base)
    clm_f1["data"]["task"] = "clm"
    del clm_f1["training"]["save_strategy"]
    clm_f1["callbacks"] = {"early_stopping": {"patience": 1, "metric": "f1"}}
    no_evals = copy.deepcopy(base)
    no_evals["training"]["eval_strategy"] = "no"
    del no_evals["training"]["save_strategy"]
    no_evals["callbacks"] = {"early_stopping": {"patience": 2}}
    saves = copy.deepcopy(base)
    saves["callbacks"] = {"early_stopping": {"patience": 2, "metric": "accuracy"}}
    phase_length = copy.deepcopy(base)
    phase_length["schedule"][0]["max_seq_length"] = 16
    padding = copy.deepcopy(base)
    padding["data"]["padding"] = "right"
    return [
        (padding, "data.padding: 'right' is not one of longest, max_length"),
        (with_train("mixed.jsonl"), "data.label_column: the labels of data.train mix integer and string values"),
        (with_train("single.jsonl"), "data.label_column: data.train has 1 class (['x']); classification needs"),
        (with_train("nolabel.jsonl"), "data.label_column: 'label' is not a column of data.train"),
        (no_eval, "callbacks.early_stopping: early stopping watches an eval metric, and the recipe has no eval set"),
        (clm_f1, "callbacks.early_stopping.metric: 'f1' is not an eval metric of a `clm` run"),
        (no_evals, "callbacks.early_stopping: needs evals during training; set `training.eval_strategy: steps`"),
        (saves, "training.save_strategy: 'no', but early stopping reloads the best checkpoint"),
        (phase_length, "schedule[0].max_seq_length: a classification run keeps its task and its rows"),
    ]


def test_bad_input_is_one_paragraph_before_any_weight_and_writes_nothing(
    tmp_path, tiny_bert_cls_dir, labelled, capsys, monkeypatch
):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the recipe was refused")

    monkeypatch.setattr(run, "load_model", no_weights)
    cases = bad_cases(tmp_path, tiny_bert_cls_dir, labelled)
    codegen = tmp_path / "codegen"  # a model type with a causal LM but no sequence-classification class
    tiny = tiny_config("llama")
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("codegen", n_layer=4, n_embd=64, n_head=4, vocab_size=tiny.vocab_size)
    AutoModelForCausalLM.from_config(config).save_pretrained(codegen)  # a complete folder: weights and config
    raw = cls_recipe(tmp_path, str(codegen), labelled)
    cases.append((raw, "data.task: `classification` needs a sequence-classification architecture"))
    for index, (raw, expected) in enumerate(cases):
        path = tmp_path / f"case{index}"
        path.mkdir()
        listing = sorted(str(p) for p in tmp_path.rglob("*"))
        assert main(["train", write_recipe(path, raw)]) == 2, expected
        err = capsys.readouterr().err  # datasets' progress bars may come first, on lines of their own
        message = err.rstrip("\n").split("\n")[-1]
        assert message.startswith("hf-stackwise: error: ") and expected in message and "Traceback" not in err, err
        listing.append(str(path / "recipe.yaml"))
        assert sorted(str(p) for p in tmp_path.rglob("*")) == sorted(listing), expected
        assert not os.path.exists(raw["training"]["output_dir"])


def test_early_stopping_sets_the_trainer_arguments_it_needs():
    from hf_stackwise.recipe.callbacks import build_callbacks, training_arguments

    training = {"eval_strategy": "steps", "eval_steps": 5}
    assert training_arguments({"early_stopping": {"patience": 2, "metric": "eval_accuracy"}}, training) == {
        "load_best_model_at_end": True,
        "metric_for_best_model": "accuracy",
        "greater_is_better": True,
        "save_strategy": "steps",
        "save_steps": 5,
    }
    perplexity = training_arguments(
        {"early_stopping": {"patience": 1, "metric": "perplexity"}}, {"eval_strategy": "epoch"}
    )
    assert perplexity["greater_is_better"] is False and perplexity["save_strategy"] == "epoch"
    assert training_arguments({}, training) == {} and build_callbacks({}) == []
    (callback,) = build_callbacks({"early_stopping": {"patience": 3, "threshold": 0.01}})
    assert (callback.early_stopping_patience, callback.early_stopping_threshold) == (3, 0.01)
