"""The data plane end to end on tiny models: bad input named before weights load, logs and eval metrics,
resume exactness with a mask ramp and a mixture, workers 0 vs 2, the datasets cache, the shipped recipes."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import shutil

import pytest
import torch
from conftest import build_tokenizer, pydoc_paragraphs, tiny_config, tiny_recipe, write_recipe

from hf_stackwise.cli import pipeline as run
from hf_stackwise.recipe.loader import apply_overrides, load_recipe, validate_recipe
from hf_stackwise.schedule.phases import RecipeError

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory, tokenizer):
    """A saved tiny BertForMaskedLM (6 blocks, as MiniLM) with the tiny tokenizer (it has [MASK])."""
    from transformers import AutoModelForMaskedLM

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    AutoModelForMaskedLM.from_config(tiny_config("bert", layers=6)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two real-text sources: the first and the second half of the pydoc topics."""
    folder = tmp_path_factory.mktemp("corpora")
    paragraphs = pydoc_paragraphs()
    half = len(paragraphs) // 2
    general, domain = folder / "general.txt", folder / "domain.jsonl"
    general.write_text("\n".join(paragraphs[:half]) + "\n")
    domain.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs[half:]))
    return str(general), str(domain)


def mixture_recipe(tmp_path, model_dir, corpora, task="mlm", **training) -> dict:
    """A 3-phase curriculum: mask ramp, short → long rows, general → domain mixture."""
    general, domain = corpora
    schedule = [
        {"name": "top", "until": 0.25, "train": ["top"], "head": "train", "max_seq_length": 16},
        {"name": "upper", "until": 0.75, "train": [1, 2], "head": "train", "data": {"general": 1, "domain": 1}},
        {"name": "all", "until": 1.0, "train": "all", "data": {"general": 0.2, "domain": 0.8}},
    ]
    schedule[0]["data"] = {"general": 1}
    if task == "mlm":
        schedule[0]["mask_rate"] = [0.15, 0.3]
        schedule[1]["mask_rate"] = [0.3, 0.5]
        schedule[1]["mask_schedule"] = "cosine"
    raw = tiny_recipe(tmp_path, model_dir, general, schedule, max_steps=8, logging_steps=1, seed=0, **training)
    raw["rack"] = {"blocks_per_stack": 2}
    del raw["data"]["train"]
    raw["data"].update(
        task=task,
        datasets={
            "general": {"path": "text", "data_files": general},
            "domain": {"path": "json", "data_files": domain},
        },
        text_column="text",
        eval_fraction=0.05,
        max_eval_samples=8,
    )
    return raw


def errors(raw) -> str:
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw)
    return str(info.value)


@pytest.mark.parametrize(
    "change, expected",
    [
        (("schedule.0.data", {"generl": 1}), "schedule[0].data: ['generl'] not declared in `data.datasets`"),
        (("schedule.0.data", {"general": 0, "domain": 0}), "schedule[0].data: every mixture weight is 0"),
        (("schedule.0.data", {"general": -1}), "schedule[0].data: weights {'general': -1} are not non-negative"),
        (("schedule.0.mask_rate", 0), "schedule[0].mask_rate: 0 is not a rate in (0, 1)"),
        (("schedule.0.mask_rate", 1.2), "schedule[0].mask_rate: 1.2 is not a rate in (0, 1)"),
        (("schedule.0.mask_rate", [0.1, 0.2, 0.3]), "schedule[0].mask_rate: [0.1, 0.2, 0.3] is not a rate in (0, 1)"),
        (("schedule.0.mask_rate", [0.1, 1.0]), "schedule[0].mask_rate: [0.1, 1.0] is not a rate in (0, 1)"),
        (("schedule.0.mask_schedule", "step"), "schedule[0].mask_schedule: 'step' is not one of"),
        (("schedule.0.max_seq_length", 0), "schedule[0].max_seq_length: 0 is not an integer >= 2"),
        (("schedule.0.task", "seq2seq"), "schedule[0].task: 'seq2seq' is not one of"),
        (("schedule.0.task", "clm"), "schedule: phases mix `clm` with ['mlm']"),
        (("data.mask_rate", 1), "data.mask_rate: 1 is not a rate in (0, 1)"),
        (("data.mask_split", [0.8, 0.1]), "data.mask_split: [0.8, 0.1] is not three non-negative fractions"),
        (("data.eval_mask_rate", 0.0), "data.eval_mask_rate: 0.0 is not a rate in (0, 1)"),
        (("data.train", {"path": "text"}), "data: give either `train` or named `datasets`"),
        (("data.diffusion_weighting", "yes"), "data.diffusion_weighting: 'yes' is not true or false"),
    ],
)
def test_bad_data_plane_input_names_the_key(tmp_path, corpora, change, expected):
    raw = apply_overrides(mixture_recipe(tmp_path, "some/model", corpora), [change])
    assert expected in errors(raw)


