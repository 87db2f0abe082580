"""The frozen-prefix activation cache: exactness (bitwise on fp32 CPU), hit rates, invalidation and refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_arguments, tiny_causal_lm

from hf_stackwise.trainer import StackwiseTrainer

TOP = [{"name": "top", "until": 1.0, "train": "top", "head": "train"}]


def rows(token_dataset, n=16):
    return token_dataset.select(range(n))


def run(tmp_path, dataset, schedule=TOP, cache=None, name="run", layers=4, **overrides):
    """Train a tiny Llama; returns (trainer, losses)."""
    model = tiny_causal_lm("llama", layers=layers)
    kwargs = dict(max_steps=12, logging_steps=1, schedule=schedule, activation_cache=cache)
    kwargs.update(overrides)
    args = tiny_arguments(tmp_path / name, **kwargs)
    trainer = StackwiseTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer, losses


def assert_same_training(a, b):
    ta, la = a
    tb, lb = b
    assert la == lb
    sa, sb = ta.model.state_dict(), tb.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    oa, ob = ta.optimizer.state_dict()["state"], tb.optimizer.state_dict()["state"]
    assert oa.keys() == ob.keys()
    for k in oa:
        for name, value in oa[k].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(ob[k][name])), (k, name)


def test_cache_is_bitwise_exact_over_three_epochs(tmp_path, token_dataset):
    data = rows(token_dataset)
    off = run(tmp_path, data, cache={"activations": False}, name="off")
    on = run(tmp_path, data, name="on")
    assert on[0].cache_decisions[0].on and on[0].cache_decisions[0].cut == 3
    assert off[0]._stores == {}
    assert_same_training(off, on)
    stats = on[0].cache_stats()
    assert stats["rows"] == 12 * 4
    assert stats["hit_rate"] == pytest.approx(2 / 3)
    assert stats["bytes"] == 16 * (32 * 64 * 4 + 16)
