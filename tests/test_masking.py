"""The pure data-plane functions: corruption statistics, labels, special tokens, seeding, row splitting and
mask-rate ramps at phase start, middle and end."""

from __future__ import annotations

import math

import pytest
import torch

from hf_stackwise.data.masking import (
    IGNORE_INDEX,
    Vocabulary,
    corruptible,
    mask_for_diffusion,
    mask_for_mlm,
    row_seed,
    split_rows,
)
from hf_stackwise.data.plane import DataPlane, ramp
from hf_stackwise.schedule.phases import Schedule

VOCAB = Vocabulary(mask_id=3, special_ids=(0, 1, 2, 3), size=500)  # 0 pad, 1 cls, 2 sep, 3 mask


def batch(rows=64, length=128, seed=0):
    """Rows of real-looking ids with CLS/SEP borders and padded tails (special tokens to protect)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB.size, (rows, length), generator=gen)
    ids[:, 0], ids[:, 60] = 1, 2
    ids[::2, 100:] = 0  # padding
    return ids


def test_mlm_rate_split_and_labels():
    ids = batch()
    out, labels = mask_for_mlm(ids, VOCAB, 0.15, seed=0, step=7)
    allowed = corruptible(ids, VOCAB)
    chosen = labels != IGNORE_INDEX
    # labels only on chosen positions, and there they are the original tokens
    assert torch.equal(labels[chosen], ids[chosen])
    # special tokens (CLS, SEP, PAD) are never chosen and never changed
    assert not chosen[~allowed].any()
    assert torch.equal(out[~allowed], ids[~allowed])
    # outside the chosen positions nothing changes
    assert torch.equal(out[~chosen], ids[~chosen])
    rate = chosen.sum().item() / allowed.sum().item()
    assert abs(rate - 0.15) < 0.015, rate  # 6,400 corruptible tokens: std ~ 0.0045
    n = chosen.sum().item()
    to_mask = (out[chosen] == VOCAB.mask_id).float().mean().item()
    kept = (out[chosen] == ids[chosen]).float().mean().item()  # includes random draws of the same token (1/500)
    randomized = 1 - to_mask - kept
    assert abs(to_mask - 0.8) < 0.04 and abs(randomized - 0.1) < 0.03 and abs(kept - 0.1) < 0.03, (n, to_mask, kept)


@pytest.mark.parametrize("rate", [0.05, 0.5, 0.9])
def test_mlm_rates_within_tolerance(rate):
    ids = batch(rows=32)
    _, labels = mask_for_mlm(ids, VOCAB, rate, seed=1, step=0)
    allowed = corruptible(ids, VOCAB).sum().item()
    observed = (labels != IGNORE_INDEX).sum().item() / allowed
    assert abs(observed - rate) < 4 * math.sqrt(rate * (1 - rate) / allowed) + 1e-3, observed


def test_masks_are_a_function_of_sample_and_step():
    ids = batch(rows=8)
    a, la = mask_for_mlm(ids, VOCAB, 0.3, seed=0, step=5)
    # the same rows in another order, in another batch: each row keeps its mask
    perm = torch.tensor([3, 1, 7, 0, 2, 6, 5, 4])
    b, lb = mask_for_mlm(ids[perm], VOCAB, 0.3, seed=0, step=5)
    assert torch.equal(a[perm], b) and torch.equal(la[perm], lb)
    single, _ = mask_for_mlm(ids[2:3], VOCAB, 0.3, seed=0, step=5)
    assert torch.equal(single[0], a[2])
    # another step or another seed: another mask
    c, _ = mask_for_mlm(ids, VOCAB, 0.3, seed=0, step=6)
    d, _ = mask_for_mlm(ids, VOCAB, 0.3, seed=1, step=5)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    assert row_seed(0, 5, ids[0]) == row_seed(0, 5, ids[0].clone()) != row_seed(0, 5, ids[1])


def test_diffusion_draws_a_rate_per_row_and_weights_by_its_inverse():
    ids = batch(rows=200, length=128)
    out, labels, weights = mask_for_diffusion(ids, VOCAB, 0.9, seed=0, step=3, min_rate=0.1, weighting=True)
    allowed = corruptible(ids, VOCAB)
    chosen = labels != IGNORE_INDEX
    assert not chosen[~allowed].any()
    assert (out[chosen] == VOCAB.mask_id).all()  # diffusion: every chosen token becomes the mask token
    assert torch.equal(out[~chosen], ids[~chosen])
    rates = chosen.sum(1).float() / allowed.sum(1).float()
    assert rates.min() > 0.02 and rates.max() < 0.99
    assert abs(rates.mean().item() - 0.5) < 0.05  # uniform on [0.1, 0.9]
    assert rates.std() > 0.15  # rows differ (a single shared rate would give ~0.04)
    # weights: 1/rate of the row on masked positions, 0 elsewhere
    assert (weights[~chosen] == 0).all()
    row_weight = weights.max(1).values
    assert torch.allclose(1 / row_weight, rates, atol=0.12)
    _, _, none = mask_for_diffusion(ids, VOCAB, 0.9, seed=0, step=3)
    assert none is None


def test_split_rows_keeps_tokens():
    ids = torch.arange(2 * 10).reshape(2, 10)
    out = split_rows({"input_ids": ids, "labels": ids.clone(), "other": "kept"}, 4)
    assert out["input_ids"].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [10, 11, 12, 13], [14, 15, 16, 17]]
    assert torch.equal(out["labels"], out["input_ids"]) and out["other"] == "kept"
    assert split_rows({"input_ids": ids}, 10)["input_ids"] is ids


def test_ramp_values_at_phase_start_middle_end():
    schedule = Schedule.from_list(
        [
            {"name": "a", "until": 0.5, "mask_rate": [0.15, 0.5]},
            {"name": "b", "until": 1.0, "mask_rate": [0.5, 0.9], "mask_schedule": "cosine"},
        ]
    )
    plane = DataPlane(task="mlm")
    resolved = schedule.resolve(22)  # phase a: steps 0..10, phase b: steps 11..21
    rate = [plane.state_at(resolved, step).mask_rate for step in range(22)]
    assert rate[0] == pytest.approx(0.15) and rate[5] == pytest.approx(0.325) and rate[10] == pytest.approx(0.5)
    assert rate[11] == pytest.approx(0.5) and rate[21] == pytest.approx(0.9)
    assert rate[16] == pytest.approx(0.7)  # cosine middle = linear middle
    assert rate[12] - rate[11] < rate[16] - rate[15]  # cosine: slow start
    assert all(b >= a for a, b in zip(rate, rate[1:]))
    assert ramp(0.2, 0.4, 1.5) == pytest.approx(0.4) and ramp(0.2, 0.4, -1) == pytest.approx(0.2)


def test_phase_data_state_defaults():
    schedule = Schedule.from_list(
        [
            {"name": "short", "until": 0.5, "max_seq_length": 64, "data": {"general": 3, "domain": 1}},
            {"name": "long", "until": 1.0, "task": "diffusion"},
        ]
    )
    plane = DataPlane(task="mlm", max_seq_length=256, mask_rate=0.2, datasets=("general", "domain"))
    resolved = schedule.resolve(4)
    first, last = plane.state_at(resolved, 0), plane.state_at(resolved, 3)
    assert (first.task, first.max_seq_length, first.mask_rate) == ("mlm", 64, 0.2)
    assert first.mixture == {"general": 0.75, "domain": 0.25}
    assert (last.task, last.max_seq_length, last.mixture) == ("diffusion", 256, {"general": 0.5, "domain": 0.5})
    assert plane.chunk_length(schedule) == 256
    assert DataPlane.from_dict(plane.to_dict()) == plane