def test_more_bad_input_names_the_key(tmp_path, corpora):
    raw = mixture_recipe(tmp_path, "some/model", corpora, task="clm")
    raw["schedule"][0]["mask_rate"] = 0.2
    assert "schedule[0].mask_rate: phase 'top' trains `clm`, which masks nothing" in errors(raw)
    raw = tiny_recipe(tmp_path, "some/model", corpora[0], [{"until": 1.0, "data": {"general": 1}}])
    assert "schedule[0].data: mixture weights need named datasets in `data.datasets`" in errors(raw)
    raw = apply_overrides(mixture_recipe(tmp_path, "some/model", corpora), [("data.task", "diffusion")])
    raw["data"]["diffusion_min_rate"] = 0.4
    assert "schedule[0].mask_rate: the diffusion rate is drawn from [data.diffusion_min_rate, mask_rate]" in errors(
        raw
    )


def prepare_error(tmp_path, raw, monkeypatch) -> str:
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before validation finished")

    monkeypatch.setattr(run, "load_model", no_weights)
    with pytest.raises(RecipeError) as info:
        run.prepare(load_recipe(write_recipe(tmp_path, raw)))
    return str(info.value)


def test_errors_against_model_tokenizer_and_data_before_weights(
    tmp_path, tiny_bert_dir, tiny_llama_dir, corpora, monkeypatch
):
    good = mixture_recipe(tmp_path, tiny_bert_dir, corpora)
    cases = [
        (("schedule.1.max_seq_length", 1024), "schedule[1].max_seq_length: 1024 exceeds the model's 258 positions"),
        (("data.text_column", "body"), "data.text_column: 'body' is not a column of data.datasets.domain"),
        (("model.name_or_path", tiny_llama_dir), "data.task: `mlm` / `diffusion` need a masked-LM architecture"),
        (("training.max_steps", -1), "training.max_steps: a mixture (`data.datasets`) is a stream"),
    ]
    for change, expected in cases:
        assert expected in prepare_error(tmp_path, apply_overrides(good, [change]), monkeypatch), change
    # a tokenizer without a mask token
    from transformers import PreTrainedTokenizerFast

    no_mask = tmp_path / "no-mask"
    shutil.copytree(tiny_bert_dir, no_mask)
    backend = build_tokenizer().backend_tokenizer
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>").save_pretrained(no_mask)
    message = prepare_error(tmp_path, apply_overrides(good, [("model.name_or_path", str(no_mask))]), monkeypatch)
    assert "data.task: `mlm` / `diffusion` replace tokens by the mask token, and the tokenizer of" in message
    # a source that yields no example after filtering blank lines
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    empty = apply_overrides(good, [("data.datasets.domain", {"path": "text", "data_files": str(blank)})])
    assert "data.datasets.domain: no example of 32 tokens after tokenizing" in prepare_error(
        tmp_path, empty, monkeypatch
    )
    assert not (tmp_path / "run").exists()


def train_recording(raw, tmp_path, resume=None):
    """Train a recipe; returns the trainer and every transformed micro-batch by step."""
    overrides = ["--training.resume_from_checkpoint", str(resume)] if resume is not None else None
    recipe = load_recipe(write_recipe(tmp_path, raw), overrides)  # a recipe is frozen once loaded
    prepared = run.prepare(recipe)
    trainer = run.build_trainer(prepared)
    batches: dict[int, list] = {}
    transform = trainer._transform_inputs

    def recording(inputs, step):
        out = transform(inputs, step)
        batches.setdefault(step, []).append({k: v.clone() for k, v in out.items()})
        return out

    trainer._transform_inputs = recording
    trainer.train(resume_from_checkpoint=prepared.resume_from_checkpoint)
    return trainer, batches


