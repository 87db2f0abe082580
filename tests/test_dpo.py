"""`data.task: dpo` through TRL's DPOTrainer with a schedule: the reference held three ways (`copy`, TRL's frozen
full copy, is the baseline; `precompute` and `shared` must equal it), exact mid-phase resume, TRL's reward logs
plus the phase keys, the activation cache's refusal, and bad input before any weight loads. Tiny Llama from a
config, fp32 CPU, real preference pairs from Python's docs."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_causal_lm

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402

from hf_stackwise.integrations.dpo_trainer import StackwiseDPOConfig, StackwiseDPOTrainer  # noqa: E402
from hf_stackwise.schedule.phases import RecipeError  # noqa: E402

TOP = [{"name": "top", "until": 0.5, "train": ["top"]}, {"name": "upper", "until": 1.0, "train": [2, 3]}]
# precompute vs copy: the reference log-probs come from batches padded differently (dataset order, not the shuffled
# training batches), so they may differ in the last bits; measured 0.0 here. shared vs copy is asserted bitwise.
TOLERANCE = 1e-6


def preference_rows(count: int, offset: int = 0) -> list[dict]:
    """Pairs from the demo asset's builder: the real answer chosen, another topic's or a corrupted one rejected."""
    from demo_assets import preference_pairs

    return [
        {"prompt": r["prompt"], "chosen": r["chosen"][:160], "rejected": r["rejected"][:160]}
        for r in preference_pairs()[offset : offset + count]
    ]


def dpo_args(tmp_path, name: str, reference: str, schedule=TOP, config=StackwiseDPOConfig, **overrides):
    """The tiny runs' settings as a preference config (``config``: the DPO one, or KTO's in test_kto.py)."""
    settings = dict(
        output_dir=os.path.join(str(tmp_path), name),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        max_length=96,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        blocks_per_stack=1,
        schedule=schedule,
        reference=reference,
        beta=0.1,
    )
    settings.update(overrides)
    return config(**settings)


def run(tmp_path, tokenizer, name: str, reference: str, rows=None, evaluate=False, **overrides):
    model = tiny_causal_lm("llama", layers=4)
    dataset = Dataset.from_list(rows or preference_rows(24))
    held_out = Dataset.from_list(preference_rows(8, offset=300)) if evaluate else None
    args = dpo_args(tmp_path, name, reference, **overrides)
    trainer = StackwiseDPOTrainer(
        model=model, args=args, train_dataset=dataset, eval_dataset=held_out, processing_class=tokenizer
    )
    trainer.train()
    trainer.held_out = trainer.evaluate() if evaluate else None
    return trainer


def held_out(trainer) -> tuple:
    """Held-out loss, reward accuracy and margin (the reference enters every one)."""
    keys = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen")
    return tuple(trainer.held_out[k] for k in keys)


def losses(trainer) -> list[tuple]:
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins")
    return [tuple(h[k] for k in keys) for h in trainer.state.log_history if "loss" in h]


def flat(rows) -> list[float]:
    return [value for row in rows for value in row]


def weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.fixture(scope="module")
def copy_run(tmp_path_factory, tokenizer):
    return run(tmp_path_factory.mktemp("dpo"), tokenizer, "copy", "copy", evaluate=True)


def test_shared_reference_equals_copy(copy_run, tmp_path, tokenizer):
    shared = run(tmp_path, tokenizer, "shared", "shared", evaluate=True)
    assert shared.reference_way == "shared" and shared.reference_cuts == [3, 2]
    assert losses(shared) == losses(copy_run)  # bitwise: the same tensors through the same kernels
    assert held_out(shared) == held_out(copy_run) and held_out(copy_run)[2] != 0
    assert "eval_perplexity" not in copy_run.held_out  # the DPO loss is no token cross-entropy
    base, other = weights(copy_run), weights(shared)
    assert all(torch.equal(base[n], other[n]) for n in base)
    # the reference holds copies of what trains (blocks 2, 3, the final norm; head and embeddings are tied, frozen)
    block = sum(p.numel() * 4 for p in copy_run.model.model.layers[0].parameters())
    norm = copy_run.model.model.norm.weight.numel() * 4
    assert shared.reference_bytes - 2 * block - norm < 4096  # + the rotary buffers
    assert copy_run.reference_bytes >= sum(p.numel() * 4 for p in copy_run.model.parameters())


def test_precompute_reference_equals_copy(copy_run, tmp_path, tokenizer):
    precomputed = run(tmp_path, tokenizer, "precompute", "precompute", evaluate=True)
    assert precomputed.ref_model is None and precomputed.reference_bytes == 0
    assert flat(losses(precomputed)) == pytest.approx(flat(losses(copy_run)), abs=TOLERANCE)
    assert held_out(precomputed) == pytest.approx(held_out(copy_run), abs=TOLERANCE)
    base, other = weights(copy_run), weights(precomputed)
    assert max((base[n] - other[n]).abs().max().item() for n in base) <= TOLERANCE


def test_logs_keep_trl_rewards_and_phase_keys(copy_run):
    logged = [h for h in copy_run.state.log_history if "loss" in h]
    assert [h["phase"] for h in logged] == ["top"] * 3 + ["upper"] * 3
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "t", "phase_index"):
        assert all(key in h for h in logged), key


@pytest.mark.parametrize(
    "last, key",
    [({"train": "all"}, "embeddings"), ({"train": [0, 3]}, "train"), ({"train": [3], "trunk": "lora"}, "trunk")],
)
def test_shared_refuses_a_schedule_that_trains_the_bottom(tmp_path, tokenizer, last, key):
    schedule = [{"name": "top", "until": 0.5, "train": ["top"]}, {"name": "low", "until": 1.0, **last}]
    with pytest.raises(RecipeError, match=rf"schedule\[1\]\.{key}.*nothing to share"):
        run(tmp_path, tokenizer, "bad", "shared", schedule=schedule)


def test_shared_resumes_mid_phase_bitwise(tmp_path, tokenizer):
    whole = run(tmp_path, tokenizer, "whole", "shared", save_strategy="steps", save_steps=4)
    model = tiny_causal_lm("llama", layers=4)
    args = dpo_args(tmp_path, "whole", "shared", save_strategy="steps", save_steps=4)
    dataset = Dataset.from_list(preference_rows(24))
    resumed = StackwiseDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-4"))  # step 4: inside phase `upper`
    assert losses(resumed)[-2:] == losses(whole)[-2:]
    before, after = weights(whole), weights(resumed)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_lora_reference_is_the_base_and_shares_it(copy_run, tmp_path, tokenizer):
    """`adapter: lora` on the top stacks: the reference is the base without adapters (PEFT's way); `shared` holds no
    copy of any base tensor (nothing trains in full) and forwards from the lowest adapted stack."""
    schedule = [{"name": "top", "until": 1.0, "train": [2, 3], "adapter": "lora"}]
    extra = dict(schedule=schedule, adapters={"r": 4, "alpha": 8})
    copied = run(tmp_path, tokenizer, "lora-copy", "copy", **extra)
    shared = run(tmp_path, tokenizer, "lora-shared", "shared", **extra)
    assert shared.reference_cuts == [2] and shared.reference_bytes < 1024  # the rotary buffers only
    assert losses(shared) == losses(copied)
    before, after = weights(copied), weights(shared)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert any("lora_B" in n and after[n].abs().sum() > 0 for n in after)


def test_shared_reference_on_a_4bit_base_equals_precompute(tmp_path, tokenizer, tiny_llama_dir):
    """QLoRA on the top stacks: `shared` copies no 4-bit tensor (the reference's modules hold the policy's quantized
    weights) and gives bitwise what TRL's precompute gives (measured 0.0); `copy` of a 4-bit base is refused."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    def quantized():
        torch.manual_seed(0)  # the LoRA adapters' initialisation draws from the global generator
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config, dtype=torch.float32)

    schedule = [{"name": "top", "until": 1.0, "train": [2, 3], "adapter": "lora"}]
    dataset = Dataset.from_list(preference_rows(16))
    runs = {}
    for way in ("shared", "precompute"):
        args = dpo_args(tmp_path, f"q-{way}", way, schedule=schedule, adapters={"r": 4, "alpha": 8}, max_steps=4)
        runs[way] = StackwiseDPOTrainer(
            model=quantized(), args=args, train_dataset=dataset, processing_class=tokenizer
        )
        runs[way].train()
    assert runs["shared"].reference_bytes < 1024 and runs["shared"].reference_cuts == [2]  # the rotary buffers only
    assert losses(runs["shared"]) == losses(runs["precompute"]) and losses(runs["shared"])[-1][3] != 0
    assert all(p.dtype == torch.float32 for n, p in runs["shared"].model.named_parameters() if "lora" in n)
    args = dpo_args(tmp_path, "q-copy", "copy", schedule=schedule, adapters={"r": 4, "alpha": 8})
    with pytest.raises(RecipeError, match="training.reference: `copy` of a 4-bit base"):
        StackwiseDPOTrainer(model=quantized(), args=args, train_dataset=dataset, processing_class=tokenizer)
