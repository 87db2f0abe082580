"""LoRA through PEFT: per-stack adapters and the trunk adapter (dual LoRA) — trainable sets per phase, frozen base
bit-identical, trained adapters changed, inactive adapters untouched but contributing, exact resume, merged export."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import logits_in_clean_process, tiny_causal_lm, tiny_recipe, write_recipe
from test_trainer import Recorder

from hf_stackwise.cli.commands import main
from hf_stackwise.schedule.phases import RecipeError
from hf_stackwise.trainer import StackwiseArguments, StackwiseTrainer

DUAL = [
    # top stack trains its own weights while the rest of the rack carries the trunk adapter
    {"name": "top-full", "until": 0.25, "train": ["top"], "trunk": "lora"},
    # stack 2 trains through its own adapter, stacks 0, 1 (and 3) carry the trunk adapter
    {"name": "s2-lora", "until": 0.5, "train": [2], "adapter": "lora", "trunk": "lora", "lora": {"r": 8}},
    # stack 1 through its adapter; the trunk is frozen; stack 2's adapter stops training but keeps contributing
    {"name": "s1-lora", "until": 1.0, "train": [1], "adapter": "lora"},
]


def make(tmp_path, dataset, schedule=DUAL, adapters=None, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        schedule=schedule,
        blocks_per_stack=1,
        adapters=adapters if adapters is not None else {"r": 4, "alpha": 8, "trunk_r": 2},
    )
    kwargs.update(overrides)
    return StackwiseTrainer(model=tiny_causal_lm("llama"), args=StackwiseArguments(**kwargs), train_dataset=dataset)


def test_dual_lora_trainable_sets_per_phase(tmp_path, token_dataset):
    trainer = make(tmp_path, token_dataset)
    assert sorted(trainer.adapter_plan) == ["stack_1", "stack_2", "trunk"]
    assert trainer.adapter_plan["stack_2"]["r"] == 8 and trainer.adapter_plan["stack_1"]["r"] == 4
    assert trainer.adapter_plan["trunk"]["r"] == 2 and trainer.adapter_plan["trunk"]["blocks"] == [0, 1, 2, 3]
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    flagged = {name: flags for _, name, _, _, flags in recorder.steps}
    assert flagged["top-full"] == {"stack_3", "stack_0.trunk", "stack_1.trunk", "stack_2.trunk"}
    assert flagged["s2-lora"] == {"stack_2.lora", "stack_0.trunk", "stack_1.trunk", "stack_3.trunk"}
    assert flagged["s1-lora"] == {"stack_1.lora"}
    for step, name, _, changed, flags in recorder.steps:
        assert changed == flags, (step, name)  # frozen base and idle adapters bit-identical


def test_trained_adapter_keeps_contributing(tmp_path, token_dataset):
    trainer = make(tmp_path, token_dataset)
    trainer.train()
    model = trainer.model
    batch = torch.tensor(token_dataset[:2]["input_ids"])
    with torch.no_grad():
        both = model(input_ids=batch).logits
        with model.disable_adapter():
            base = model(input_ids=batch).logits
    assert not torch.allclose(both, base)  # the adapters (trained in earlier phases too) change the function
    layer = model.base_model.model.model.layers[2].self_attn.q_proj
    assert layer.active_adapters == ["stack_1", "stack_2", "trunk"] or set(layer.active_adapters) >= {"stack_2"}
    assert layer.lora_B["stack_2"].weight.abs().sum() > 0


def test_lora_only_unfreezing_leaves_every_base_weight_identical(tmp_path, token_dataset):
    schedule = [
        {"name": "top", "until": 0.5, "train": ["top"], "adapter": "lora"},
        {"name": "upper", "until": 1.0, "train": [2, 3], "adapter": "lora"},
    ]
    trainer = make(tmp_path, token_dataset, schedule=schedule, max_steps=4)
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    trainer.train()
    for name, param in trainer.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base[name]), name


def test_bad_adapter_settings_are_refused(tmp_path, token_dataset):
    with pytest.raises(RecipeError, match="target_modules"):
        make(tmp_path, token_dataset, adapters={"target_modules": ["nonexistent_proj"]})
    with pytest.raises(RecipeError, match=r"schedule\[0\].lora: LoRA settings need `adapter: lora`"):
        make(tmp_path, token_dataset, schedule=[{"until": 1.0, "lora": {"r": 2}}])


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, token_dataset):
    out = tmp_path_factory.mktemp("adapter-run")
    trainer = make(out, token_dataset, save_strategy="steps", save_steps=1, output_dir=str(out / "run"))
    trainer.train()
    return out / "run", {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("step", [3, 4], ids=["mid-phase", "boundary"])
def test_adapter_resume_is_exact(tmp_path, token_dataset, adapter_run, step):
    run, final = adapter_run
    shutil.copytree(run / f"checkpoint-{step}", tmp_path / "r" / f"checkpoint-{step}")
    trainer = make(tmp_path, token_dataset, output_dir=str(tmp_path / "r"), save_strategy="no")
    trainer.train(resume_from_checkpoint=str(tmp_path / "r" / f"checkpoint-{step}"))
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, final[name]), name


def test_adapter_checkpoints_hold_no_model_of_their_own(adapter_run):
    """A PEFT adapter folder would load as one adapter of several (a different model): checkpoints keep the trained
    tensors only, and plain transformers loads nothing from them."""
    from transformers import AutoModelForCausalLM

    run, _ = adapter_run
    checkpoint = run / "checkpoint-8"
    assert (checkpoint / "stackwise_trainable.safetensors").is_file()
    assert not list(run.rglob("adapter_config.json")) and not (checkpoint / "config.json").exists()
    with pytest.raises((OSError, ValueError)):
        AutoModelForCausalLM.from_pretrained(checkpoint)


def test_merged_export_of_an_adapter_run(tmp_path, token_dataset, tiny_llama_dir, pydoc_files):
    raw = tiny_recipe(tmp_path, tiny_llama_dir, pydoc_files[0], DUAL, adapters={"r": 4, "alpha": 8, "trunk_r": 2})
    assert main(["train", write_recipe(tmp_path, raw)]) == 0
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    # DUAL trains stack 3's own weights: no adapter-only form exists, and the export says so
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "adapters"), "--adapters"]) == 2
    assert not (tmp_path / "adapters").exists()
    from hf_stackwise.export.folder import load_merged
    from hf_stackwise.persist.checkpoint import read_json

    ids = torch.tensor(token_dataset[:2]["input_ids"])
    merged = load_merged(str(tmp_path / "run"), read_json(tmp_path / "run" / "stackwise_state.json"))
    with torch.no_grad():
        expected = merged(input_ids=ids).logits
    exported = logits_in_clean_process(tmp_path / "merged", ids, tmp_path)
    torch.testing.assert_close(exported, expected, rtol=0, atol=1e-4)
    start = tiny_causal_lm("llama")  # the merged weights differ from the base: the adapters were folded in
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "merged" / "model.safetensors")
    assert not torch.equal(
        weights["model.layers.2.self_attn.q_proj.weight"], start.model.layers[2].self_attn.q_proj.weight
    )


def test_adapters_export_loads_with_peft_onto_the_base(tmp_path, token_dataset, tiny_llama_dir, pydoc_files):
    lora_only = [
        {"name": "top", "until": 0.5, "train": ["top"], "adapter": "lora", "trunk": "lora"},
        {"name": "next", "until": 1.0, "train": [2], "adapter": "lora"},
    ]
    raw = tiny_recipe(tmp_path, tiny_llama_dir, pydoc_files[0], lora_only, adapters={"r": 4, "alpha": 8, "trunk_r": 2})
    assert main(["train", write_recipe(tmp_path, raw)]) == 0
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "adapters"), "--adapters"]) == 0
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hf_stackwise.export.folder import load_merged
    from hf_stackwise.persist.checkpoint import read_json

    rack = json.loads((tmp_path / "adapters" / "stackwise_adapters.json").read_text())
    names = sorted(rack["adapters"])
    assert names == ["stack_2", "stack_3", "trunk"]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model = PeftModel.from_pretrained(base, tmp_path / "adapters" / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(tmp_path / "adapters" / name, adapter_name=name)
    model.base_model.set_adapter(names)
    ids = torch.tensor(token_dataset[:2]["input_ids"])
    merged = load_merged(str(tmp_path / "run"), read_json(tmp_path / "run" / "stackwise_state.json"))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=0, atol=1e-5)
