"""QLoRA on CPU with real bitsandbytes 4-bit: full-precision trainable blocks beside a 4-bit trunk with its LoRA,
the bitsandbytes 0.50.2 CPU repack workaround (regression tests), exact resume and a dequantized merged export."""

from __future__ import annotations

import shutil

import bitsandbytes as bnb
import pytest
import torch
import yaml
from conftest import brief_run_args, logits_in_clean_process
from torch import nn

from hf_stackwise.cli import pipeline as run
from hf_stackwise.cli.commands import main
from hf_stackwise.export.folder import load_merged
from hf_stackwise.persist.checkpoint import read_json
from hf_stackwise.recipe.loader import load_recipe
from hf_stackwise.schedule.phases import RecipeError

SCHEDULE = [
    {"name": "top-full", "until": 0.5, "train": ["top"], "trunk": "lora"},
    {"name": "s2-lora", "until": 1.0, "train": [2], "adapter": "lora", "trunk": "lora"},
]


def write_recipe(tmp_path, model_dir, train_file, schedule=SCHEDULE, **training):
    raw = {
        "model": {
            "name_or_path": model_dir,
            "dtype": "float32",
            "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"},
        },
        "adapters": {"r": 4, "alpha": 8, "trunk_r": 2},
        "data": {
            "train": {"path": "text", "data_files": train_file},
            "max_seq_length": 32,
            "eval_fraction": 0.05,
            "max_eval_samples": 8,
        },
        "schedule": schedule,
        "training": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 6,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-2,
            "save_steps": 1,
            "report_to": "none",
            "use_cpu": True,
            "seed": 0,
            **training,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def build(recipe_path, as_avx512_bf16: bool = False):
    """Trainer for a recipe; ``as_avx512_bf16`` sets bitsandbytes' CPU repack flag the way it is on AVX512-BF16
    CPUs (the machines where the bnb 0.50.2 bug bites), so the workaround is exercised here too."""
    prepared = run.prepare(load_recipe(recipe_path))
    model = run.load_model(prepared)
    if as_avx512_bf16:
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = True
    return run.build_trainer(prepared, model=model), prepared


def test_qlora_layout_and_training(tmp_path, tiny_llama_dir, pydoc_files):
    trainer, _ = build(write_recipe(tmp_path, tiny_llama_dir, pydoc_files[0]))
    layers = trainer.model.get_base_model().model.layers
    # stack 3 trains with `adapter: full`: kept out of 4-bit; the other blocks are 4-bit and carry LoRA
    top = layers[3].self_attn.q_proj.base_layer  # stack 3 carries the trunk adapter in phase 2
    assert isinstance(top, nn.Linear) and not isinstance(top, bnb.nn.Linear4bit)
    assert isinstance(layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert all(not m.support_avx512bf16_for_cpu for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any(n.startswith("base_model.model.model.layers.3.") and "lora" not in n for n in changed)  # full top
    assert any(".lora_B.trunk." in n and ".layers.0." in n for n in changed)  # trunk adapter on the 4-bit stack 0
    assert any(".lora_B.stack_2." in n for n in changed)
    four_bit = [n for n, p in after.items() if p.dtype == torch.uint8]
    assert four_bit and all(n not in changed for n in four_bit)  # the 4-bit base never changes


def lora_grads(trainer, batch):
    model = trainer.model
    model.train()
    model.zero_grad()
    with trainer.rack.active_depth(trainer.num_stacks):
        model(**batch).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}
    model.zero_grad()
    return grads


def test_evaluate_does_not_change_gradients_through_the_4bit_base(tmp_path, tiny_llama_dir, pydoc_files):
    """Regression for the bnb 0.50.2 CPU repack bug: train -> evaluate -> train gives the same gradients."""
    prepared = run.prepare(
        load_recipe(write_recipe(tmp_path, tiny_llama_dir, pydoc_files[0], max_steps=2, save_strategy="no"))
    )
    model = run.load_model(prepared)
    # bitsandbytes turns this on for AVX512-BF16 CPUs; setting it reproduces that machine here (without the
    # workaround, the eval forward below repacks the weights and LoRA gradients come out ~4x off)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True
    trainer = run.build_trainer(prepared, model=model)
    trainer.train()
    for p in trainer.model.parameters():  # gradients for every adapter, to compare them all
        if p.dtype.is_floating_point:
            p.requires_grad_(True)
    batch = {k: torch.tensor(v) for k, v in prepared.train_dataset[:4].items()}
    first = lora_grads(trainer, batch)
    trainer.evaluate()
    second = lora_grads(trainer, batch)
    assert first.keys() == second.keys() and len(first) > 0
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=1e-5, atol=1e-7)


