"""Learning rates over the schedule (standard library only): the per-phase lr factor (constant, warm-up, linear,
cosine) and each unit's rate (untrained units at zero, phase rates, layer-wise decay)."""

from __future__ import annotations

import pytest
from test_schedule import parse, untils

# ---- lr_factor ------------------------------------------------------------------------------------


def factors(resolved, steps) -> list[float]:
    return [resolved.lr_factor(s) for s in steps]


def test_constant_is_one_everywhere():
    resolved = untils(0.3, 1.0).resolve(10)
    assert factors(resolved, range(12)) == [1.0] * 12


def test_warmup_is_linear_from_zero():
    resolved = parse({"until": 1.0, "warmup": 0.4}).resolve(10)
    assert factors(resolved, range(10)) == [0.0, 0.25, 0.5, 0.75] + [1.0] * 6


def test_linear_decay():
    resolved = parse({"until": 1.0, "lr_schedule": "linear"}).resolve(10)
    assert factors(resolved, range(10)) == pytest.approx([1.0 - p / 10 for p in range(10)])
    assert resolved.lr_factor(0) == 1.0
    assert resolved.lr_factor(9) == pytest.approx(0.1)


def test_linear_decay_after_warmup():
    resolved = parse({"until": 1.0, "lr_schedule": "linear", "warmup": 0.2}).resolve(10)
    expected = [0.0, 0.5] + [1.0 - k / 8 for k in range(8)]
    assert factors(resolved, range(10)) == pytest.approx(expected)


def test_cosine_start_middle_end():
    resolved = parse({"until": 1.0, "lr_schedule": "cosine"}).resolve(10)
    assert resolved.lr_factor(0) == pytest.approx(1.0)
    assert resolved.lr_factor(2) == pytest.approx(0.9045084971874737)  # (1 + cos(0.2 pi)) / 2
    assert resolved.lr_factor(5) == pytest.approx(0.5)  # (1 + cos(pi / 2)) / 2
    assert resolved.lr_factor(9) == pytest.approx(0.024471741852423234)  # (1 + cos(0.9 pi)) / 2
    assert resolved.lr_factor(10) == resolved.lr_factor(9)  # clamped after the end


def test_cosine_with_warmup_inside_a_later_phase():
    resolved = parse({"until": 0.5}, {"until": 1.0, "lr_schedule": "cosine", "warmup": 0.2}).resolve(20)
    assert resolved.bounds == ((0, 10), (10, 20))
    assert factors(resolved, range(10)) == [1.0] * 10  # the first phase is constant
    assert resolved.lr_factor(10) == 0.0  # warm-up: 2 steps
    assert resolved.lr_factor(11) == 0.5
    assert resolved.lr_factor(12) == pytest.approx(1.0)  # cosine over the remaining 8 steps
    assert resolved.lr_factor(16) == pytest.approx(0.5)
    assert resolved.lr_factor(19) == pytest.approx(0.03806023374435663)  # (1 + cos(7 pi / 8)) / 2


def test_warmup_restarts_in_each_phase():
    resolved = parse({"until": 0.5, "warmup": 0.4}, {"until": 1.0, "warmup": 0.4}).resolve(20)
    first = factors(resolved, range(10))
    second = factors(resolved, range(10, 20))
    assert first == second == [0.0, 0.25, 0.5, 0.75] + [1.0] * 6


# ---- unit_lr --------------------------------------------------------------------------------------


def test_unit_lr_untrained_units_get_zero_and_phase_lr_overrides_base():
    resolved = parse(
        {"until": 0.5, "stacks": 2, "train": ["top"], "learning_rate": 0.01},
        {"until": 1.0, "train": "all"},
    ).resolve(10)
    lr = {u: resolved.unit_lr(0, u, 1e-3, 4) for u in ("embeddings", "stack_0", "stack_1", "stack_2", "head")}
    assert lr == {"embeddings": 0.0, "stack_0": 0.0, "stack_1": 0.01, "stack_2": 0.0, "head": 0.0}
    assert resolved.unit_lr(5, "stack_1", 1e-3, 4) == 1e-3  # learning_rate None -> the base rate
    assert resolved.unit_lr(5, "embeddings", 1e-3, 4) == 1e-3


def test_unit_lr_zero_learning_rate_is_not_the_base_rate():
    resolved = parse({"until": 1.0, "learning_rate": 0.0}).resolve(4)
    assert resolved.unit_lr(0, "stack_0", 1e-3, 2) == 0.0


def test_layer_lr_decay_counts_from_the_top_active_stack():
    resolved = parse(
        {"until": 0.5, "stacks": 2, "layer_lr_decay": 0.5},
        {"until": 1.0, "layer_lr_decay": 0.5, "learning_rate": 0.1},
    ).resolve(10)
    shallow = {u: resolved.unit_lr(0, u, 1.0, 4) for u in ("embeddings", "stack_0", "stack_1", "stack_2", "head")}
    assert shallow == {"embeddings": 0.25, "stack_0": 0.5, "stack_1": 1.0, "stack_2": 0.0, "head": 1.0}
    full = {u: resolved.unit_lr(5, u, 1.0, 4) for u in ("embeddings", "stack_0", "stack_1", "stack_2", "stack_3")}
    assert full == pytest.approx(
        {"embeddings": 0.1 * 0.5**4, "stack_0": 0.1 * 0.5**3, "stack_1": 0.1 * 0.5**2, "stack_2": 0.05, "stack_3": 0.1}
    )
    assert resolved.unit_lr(5, "head", 1.0, 4) == pytest.approx(0.1)


def test_unit_lr_follows_the_lr_factor():
    resolved = parse({"until": 1.0, "warmup": 0.5, "layer_lr_decay": 0.5, "learning_rate": 0.2}).resolve(4)
    assert resolved.unit_lr(0, "stack_1", 1.0, 2) == 0.0
    assert resolved.unit_lr(1, "stack_1", 1.0, 2) == pytest.approx(0.1)
    assert resolved.unit_lr(1, "stack_0", 1.0, 2) == pytest.approx(0.05)
    assert resolved.unit_lr(3, "head", 1.0, 2) == pytest.approx(0.2)


# ---- regressions (bugs found and fixed) ----------------------------------------------------------


def test_warmup_always_leaves_a_step_at_full_rate():
    one_step = parse({"until": 0.5, "warmup": 0.6}, {"until": 1.0}).resolve(2)
    assert one_step.bounds[0] == (0, 1)
    assert one_step.lr_factor(0) > 0.0
    assert one_step.unit_lr(0, "head", 1e-3, 2) > 0.0
    long = parse({"until": 1.0, "warmup": 0.95}).resolve(10)  # round(9.5) == 10 == the phase length
    assert long.lr_factor(9) == 1.0
