"""`plan` and `validate` read the model's config (and tokenizer), never its weights: a config-only model folder,
or a Hub id whose config alone is in the local Hugging Face cache (offline), plans and validates. `train` needs the
weights and refuses such a model before the data or any weight loads, naming the key and the fix."""

from __future__ import annotations

import os
import shutil

import huggingface_hub
import pytest
from conftest import tiny_recipe, write_recipe
from test_bad_input import SCHEDULE, refused
from transformers import AutoModelForCausalLM, PreTrainedModel

from hf_stackwise.cli import pipeline as run
from hf_stackwise.cli.commands import main

REPO_ID = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def no_weights_or_data(monkeypatch):
    """Any weight load fails the test; so does tokenizing the data for `train` (the refusal comes first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    def no_data(*args, **kwargs):
        raise AssertionError("`train` prepared the data before refusing a model without weights")

    monkeypatch.setattr(run, "load_model", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    return no_data


def config_and_tokenizer(source: str, target) -> None:
    """Copy a model folder's JSON files (config, tokenizer) but no weight file (nor the weights' index)."""
    os.makedirs(target, exist_ok=True)
    for name in os.listdir(source):
        if name.endswith(".json") and "safetensors" not in name:
            shutil.copy(os.path.join(source, name), target)
    assert "config.json" in os.listdir(target) and "tokenizer.json" in os.listdir(target)


@pytest.fixture
def config_only_folder(tiny_llama_dir, tmp_path):
    folder = tmp_path / "config-only"
    config_and_tokenizer(tiny_llama_dir, folder)
    return str(folder)


@pytest.fixture
def hub_cache(tiny_llama_dir, tmp_path, monkeypatch):
    """A local HF cache (the layout huggingface_hub writes: refs/main → snapshots/<commit>/) holding the config and
    tokenizer of ``REPO_ID`` and no weights; HF_HUB_CACHE points at it, offline."""
    cache = tmp_path / "hf-cache"
    repo = cache / ("models--" + REPO_ID.replace("/", "--"))
    config_and_tokenizer(tiny_llama_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import, used per call
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def recipe_for(model: str, tmp_path, pydoc_files) -> str:
    return write_recipe(tmp_path, tiny_recipe(tmp_path, model, pydoc_files[0], SCHEDULE))


@pytest.mark.parametrize("model", ["folder", "hub"])
def test_plan_and_validate_need_no_weights(
    model, config_only_folder, hub_cache, no_weights_or_data, tmp_path, pydoc_files, capsys
):
    name = config_only_folder if model == "folder" else REPO_ID
    path = recipe_for(name, tmp_path, pydoc_files)
    assert main(["plan", path]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "rack: 4 stacks over 4 blocks (model.layers)" in out and "4 steps" in out
    assert main(["validate", path]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert ": valid. 4 stacks over 4 blocks (model.layers), 4 steps:" in out
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("model", ["folder", "hub"])
def test_train_refuses_a_model_without_weights_before_the_data(
    model, config_only_folder, hub_cache, no_weights_or_data, tmp_path, pydoc_files, capsys, monkeypatch
):
    name = config_only_folder if model == "folder" else REPO_ID
    monkeypatch.setattr(run, "prepare", no_weights_or_data)
    err = refused(["train", recipe_for(name, tmp_path, pydoc_files)], capsys, tmp_path / "run", "model.name_or_path")
    assert "has a config but no weights" in err and "model.safetensors" in err and "from_scratch" in err
    assert ("local Hugging Face cache" in err) == (model == "hub")


def test_a_hub_id_with_cached_weights_is_not_refused(hub_cache, tiny_llama_dir, tmp_path, pydoc_files):
    """The same lookup finds weights the cache holds (so the refusal above is about the missing file)."""
    from hf_stackwise.cli.preflight import check_weights
    from hf_stackwise.recipe.loader import load_recipe

    snapshot = hub_cache / ("models--" + REPO_ID.replace("/", "--")) / "snapshots" / COMMIT
    recipe = load_recipe(recipe_for(REPO_ID, tmp_path, pydoc_files))
    with pytest.raises(run.RecipeError, match="has a config but no weights"):
        check_weights(recipe)
    shutil.copy(os.path.join(tiny_llama_dir, "model.safetensors"), snapshot)
    check_weights(recipe)