def test_resume_is_exact_with_a_4bit_base(tmp_path, tiny_llama_dir, pydoc_files):
    recipe = write_recipe(tmp_path, tiny_llama_dir, pydoc_files[0])
    trainer, _ = build(recipe)
    trainer.train()
    final = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run" / "checkpoint-4", resumed_dir / "checkpoint-4")
    again, _ = build(
        write_recipe(
            tmp_path,
            tiny_llama_dir,
            pydoc_files[0],
            output_dir=str(resumed_dir),
            resume_from_checkpoint=str(resumed_dir / "checkpoint-4"),
        )
    )
    again.train(resume_from_checkpoint=str(resumed_dir / "checkpoint-4"))
    for name, param in again.model.named_parameters():
        assert torch.equal(param, final[name]), name


def test_evaluate_then_export_matches_the_trained_model(tmp_path, tiny_llama_dir, pydoc_files, token_dataset):
    """Merged export (base dequantized, adapters merged in fp32) reproduces the trained 4-bit + LoRA model."""
    recipe = write_recipe(tmp_path, tiny_llama_dir, pydoc_files[0], save_strategy="no")
    trainer, _ = build(recipe, as_avx512_bf16=True)
    trainer.train()
    trainer.evaluate()
    trainer.save_model()
    ids = torch.tensor(token_dataset[:2]["input_ids"])
    trainer.model.eval()
    with torch.no_grad():
        trained = trainer.model(input_ids=ids).logits
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    merged = load_merged(str(tmp_path / "run"), read_json(tmp_path / "run" / "stackwise_state.json"))
    exported = logits_in_clean_process(tmp_path / "merged", ids, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, exported, rtol=0, atol=1e-5)
    # measured on this machine: max |diff| ~5e-7 (fp32 compute); documented tolerance for a 4-bit base: 1e-4
    torch.testing.assert_close(exported, trained, rtol=0, atol=1e-4)


def test_quantization_needs_lora_and_keeps_full_stacks_out(tmp_path, tiny_llama_dir, pydoc_files):
    with pytest.raises(RecipeError, match="model.quantization: a 4-bit base trains through LoRA"):
        load_recipe(write_recipe(tmp_path, tiny_llama_dir, pydoc_files[0], schedule=[{"until": 1.0, "train": "all"}]))
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from hf_stackwise.trainer import StackwiseArguments, StackwiseTrainer

    quantized = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["lm_head"])
    )
    args = StackwiseArguments(
        output_dir=str(tmp_path / "x"),
        max_steps=2,
        use_cpu=True,
        report_to="none",
        schedule=SCHEDULE,
        blocks_per_stack=1,
    )
    with pytest.raises(RecipeError, match=r"schedule\[0\].adapter: trains stack 3 with `adapter: full`, but its "):
        StackwiseTrainer(model=quantized, args=args)


@pytest.mark.parametrize("name", ["qlora_dual", "lora_unfreeze"])
def test_shipped_adapter_recipes_run_briefly(tmp_path, tiny_30_block_dir, name, capsys, monkeypatch):
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the recipes name their data relative to the project root (made by `make assets`)
    code = main(brief_run_args(f"recipes/smollm2-135m/{name}.yaml", tiny_30_block_dir, tmp_path))
    assert code == 0
    assert "trained 4 steps" in capsys.readouterr().out
    assert (tmp_path / "run" / "stackwise_trainable.safetensors").is_file()


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    import importlib.util

    from hf_stackwise.rack.quantization import require_bitsandbytes

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(
        RecipeError, match=r"model.quantization: needs bitsandbytes.*pip install 'hf-stackwise\[quant\]'"
    ):
        require_bitsandbytes()
