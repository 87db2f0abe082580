"""The frozen-prefix activation cache: exactness (bitwise on fp32 CPU), hit rates, invalidation and refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_arguments, tiny_causal_lm
from transformers import TrainerCallback

from hf_stackwise.trainer import StackwiseTrainer

TOP = [{"name": "top", "until": 1.0, "train": "top", "head": "train"}]


def rows(token_dataset, n=16):
    return token_dataset.select(range(n))


def run(tmp_path, dataset, schedule=TOP, cache=None, name="run", callbacks=(), resume=None, **overrides):
    """Train a tiny Llama; returns (trainer, losses)."""
    model = tiny_causal_lm("llama", layers=4)
    kwargs = dict(max_steps=12, logging_steps=1, schedule=schedule, activation_cache=cache)
    kwargs.update(overrides)
    args = tiny_arguments(tmp_path / name, **kwargs)
    trainer = StackwiseTrainer(model=model, args=args, train_dataset=dataset)
    for callback in callbacks:
        callback.trainer = trainer
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=resume)
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


def step_hit_rates(trainer) -> list[float | None]:
    """Per logged step: ``cache/hit_rate`` (None where the phase ran uncached)."""
    return [h.get("cache/hit_rate") for h in trainer.state.log_history if "loss" in h]


GRADUAL = [
    {"name": "top", "until": 1 / 3, "train": [3], "head": "train"},
    {"name": "two", "until": 2 / 3, "train": [2, 3], "head": "train"},
    {"name": "three", "until": 1.0, "train": [1, 2, 3], "head": "train"},
]


def test_gradual_unfreezing_fills_the_shallower_cuts_in_the_same_pass(tmp_path, token_dataset):
    data = rows(token_dataset)
    cache = {"activations": True}
    off = run(tmp_path, data, GRADUAL, {"activations": False}, name="off")
    on = run(tmp_path, data, GRADUAL, cache, name="on")
    assert_same_training(off, on)
    decisions = on[0].cache_decisions
    assert [d.cut for d in decisions] == [3, 2, 1]
    assert decisions[0].fills == ((0, 1), (0,))
    assert [d.hit_rate for d in decisions] == [0.0, 1.0, 1.0]
    # phase 0 (one epoch) misses every row and fills cuts 3, 2 and 1; phases 1 and 2 hit from their first step
    assert step_hit_rates(on[0]) == [0.0] * 4 + [1.0] * 8


GROWTH = [
    {"name": "top", "until": 4 / 14, "train": [3], "head": "train"},
    {"name": "grow", "until": 8 / 14, "train": [3, "new"], "head": "train", "grow": {"op": "copy", "stacks": 1}},
    {"name": "bottom", "until": 10 / 14, "train": [0], "head": "train"},
    {"name": "again", "until": 1.0, "train": [3], "head": "train"},
]


@pytest.mark.slow
def test_growth_above_the_cut_keeps_the_store_and_a_changed_prefix_empties_it(tmp_path, token_dataset):
    data = rows(token_dataset)
    off = run(tmp_path, data, GROWTH, {"activations": False}, name="off", max_steps=14)
    on = run(tmp_path, data, GROWTH, {"activations": True}, name="on", max_steps=14)
    assert_same_training(off, on)
    decisions = on[0].cache_decisions
    assert [d.prefix for d in decisions] == [(0, 1, 2), (0, 1, 2), (), (0, 1, 2)]
    rates = step_hit_rates(on[0])
    assert rates[:8] == [0.0] * 4 + [1.0] * 4  # the top growth kept the store: hits from its first step
    assert rates[8:10] == [None, None]  # stack 0 trains: nothing frozen below it
    assert rates[10:12] == [0.0, 0.0]  # block 0 changed: the store was emptied at the phase start
    assert on[0].cache_stats()["hits"] == 16 + 3  # phase 1's rows, then the 3 rows phase 3 stored and met again


def test_growth_at_the_bottom_moves_the_cut_to_a_new_store(token_dataset):
    from hf_stackwise.cache_policy import CacheData, CacheModel, CacheSettings, decide
    from hf_stackwise.schedule import Schedule

    schedule = Schedule.from_list(
        [
            {"name": "top", "until": 0.5, "train": [3], "head": "train"},
            {
                "name": "grow",
                "until": 1.0,
                "train": [4],
                "head": "train",
                "grow": {"op": "copy", "stacks": 1, "at": "bottom"},
            },
        ]
    )
    base = (1, 1, 1, 1)
    decisions = decide(
        schedule,
        schedule.resolve(16).bounds,
        schedule.layout(base),
        base,
        CacheSettings(activations=True),
        CacheModel((100,) * 5, 50, 64, 4),
        CacheData(16, 4, (32, 32), 32, ("clm", "clm")),
    )
    assert decisions[0].prefix == (0, 1, 2)
    assert decisions[1].prefix == (4, 0, 1, 2)  # the grown block sits below the cut: another store, filled afresh
    assert decisions[1].hit_rate == pytest.approx(1 / 2)


class InjectStaleSlot(TrainerCallback):
    """After the first epoch, slot 0 (row 0) takes row 1's hidden state and fingerprint: a stale slot."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 4:
            (store,) = self.trainer._stores.values()
            assert store.fp[0].any() and store.fp[1].any()
            store.data[0], store.fp[0] = store.data[1], store.fp[1]


def test_a_stale_slot_is_a_miss(tmp_path, token_dataset):
    data = rows(token_dataset)
    off = run(tmp_path, data, cache={"activations": False}, name="off")
    on = run(tmp_path, data, name="on", callbacks=[InjectStaleSlot()])
    assert_same_training(off, on)
    assert on[0].cache_stats()["hits"] == 2 * 16 - 1  # row 0 missed once in epoch 2, was stored again, then hit