def history(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


def test_mlm_curriculum_logs_masks_and_evals(tmp_path, tiny_bert_dir, corpora):
    raw = mixture_recipe(tmp_path, tiny_bert_dir, corpora, eval_strategy="steps", eval_steps=4)
    trainer, batches = train_recording(raw, tmp_path)
    # the ramp at each step: phase top = steps 0-1 (0.15 → 0.3), upper = 2-5 (cosine 0.3 → 0.5), all = 6-7 (0.15)
    rates = history(trainer, "mask_rate")
    assert rates == pytest.approx([0.15, 0.3, 0.3, 0.3 + 0.2 * 0.25, 0.3 + 0.2 * 0.75, 0.5, 0.15, 0.15])
    assert history(trainer, "max_seq_length") == [16, 16, 32, 32, 32, 32, 32, 32]
    assert history(trainer, "mixture/domain") == [0, 0, 0.5, 0.5, 0.5, 0.5, 0.8, 0.8]
    # a 32-token row splits into 2 rows of 16 in the first phase: batch 4 → 8 rows
    assert batches[0][0]["input_ids"].shape == (8, 16) and batches[2][0]["input_ids"].shape == (4, 32)
    for step, (micro,) in batches.items():
        labelled = (micro["labels"] != -100).float().mean().item()
        assert labelled > 0 and (micro["labels"] != -100).sum() <= micro["input_ids"].numel(), step
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [e["phase"] for e in evals] == ["upper", "all"]
    assert all(0 <= e["eval_masked_accuracy"] <= 1 for e in evals)
    # eval corruption is fixed: the same positions at every eval, whatever the phase
    loader = trainer.get_eval_dataloader()
    first = next(iter(loader))
    a, b = trainer._transform_eval_inputs(first), trainer._transform_eval_inputs(first)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])


def test_clm_curriculum_logs_perplexity_and_counts_split_rows(tmp_path, tiny_llama_dir, corpora):
    raw = mixture_recipe(tmp_path, tiny_llama_dir, corpora, task="clm", eval_strategy="steps", eval_steps=8)
    raw["rack"] = {"blocks_per_stack": 1}
    raw["schedule"][1]["train"] = [1, 2]
    trainer, batches = train_recording(raw, tmp_path)
    assert history(trainer, "max_seq_length") == [16, 16, 32, 32, 32, 32, 32, 32]
    assert "mask_rate" not in trainer.state.log_history[0]
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert evals and evals[-1]["eval_perplexity"] == pytest.approx(2.718281828 ** evals[-1]["eval_loss"], rel=1e-4)
    assert torch.equal(batches[0][0]["labels"], batches[0][0]["input_ids"])  # labels split with their rows


@pytest.fixture(scope="module")
def full_mlm_run(tmp_path_factory, tiny_bert_dir, corpora):
    out = tmp_path_factory.mktemp("full-mlm")
    raw = mixture_recipe(out, tiny_bert_dir, corpora, save_steps=1, save_strategy="steps")
    raw["data"]["task"] = "diffusion"
    raw["data"]["diffusion_weighting"] = True
    raw["data"]["diffusion_min_rate"] = 0.05
    raw["schedule"][0]["task"] = "mlm"  # mlm first, diffusion after: tasks change per phase too
    trainer, batches = train_recording(raw, out)
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return out, raw, weights, batches


@pytest.mark.parametrize("step", [3, 6], ids=["mid-ramp", "boundary"])
def test_resume_gives_the_same_batches_masks_and_weights(tmp_path, full_mlm_run, step):
    out, raw, final, full_batches = full_mlm_run
    resumed_dir = tmp_path / "run"
    shutil.copytree(out / "run" / f"checkpoint-{step}", resumed_dir / f"checkpoint-{step}")
    shutil.copy(out / "run" / "stackwise_run.json", resumed_dir / "stackwise_run.json")
    raw = copy.deepcopy(raw)
    raw["training"]["output_dir"] = str(resumed_dir)
    trainer, batches = train_recording(raw, tmp_path, resume=str(resumed_dir / f"checkpoint-{step}"))
    assert sorted(batches) == list(range(step, 8))
    for k, micro_batches in batches.items():
        for ours, theirs in zip(micro_batches, full_batches[k], strict=True):
            assert ours.keys() == theirs.keys()
            assert all(torch.equal(ours[key], theirs[key]) for key in ours), k
    resumed = dict(trainer.model.named_parameters())
    assert all(torch.equal(resumed[n], value) for n, value in final.items())
    assert "label_weights" in full_batches[7][0] and "label_weights" not in full_batches[0][0]


