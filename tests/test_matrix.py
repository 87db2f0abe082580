"""The matrix `adapter` × `trunk` × quantized on a tiny model: trainable units per phase, frozen base and idle
adapters bit-identical, trained parts changed, the merged export reproducing the trained model, exact resume."""

from __future__ import annotations

import itertools
import shutil

import pytest
import torch
import yaml
from conftest import tiny_recipe
from test_trainer import Recorder

from hf_stackwise.cli import pipeline as run
from hf_stackwise.export.folder import load_merged
from hf_stackwise.persist.checkpoint import read_json
from hf_stackwise.recipe.loader import load_recipe
from hf_stackwise.schedule.phases import RecipeError, lora_unit, stack_unit, trunk_unit

CASES = list(itertools.product(["full", "lora"], ["frozen", "lora"], [False, True]))


@pytest.mark.parametrize(
    "adapter, trunk, quantized", CASES, ids=[f"{a}-{t}-{'4bit' if q else 'fp32'}" for a, t, q in CASES]
)
def test_matrix(tmp_path, tiny_llama_dir, pydoc_files, token_dataset, adapter, trunk, quantized):
    schedule = [
        {"name": "p0", "until": 0.5, "train": [3], "adapter": adapter, "trunk": trunk},
        {"name": "p1", "until": 1.0, "train": [2], "adapter": adapter, "trunk": trunk},
    ]
    adapters = {"r": 4, "alpha": 8, "trunk_r": 2} if "lora" in (adapter, trunk) else None
    # a mid-phase checkpoint at step 3, resumed below
    raw = tiny_recipe(
        tmp_path, tiny_llama_dir, pydoc_files[0], schedule, adapters, save_strategy="steps", save_steps=3
    )
    if quantized:
        raw["model"]["quantization"] = {"bits": 4, "quant_type": "nf4", "double_quant": True}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    if quantized and adapter == "full" and trunk == "frozen":
        with pytest.raises(RecipeError, match="a 4-bit base trains through LoRA"):
            load_recipe(str(path))
        return
    trainer = run.build_trainer(run.prepare(load_recipe(str(path))))
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()

    def expected(trained):
        units = {stack_unit(trained) if adapter == "full" else lora_unit(trained)}
        if trunk == "lora":
            units |= {trunk_unit(i) for i in range(4) if i != trained}
        return units

    flagged = {name: flags for _, name, _, _, flags in recorder.steps}
    assert flagged == {"p0": expected(3), "p1": expected(2)}
    for step, name, _, changed, flags in recorder.steps:
        assert changed == flags, (step, name)

    trainer.save_model()
    trainer.model.eval()
    ids = torch.tensor(token_dataset[:2]["input_ids"])
    with torch.no_grad():
        trained = trainer.model(input_ids=ids).logits
        merged = load_merged(str(tmp_path / "run"), read_json(tmp_path / "run" / "stackwise_state.json"))
        torch.testing.assert_close(merged(input_ids=ids).logits, trained, rtol=0, atol=1e-4)

    # resume from the mid-phase checkpoint in a copy of the run: bitwise-equal final weights
    final = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run" / "checkpoint-3", resumed_dir / "checkpoint-3")
    raw["training"].update(output_dir=str(resumed_dir), resume_from_checkpoint=str(resumed_dir / "checkpoint-3"))
    path.write_text(yaml.safe_dump(raw))
    prepared = run.prepare(load_recipe(str(path)))
    again = run.build_trainer(prepared)
    again.train(resume_from_checkpoint=prepared.resume_from_checkpoint)
    for name, param in again.model.named_parameters():
        assert torch.equal(param, final[name]), name
