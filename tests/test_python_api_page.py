"""docs/python-api.md runs as written: each ```python block executes on its own (no name it does not define) from
a folder that holds the repository's `.cache/` (`make assets`) and `recipes/`, with fewer steps, shorter rows and
smaller batches; the export block produces what its comment says, and no block prints a deprecation warning."""

from __future__ import annotations

import os
import pathlib
import re
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "python-api.md"
SHORTER = {"max_steps=300": "max_steps=4", "length=128": "length=32", "logging_steps=10": "logging_steps=1"}
SHORTER["per_device_train_batch_size=8"] = "per_device_train_batch_size=2"
SHORTER_SFT = {"max_steps=300": "max_steps=2", "max_length=512,": "max_length=64, per_device_train_batch_size=2,"}
SHORTER_DPO = {"max_steps=120": "max_steps=2", "max_length=256,": "max_length=48, per_device_train_batch_size=2,"}


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)


def shortened(code: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in code, f"the test shortens `{old}`, which the block no longer has"
        code = code.replace(old, new)
    return code


def run_block(code: str) -> dict:
    """Execute one block in a namespace of its own; returns the namespace. Deprecation warnings fail."""
    namespace: dict = {"__name__": "python_api_page"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, str(PAGE), "exec"), namespace)
    deprecated = [str(w.message) for w in caught if "deprecat" in str(w.message).lower()]
    assert deprecated == [], deprecated
    return namespace


@pytest.fixture
def fresh_clone(tmp_path, monkeypatch):
    if not (ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct" / "model.safetensors").exists():
        pytest.skip("needs `make assets`")
    for name in (".cache", "recipes"):
        os.symlink(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_every_block_of_the_python_api_page_runs_as_written(fresh_clone):
    train, export, sft, dpo = blocks()
    assert "StackwiseTrainer(" in train and "export(" in export and "StackwiseSFTTrainer(" in sft
    assert "StackwiseDPOTrainer(" in dpo

    trained = run_block(shortened(train, SHORTER))
    assert trained["trainer"].state.global_step == 4
    run = fresh_clone / "runs" / "unfreeze"
    assert {"model.safetensors", "tokenizer.json", "trainer_state.json"} <= set(os.listdir(run))

    planned = run_block(export)
    assert planned["plan"].phases[0].memory["total"] > 0
    out = fresh_clone / "runs" / "unfreeze-export"
    # what the comment promises: a plain model folder, its tokenizer, a model card and loss.png
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "loss.png"} <= set(os.listdir(out))
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 30

    tuned = run_block(shortened(sft, SHORTER_SFT))
    assert tuned["trainer"].state.global_step == 2
    assert [p for _, p, _ in tuned["trainer"].resolved.trace(5)] == ["top", "lora"]

    aligned = run_block(shortened(dpo, SHORTER_DPO))
    assert aligned["trainer"].state.global_step == 2 and aligned["trainer"].reference_way == "shared"
