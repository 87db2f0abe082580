"""The activation cache under `data.task: dpo`: every chosen and every rejected sequence has its own slot (pair i:
rows 2i and 2i + 1), so a repeated pair skips the frozen prefix for the policy and, with `reference: shared`, for the
reference too (it takes the policy's hidden state at its cut, replayed on a hit). Cache on vs off over 3 epochs:
losses and final weights bitwise equal, hits counted. Tiny Llama from a config, fp32 CPU, real pairs."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_causal_lm
from test_dpo import dpo_args, losses, preference_rows, weights

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402

from hf_stackwise.cache.activations import ROW_KEY, PairRows  # noqa: E402
from hf_stackwise.integrations.dpo_trainer import StackwiseDPOTrainer  # noqa: E402

PAIRS = 12  # 3 steps of 4 pairs per epoch; 9 steps = 3 epochs
TOP_THEN_UPPER = [{"name": "top", "until": 0.5, "train": ["top"]}, {"name": "upper", "until": 1.0, "train": [2, 3]}]
# phase 1's cache cut (3 blocks) lies above the reference's (2: stack 2 trained in phase 0), so the reference's
# hidden state at block 2 is a second store that must match and replay too
UPPER_THEN_TOP = [{"name": "upper", "until": 0.5, "train": [2, 3]}, {"name": "top", "until": 1.0, "train": ["top"]}]


def run(tmp_path, tokenizer, name: str, reference: str, cache, schedule, **overrides):
    args = dpo_args(
        tmp_path,
        name,
        reference,
        schedule=schedule,
        max_steps=9,
        activation_cache={"activations": cache},
        **overrides,
    )
    trainer = StackwiseDPOTrainer(
        model=tiny_causal_lm("llama", layers=4),
        args=args,
        train_dataset=Dataset.from_list(preference_rows(PAIRS)),
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer


def assert_same_training(cached, plain) -> None:
    assert losses(cached) == losses(plain) and len(losses(plain)) == 9
    before, after = weights(plain), weights(cached)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_pair_rows_key_chosen_and_rejected_separately():
    def collator(examples):  # TRL's layout: every chosen row, then every rejected row; unknown keys dropped
        return {"input_ids": torch.tensor([[e["c"]] for e in examples] + [[e["r"]] for e in examples])}

    batch = PairRows(collator)([{"c": 10, "r": 11, ROW_KEY: 5}, {"c": 20, "r": 21, ROW_KEY: 2}])
    assert batch[ROW_KEY].tolist() == [10, 4, 11, 5]  # chosen of pair 5, of pair 2, then their rejected rows
    assert batch["input_ids"].flatten().tolist() == [10, 20, 11, 21]


@pytest.mark.parametrize(
    "reference, schedule",
    [("shared", TOP_THEN_UPPER), ("shared", UPPER_THEN_TOP), ("copy", TOP_THEN_UPPER), ("precompute", TOP_THEN_UPPER)],
    ids=["shared", "shared-below-cache-cut", "copy", "precompute"],
)
def test_cache_on_equals_off_bitwise(tmp_path, tokenizer, reference, schedule):
    """Padded to a fixed length (every visit of a row has the same inputs), so every visit after the first hits."""
    fixed = dict(pad_to_multiple_of=96)
    plain = run(tmp_path, tokenizer, "off", reference, False, schedule, **fixed)
    cached = run(tmp_path, tokenizer, "on", reference, True, schedule, **fixed)
    assert [d.on for d in cached.cache_decisions] == [True, True]
    stats = cached.cache_stats()
    assert stats["rows"] == 9 * 4 * 2  # every chosen and every rejected sequence looked up
    assert stats["hit_rate"] > 0.3 and stats["hits"] % 2 == 0, stats  # a pair's two rows hit together here
    assert_same_training(cached, plain)
    if reference == "shared" and schedule is UPPER_THEN_TOP:
        assert cached.reference_cuts == [2, 2] and cached.cache_decisions[1].cut == 3
        assert set(cached._replay.exposed) == {2}


def test_cache_with_batch_padding_equals_off_bitwise(tmp_path, tokenizer):
    """Padded per batch (TRL's default): a row whose batch-mates pad it differently misses (its fingerprint
    differs), the rest hit; training stays bitwise the same either way."""
    plain = run(tmp_path, tokenizer, "off", "shared", False, TOP_THEN_UPPER)
    cached = run(tmp_path, tokenizer, "on", "shared", True, TOP_THEN_UPPER)
    assert_same_training(cached, plain)
    assert cached.cache_stats()["rows"] == 9 * 4 * 2


def test_hazards_apply_as_elsewhere(tmp_path, tokenizer):
    """TRL turns dropout off by default; with `disable_dropout: false` a model whose prefix drops out is refused
    under `activations: true` (its output differs between visits) and runs uncached under `auto`."""
    from hf_stackwise.schedule.phases import RecipeError

    def trainer(cache):
        model = tiny_causal_lm("llama", layers=4)
        model.config.attention_dropout = 0.1
        args = dpo_args(tmp_path, f"drop-{cache}", "shared", max_steps=2, activation_cache={"activations": cache})
        args.disable_dropout = False
        rows = Dataset.from_list(preference_rows(PAIRS))
        return StackwiseDPOTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)

    with pytest.raises(RecipeError, match=r"schedule\[0\].*dropout"):
        trainer(True).train()
    auto = trainer("auto")
    auto.train()
    assert not any(d.on for d in auto.cache_decisions) and "dropout" in auto.cache_decisions[0].reason


def test_expected_repeat_reads_the_pairs_and_trl_collator(tmp_path, tokenizer):
    """`auto` sizes the stores in sequences (2 per pair) and estimates how often a row's padded inputs repeat from the
    pairs' lengths (prompt + longer answer) through TRL's collator: below 1 when batches pad to their longest row,
    1 when every row is padded to one length."""

    def data(**overrides):
        args = dpo_args(tmp_path, "probe", "shared", max_length=400, **overrides)
        rows = Dataset.from_list(preference_rows(PAIRS))
        trainer = StackwiseDPOTrainer(
            model=tiny_causal_lm("llama", layers=4), args=args, train_dataset=rows, processing_class=tokenizer
        )
        return trainer.cache_data()

    per_batch, fixed = data(), data(pad_to_multiple_of=400)
    assert per_batch.rows == 2 * PAIRS and per_batch.global_batch == 2 * 4
    assert 0 < per_batch.repeat < 1 and "padded to the longest" in per_batch.repeat_note
    assert fixed.repeat == 1.0