@pytest.mark.slow
def test_same_batches_and_weights_with_0_and_2_workers(tmp_path, tiny_bert_dir, corpora):
    results = []
    for workers in (0, 2):
        folder = tmp_path / f"workers-{workers}"
        folder.mkdir()
        raw = mixture_recipe(folder, tiny_bert_dir, corpora, dataloader_num_workers=workers)
        raw["training"]["max_steps"] = 4
        trainer, batches = train_recording(raw, folder)
        results.append((batches, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}))
    (b0, w0), (b2, w2) = results
    assert sorted(b0) == sorted(b2) == [0, 1, 2, 3]
    assert all(torch.equal(b0[k][0][key], b2[k][0][key]) for k in b0 for key in b0[k][0])
    assert all(torch.equal(w0[n], w2[n]) for n in w0)


def test_second_run_reads_the_tokenized_cache(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    from hf_stackwise.data.loading import build_datasets

    text = tmp_path / "fresh.txt"
    text.write_text("\n".join(pydoc_paragraphs()[:300]) + "\n")
    data = {"train": {"path": "text", "data_files": str(text)}}
    first, _ = build_datasets(data, AutoTokenizer.from_pretrained(tiny_llama_dir), 32, 0)
    files = [f["filename"] for f in first.cache_files]
    stamps = [os.path.getmtime(f) for f in files]
    second, _ = build_datasets(data, AutoTokenizer.from_pretrained(tiny_llama_dir), 32, 0)
    assert [f["filename"] for f in second.cache_files] == files  # same fingerprint: read, not re-tokenized
    assert [os.path.getmtime(f) for f in files] == stamps


@pytest.mark.slow
def test_minilm_mask_ramp_recipe_runs_briefly(tmp_path, tiny_bert_dir, monkeypatch):
    """The shipped recipe, unchanged but for the model (a tiny 6-block BERT) and the run length."""
    monkeypatch.chdir(ROOT)  # the recipe names its data relative to the project root (`make assets`)
    overrides = [
        "--model.name_or_path",
        tiny_bert_dir,
        "--training.output_dir",
        str(tmp_path / "run"),
        "--training.max_steps",
        "4",
        "--training.per_device_train_batch_size",
        "2",
        "--training.eval_steps",
        "4",
        "--training.save_strategy",
        "no",
        "--data.max_seq_length",
        "32",
        "--training.logging_steps",
        "1",
    ]
    summary = run.train(load_recipe("recipes/minilm/mask_ramp.yaml", overrides))
    assert summary["global_step"] == 4
    assert [name for _, name, _ in summary["trace"]] == ["top", "upper", "all"]
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    rates = [h["mask_rate"] for h in state["log_history"] if "mask_rate" in h and "loss" in h]
    assert rates and all(0.15 <= r <= 0.5 for r in rates)
    assert any("eval_masked_accuracy" in h for h in state["log_history"])


@pytest.mark.slow
def test_context_mixture_recipe_runs_briefly(tmp_path, tokenizer, monkeypatch):
    from conftest import tiny_causal_lm

    folder = tmp_path / "tiny-30"
    tiny_causal_lm("llama", layers=30).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.chdir(ROOT)
    overrides = ["--model.name_or_path", str(folder), "--training.output_dir", str(tmp_path / "run")]
    overrides += ["--training.max_steps", "4", "--training.per_device_train_batch_size", "2"]
    overrides += ["--training.eval_steps", "4", "--training.save_strategy", "no", "--training.logging_steps", "1"]
    overrides += ["--data.max_seq_length", "32"]
    overrides += ["--schedule.0.max_seq_length", "8", "--schedule.1.max_seq_length", "16"]
    summary = run.train(load_recipe("recipes/smollm2-135m/context_mixture.yaml", overrides))
    assert summary["global_step"] == 4
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    logs = [h for h in state["log_history"] if "loss" in h]
    assert [h["max_seq_length"] for h in logs] == [8, 16, 16, 32][: len(logs)]
    assert logs[0]["mixture/general"] == 1.0
