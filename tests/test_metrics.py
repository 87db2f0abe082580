"""Metrics that mean something: perplexity only for causal LMs, per-unit gradient norms unscaled under loss scaling
and at the Trainer's resolved logging steps (fractional ones included), eval_on_start runs phase 0's model."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_arguments, tiny_causal_lm, tiny_config
from transformers import Trainer, TrainingArguments

from hf_stackwise.metrics import grad_scale, is_causal_lm
from hf_stackwise.trainer import StackwiseTrainer

SCHEDULE = [
    {"name": "top", "until": 0.5, "train": ["top"]},
    {"name": "all", "until": 1.0, "train": "all"},
]


def make_args(tmp_path, **overrides):
    defaults = {"schedule": SCHEDULE, "per_device_eval_batch_size": 8, "logging_steps": 1}
    return tiny_arguments(tmp_path / "out", **{**defaults, **overrides})


def train_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


def unit_norms(entry):
    return {k.split("/", 1)[1]: v for k, v in entry.items() if k.startswith("grad_norm/")}


# ---- eval_perplexity ---------------------------------------------------------------------------------


def test_perplexity_for_a_causal_lm_only(tmp_path, token_dataset):
    from transformers import AutoModelForMaskedLM

    eval_set = token_dataset.select(range(16))
    causal = StackwiseTrainer(model=tiny_causal_lm("llama"), args=make_args(tmp_path), eval_dataset=eval_set)
    metrics = causal.evaluate()
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-6)

    torch.manual_seed(0)
    bert = AutoModelForMaskedLM.from_config(tiny_config("bert", layers=4))
    masked = StackwiseTrainer(model=bert, args=make_args(tmp_path), eval_dataset=eval_set)
    metrics = masked.evaluate()  # a masked LM's own loss on given labels: no perplexity
    assert "eval_loss" in metrics and "eval_perplexity" not in metrics

    assert is_causal_lm(tiny_causal_lm("gpt2")) and not is_causal_lm(bert)


def test_mlm_data_plane_reports_masked_accuracy_not_perplexity(tmp_path, token_dataset, tokenizer):
    from transformers import AutoModelForMaskedLM

    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(tiny_config("bert", layers=4))
    args = make_args(tmp_path, data_plane={"task": "mlm", "max_seq_length": 32})
    trainer = StackwiseTrainer(
        model=model, args=args, eval_dataset=token_dataset.select(range(16)), processing_class=tokenizer
    )
    metrics = trainer.evaluate()
    assert 0 <= metrics["eval_masked_accuracy"] <= 1 and "eval_perplexity" not in metrics


# ---- grad_norm/<unit> ----------------------------------------------------------------------------------


def test_grad_scale_reads_a_real_grad_scaler():
    assert grad_scale(SimpleNamespace(scaler=None)) == 1.0
    assert grad_scale(SimpleNamespace(scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))) == 2.0**10
    assert grad_scale(SimpleNamespace(scaler=torch.amp.GradScaler("cpu", enabled=False))) == 1.0


def run_two_phases(tmp_path, dataset, scaler=None, **overrides):
    if scaler is not None:
        overrides["fp16"] = True
    trainer = StackwiseTrainer(
        model=tiny_causal_lm("llama"), args=make_args(tmp_path, **overrides), train_dataset=dataset
    )
    if scaler is not None:
        # fp16 mixed precision as accelerate runs it on GPUs, which it refuses on CPU: autocast to float16 and a
        # real GradScaler (the loss is multiplied by the scale before backward, the gradients divided when the
        # Trainer clips them and in the optimizer step)
        assert trainer.accelerator.mixed_precision == "fp16" and trainer.accelerator.scaler is None
        trainer.accelerator.native_amp = True
        trainer.accelerator.scaler = scaler
    trainer.train()
    return trainer


def test_unit_grad_norms_are_unscaled_under_fp16_loss_scaling(tmp_path, token_dataset):
    plain = run_two_phases(tmp_path / "plain", token_dataset)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    scaled = run_two_phases(tmp_path / "scaled", token_dataset, scaler=scaler)
    assert scaler.get_scale() == 2.0**12  # every step was taken (no overflow), all under the scale
    plain_logs, scaled_logs = train_logs(plain), train_logs(scaled)
    assert len(plain_logs) == len(scaled_logs) == 4
    for a, b in zip(plain_logs, scaled_logs):
        norms_a, norms_b = unit_norms(a), unit_norms(b)
        assert norms_a and norms_a.keys() == norms_b.keys()
        # the per-unit norms make up the Trainer's (unscaled) total norm of the same step
        assert math.sqrt(sum(v * v for v in norms_b.values())) == pytest.approx(b["grad_norm"], rel=1e-4)
        for unit in norms_a:  # float16 autocast against float32: close, and nowhere near 4096 times larger
            # (transformers 5.25 / accelerate 1.16 autocast the embeddings' path to float16 too: ~10% apart)
            assert norms_b[unit] == pytest.approx(norms_a[unit], rel=0.25), unit


@pytest.mark.parametrize(("logging_steps", "first"), [(0.25, False), (0.3, True)])
def test_unit_grad_norms_at_fractional_logging_steps(tmp_path, token_dataset, logging_steps, first):
    trainer = run_two_phases(
        tmp_path, token_dataset, max_steps=10, logging_steps=logging_steps, logging_first_step=first
    )
    every = math.ceil(10 * logging_steps)
    assert trainer.state.logging_steps == every
    logs = train_logs(trainer)
    expected = sorted({s for s in range(every, 11, every)} | ({1} if first else set()))
    assert [h["step"] for h in logs] == expected
    for entry in logs:
        norms = unit_norms(entry)
        trained = {"stack_3"} if entry["step"] <= 5 else {"embeddings", "stack_0", "stack_1", "stack_2", "stack_3"}
        assert trained <= set(norms), entry["step"]
        assert math.sqrt(sum(v * v for v in norms.values())) == pytest.approx(entry["grad_norm"], rel=1e-4)


# ---- eval_on_start -------------------------------------------------------------------------------------


def test_eval_on_start_runs_the_model_as_phase_0_does(tmp_path, token_dataset):
    """Phase 0 runs 1 of 2 stacks: the eval before step 0 is the loss of the model cut to that stack."""
    schedule = [{"name": "shallow", "until": 0.5, "stacks": 1, "train": [0]}, {"name": "deep", "until": 1.0}]
    model = tiny_causal_lm("llama", layers=4)
    truncated = copy.deepcopy(model)
    truncated.model.layers = truncated.model.layers[:2]
    truncated.config.num_hidden_layers = 2
    full = copy.deepcopy(model)
    eval_set = token_dataset.select(range(16))

    def plain_eval_loss(m):
        args = TrainingArguments(
            output_dir=str(tmp_path / "plain"), per_device_eval_batch_size=8, report_to="none", use_cpu=True
        )
        return Trainer(model=m, args=args, eval_dataset=eval_set).evaluate()["eval_loss"]

    args = make_args(
        tmp_path, schedule=schedule, blocks_per_stack=2, max_steps=2, eval_on_start=True, eval_strategy="no"
    )
    trainer = StackwiseTrainer(model=model, args=args, train_dataset=token_dataset, eval_dataset=eval_set)
    trainer.train()
    start = next(h for h in trainer.state.log_history if "eval_loss" in h)
    assert start["step"] == 0 and start["phase"] == "shallow" and start["t"] == 0
    assert abs(start["eval_loss"] - plain_eval_loss(truncated)) < 1e-5
    assert abs(start["eval_loss"] - plain_eval_loss(full)) > 1e-4  # (random weights: both losses are near ln 512)
