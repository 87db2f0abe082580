"""TRL's `SFTTrainer` with a stackwise schedule from Python: the package's `StackwiseSFTTrainer` inherits from both
trainers (StackwiseTrainer first), `StackwiseSFTConfig` from both argument classes. Skipped without trl."""

from __future__ import annotations

import pytest
import torch
from conftest import pydoc_paragraphs, tiny_causal_lm

pytest.importorskip("trl")

from hf_stackwise.integrations.sft_trainer import StackwiseSFTConfig, StackwiseSFTTrainer  # noqa: E402


def test_sft_trainer_runs_the_schedule(tmp_path, tokenizer):
    from datasets import Dataset

    model = tiny_causal_lm("llama", layers=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = StackwiseSFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        max_length=64,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        blocks_per_stack=2,
        adapters={"r": 4, "alpha": 8},
        schedule=[
            {"name": "top", "until": 0.5, "train": ["top"]},
            {"name": "bottom-lora", "until": 1.0, "train": [0], "adapter": "lora"},
        ],
    )
    dataset = Dataset.from_dict({"text": pydoc_paragraphs()[:64]})  # plain text: SFTTrainer tokenizes it
    trainer = StackwiseSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    assert [h["phase"] for h in trainer.state.log_history if "loss" in h] == ["top"] * 2 + ["bottom-lora"] * 2
    after = {n.replace("base_layer.", ""): p for n, p in trainer.model.get_base_model().named_parameters()}
    changed = {n for n, p in before.items() if not torch.equal(after[n].detach(), p)}
    assert changed and all(n.startswith(("model.layers.2.", "model.layers.3.")) for n in changed)  # stack 1 only
    lora = [p for n, p in trainer.model.named_parameters() if "lora_B.stack_0" in n]
    assert lora and all(p.abs().sum() > 0 for p in lora)  # stack 0 trained through its adapter
