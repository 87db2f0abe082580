"""Refusals that give the real reason, once (issue 24 point 4): the cache on a classifier with dropout, a phase
`task` in a classification run, and `training.ddp_find_unused_parameters: false` on a model that skips parameters."""

from __future__ import annotations

import pathlib

import pytest
import yaml
from conftest import tiny_config

from hf_stackwise.cli.commands import main
from hf_stackwise.distributed.ddp import find_unused_parameters

ROOT = pathlib.Path(__file__).resolve().parents[1]
ULMFIT = "recipes/minilm/classify_ulmfit.yaml"


@pytest.fixture
def in_root(monkeypatch):
    if not (ROOT / ".cache" / "models" / "all-MiniLM-L6-v2").exists():
        pytest.skip("needs `make assets`")
    monkeypatch.chdir(ROOT)  # the shipped recipe names its model and data relative to the project root


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.startswith(("hf-stackwise: error", "  - "))]


def test_cache_true_on_the_minilm_classifier_names_dropout_once(in_root, capsys):
    """A classification head is not tied to the input embeddings (BERT's config says `tie_word_embeddings`, for
    its LM head); what makes the prefix's output differ between visits is dropout, in every phase: said once."""
    assert main(["validate", ULMFIT, "--cache.activations", "true"]) == 2
    lines = error_lines(capsys)
    assert lines == [
        "hf-stackwise: error: schedule[0], schedule[1]: model.config.attention_probs_dropout_prob=0.1: the prefix is "
        "stochastic in training mode, so its output differs between visits; set `cache.activations: auto` or false"
    ]


def test_a_phase_task_in_a_classification_run_is_one_error(in_root, capsys):
    assert main(["validate", ULMFIT, "--schedule.1.task", "mlm"]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("hf-stackwise: error: schedule[1].task: a classification run")
    assert "early_stopping" not in lines[0]


def test_find_unused_parameters_false_is_refused_in_validate_for_a_model_that_skips_parameters(tmp_path, capsys):
    """A mixture of experts leaves an expert no token chose without gradient: `false` would stop DDP at the next
    step, so `validate` refuses it (config only, before any launch); left unset, the search is on for it and off
    for a dense model (the reducer holds each phase's trainable set; tests/test_ddp.py trains with `false`)."""
    from transformers import AutoConfig

    moe = AutoConfig.for_model(
        "mixtral", vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    folder = tmp_path / "moe"
    moe.save_pretrained(folder)
    (tmp_path / "train.txt").write_text("a line of text\n" * 50)
    recipe = {
        "model": {"name_or_path": str(folder), "from_scratch": True},
        "rack": {"blocks_per_stack": 2},
        "data": {"train": {"path": "text", "data_files": str(tmp_path / "train.txt")}, "max_seq_length": 16},
        "schedule": [{"name": "top", "until": 0.5, "train": ["top"]}, {"name": "all", "until": 1.0, "train": "all"}],
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "ddp_find_unused_parameters": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(path)]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1
    assert lines[0].startswith(
        "hf-stackwise: error: training.ddp_find_unused_parameters: false, but the model routes tokens to experts "
        "(num_local_experts: 4)"
    )
    assert not (tmp_path / "run").exists()
    assert find_unused_parameters(None, moe) is True
    assert find_unused_parameters(None, tiny_config("llama")) is False
    assert find_unused_parameters(True, tiny_config("llama")) is True
    layerdrop = tiny_config("bert")
    layerdrop.layerdrop = 0.1
    assert find_unused_parameters(None, layerdrop) is True


def test_a_yaml_boolean_for_embeddings_says_to_write_train_or_freeze(tmp_path):
    """`embeddings: yes` is a YAML 1.1 boolean; the message names the words the key takes."""
    from hf_stackwise.errors import RecipeError
    from hf_stackwise.recipe.loader import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(
        "model: {name_or_path: some/model}\n"
        "data: {train: {path: text, data_files: train.txt}}\n"
        "schedule:\n  - {name: all, until: 1.0, train: all, embeddings: yes, learning_rate: 1e-5}\n"
        "training: {output_dir: run, max_steps: 4}\n"
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(str(path))
    assert info.value.problems == [
        "schedule[0].embeddings: True: YAML reads yes/no/on/off/true/false as a boolean; write `embeddings: train` "
        "or `embeddings: freeze`"
    ]  # and `learning_rate: 1e-5` is a number, not a second problem
