"""`data.task: kto` through TRL's KTOTrainer with a schedule: the reference held as for DPO (`copy`, TRL's frozen full
copy, is the baseline; `shared` must equal it bitwise, `precompute` within 1e-6), the cache's refusal, and bad
settings. Tiny Llama from a config, fp32 CPU, real preference pairs from Python's docs (TRL unpairs them)."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from conftest import brief_run_args, tiny_causal_lm, write_recipe
from test_dpo import dpo_args, preference_rows, weights

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402

from hf_stackwise.cli import pipeline  # noqa: E402
from hf_stackwise.cli.commands import main  # noqa: E402
from hf_stackwise.integrations.kto_trainer import StackwiseKTOConfig, StackwiseKTOTrainer  # noqa: E402
from hf_stackwise.schedule.phases import RecipeError  # noqa: E402

KEYS = ("loss", "kl", "rewards/chosen", "rewards/rejected")


def kto_args(tmp_path, name: str, reference: str, **overrides) -> StackwiseKTOConfig:
    return dpo_args(tmp_path, name, reference, config=StackwiseKTOConfig, **overrides)


def run(tmp_path, tokenizer, name: str, reference: str, **overrides):
    trainer = StackwiseKTOTrainer(
        model=tiny_causal_lm("llama", layers=4),
        args=kto_args(tmp_path, name, reference, **overrides),
        train_dataset=Dataset.from_list(preference_rows(12)),  # 24 labelled completions
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer


def logged(trainer) -> list[tuple]:
    rows = [h for h in trainer.state.log_history if "loss" in h]
    return [tuple(h.get(k) for k in KEYS) for h in rows]


@pytest.fixture(scope="module")
def copy_run(tmp_path_factory, tokenizer):
    return run(tmp_path_factory.mktemp("kto"), tokenizer, "copy", "copy")


def test_shared_reference_equals_copy(copy_run, tmp_path, tokenizer):
    """The shared reference takes the policy's prefix state of the KL batch, then of the completions."""
    shared = run(tmp_path, tokenizer, "shared", "shared")
    assert shared.reference_cuts == [3, 2] and shared.reference_bytes < copy_run.reference_bytes / 2
    assert logged(shared) == logged(copy_run) and len(logged(copy_run)) == 6
    assert any(row[1] for row in logged(copy_run))  # the KL estimate (reference on the KL batch) is not zero
    before, after = weights(copy_run), weights(shared)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert [h["phase"] for h in shared.state.log_history if "loss" in h] == ["top"] * 3 + ["upper"] * 3


def test_precompute_reference_equals_copy(copy_run, tmp_path, tokenizer):
    precomputed = run(tmp_path, tokenizer, "precompute", "precompute")
    assert precomputed.ref_model is None and precomputed.reference_bytes == 0
    flat = [v for row in logged(precomputed) for v in row]
    assert flat == pytest.approx([v for row in logged(copy_run) for v in row], abs=1e-6)


def test_cache_refuses_kto_with_its_reason(tmp_path, tokenizer):
    with pytest.raises(RecipeError, match=r"schedule\[0\].*data.task kto: a step runs the policy on two batches"):
        run(tmp_path, tokenizer, "cached", "shared", max_steps=2, activation_cache={"activations": True})
    auto = run(tmp_path, tokenizer, "auto", "shared", max_steps=2, activation_cache={"activations": "auto"})
    assert not any(d.on for d in auto.cache_decisions) and "kto" in auto.cache_decisions[0].reason


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"desirable_weight": 0.0}, "training.desirable_weight: 0.0 is not positive"),
        ({"beta": 0.0}, "training.beta: 0.0 is not a positive number"),
        ({"reference": "mirror"}, "training.reference: 'mirror' is not one of"),
        ({"reference": "shared", "precompute_ref_log_probs": True}, "contradicts `reference: shared`"),
        ({"train_sampling_strategy": "random"}, "train_sampling_strategy: 'random' breaks the KL estimate"),
    ],
)
def test_bad_settings_are_refused(tmp_path, overrides, expected):
    with pytest.raises(RecipeError, match=expected):
        kto_args(tmp_path, "bad", **{"reference": "copy", **overrides})


def test_shared_refuses_a_schedule_that_trains_the_bottom(tmp_path, tokenizer):
    schedule = [{"name": "top", "until": 0.5, "train": ["top"]}, {"name": "all", "until": 1.0, "train": "all"}]
    with pytest.raises(RecipeError, match=r"schedule\[1\]\.embeddings.*nothing to share"):
        run(tmp_path, tokenizer, "bad", "shared", schedule=schedule)


ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_shipped_kto_recipe_runs_briefly_and_exports_the_policy(tmp_path, tiny_30_block_dir, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe names its data relative to the project root (made by `make assets`)
    argv = brief_run_args("recipes/smollm2-135m/kto_top.yaml", tiny_30_block_dir, tmp_path)
    assert main([*argv, "--training.logging_steps", "1"]) == 0
    assert "trained 4 steps" in capsys.readouterr().out
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    logged = [h for h in history if "loss" in h]
    assert logged and all("kl" in h and "phase" in h for h in logged)
    assert (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([{"prompt": "q", "completion": "a", "label": "yes"}], "data.train row 0: label: 'yes' is not true or false"),
        ([{"prompt": " ", "completion": "a", "label": True}], "data.train row 0: prompt: empty"),
        ([{"prompt": "q", "completion": "", "label": False}], "data.train row 0: completion: empty"),
        ([{"prompt": "q", "completion": "a"}], "data.train: no `label` column"),
        ([{"prompt": "q", "chosen": "a"}], "data.train: no `rejected` column"),
    ],
)
def test_bad_kto_rows_are_refused_before_weights_load(tmp_path, tiny_llama_dir, capsys, monkeypatch, rows, expected):
    monkeypatch.setattr(pipeline, "load_model", lambda prepared: pytest.fail("weights loaded"))
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {
        "model": {"name_or_path": tiny_llama_dir, "dtype": "float32"},
        "rack": {"blocks_per_stack": 1},
        "data": {"task": "kto", "train": {"path": "json", "data_files": str(data)}, "max_seq_length": 64},
        "schedule": [{"until": 1.0, "train": ["top"]}],
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "use_cpu": True, "report_to": "none"},
    }
    assert main(["train", write_recipe(tmp_path, raw)]) == 2
    err = capsys.readouterr().err
    assert expected in err[err.index("hf-stackwise: error: ") :] and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
