"""Per-phase learning-rate schedules: every transformers step schedule gives, inside a phase, the rate transformers
gives for a run as long as the phase; `exponential` and `step` follow their formulas; bad names and kwargs are
refused with the key path."""

from __future__ import annotations

import pytest
import torch
from transformers import get_scheduler

from hf_stackwise.schedule.lr_schedules import schedule_names
from hf_stackwise.schedule.phases import LR_SCHEDULES, RecipeError, Schedule

# name -> kwargs (the schedule function's own arguments)
CASES = {
    "linear": {},
    "cosine": {"num_cycles": 0.5},
    "cosine_with_restarts": {"num_cycles": 3},
    "polynomial": {"lr_end": 1e-5, "power": 2.0},
    "constant": {},
    "constant_with_warmup": {},
    "inverse_sqrt": {"timescale": 4},
    "cosine_with_min_lr": {"min_lr": 2e-4},
    "cosine_warmup_with_min_lr": {"min_lr_rate": 0.1, "warmup_lr_rate": 0.05},
    "warmup_stable_decay": {"num_decay_steps": 7, "decay_type": "linear", "min_lr_ratio": 0.1},
}
LR, BASE_LR = 1e-3, 5e-4
STEPS, FIRST = 60, 20  # phase 1 covers steps [20, 60): 40 steps


def reference(name: str, kwargs: dict, warmup_steps: int, length: int) -> list[float]:
    """The learning rates transformers' own scheduler gives over ``length`` steps, optimizer at LR."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=LR)
    if name == "constant" and warmup_steps:
        name = "constant_with_warmup"
    scheduler = get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=length,
        scheduler_specific_kwargs=dict(kwargs),
    )
    rates = []
    for _ in range(length):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_the_names_are_transformers_step_schedules_plus_two():
    assert set(schedule_names()) == set(LR_SCHEDULES)
    assert set(CASES) | {"exponential", "step"} == set(LR_SCHEDULES)


@pytest.mark.parametrize("warmup", [0.0, 0.25])
@pytest.mark.parametrize("name", sorted(CASES))
def test_each_schedule_gives_transformers_rate_inside_its_phase(name, warmup):
    phases = [
        {"name": "warm", "until": FIRST / STEPS, "train": "all"},
        {
            "name": "main",
            "until": 1.0,
            "train": "all",
            "learning_rate": LR,
            "warmup": warmup,
            "lr_schedule": name,
            "lr_schedule_kwargs": CASES[name] or None,
        },
    ]
    resolved = Schedule.from_list(phases).resolve(STEPS)
    length = STEPS - FIRST
    expected = reference(name, CASES[name], round(warmup * length), length)
    got = [resolved.unit_lr(step, "stack_0", BASE_LR, 2) for step in range(FIRST, STEPS)]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # the first phase is untouched: constant at the base rate
    assert [resolved.unit_lr(s, "stack_0", BASE_LR, 2) for s in range(FIRST)] == [BASE_LR] * FIRST


def test_fractions_of_the_phase_for_step_counts():
    phases = [
        {"until": 1.0, "lr_schedule": "warmup_stable_decay", "lr_schedule_kwargs": {"num_decay_steps": 0.25}},
    ]
    resolved = Schedule.from_list(phases).resolve(40)
    expected = reference("warmup_stable_decay", {"num_decay_steps": 10}, 0, 40)
    assert [resolved.unit_lr(s, "stack_0", LR, 1) for s in range(40)] == pytest.approx(expected, rel=1e-12)


def test_exponential_and_step():
    warm = 2
    phases = [{"until": 1.0, "warmup": 0.2, "lr_schedule": "exponential", "lr_schedule_kwargs": {"gamma": 0.9}}]
    resolved = Schedule.from_list(phases).resolve(10)
    assert [resolved.lr_factor(s) for s in range(10)] == pytest.approx(
        [0.0, 0.5] + [0.9 ** (s - warm) for s in range(warm, 10)]
    )
    phases = [{"until": 1.0, "lr_schedule": "step", "lr_schedule_kwargs": {"step_size": 3, "gamma": 0.5}}]
    resolved = Schedule.from_list(phases).resolve(10)
    assert [resolved.lr_factor(s) for s in range(10)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125]


def test_min_lr_is_absolute_with_layer_decay_and_per_unit():
    phases = [
        {
            "until": 1.0,
            "train": "all",
            "learning_rate": 1e-3,
            "layer_lr_decay": 0.5,
            "lr_schedule": "cosine_with_min_lr",
            "lr_schedule_kwargs": {"min_lr": 1e-4},
        }
    ]
    resolved = Schedule.from_list(phases).resolve(11)
    assert resolved.unit_lr(10, "stack_1", 0.0, 2) == pytest.approx(
        1e-4 + 0.9e-3 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 10 / 11, dtype=torch.float64)).item())
    )
    assert resolved.unit_lr(10, "stack_0", 0.0, 2) == pytest.approx(resolved.unit_lr(10, "stack_1", 0.0, 2) * 0.5)


BAD = [
    ({"lr_schedule": "cosine_annealing"}, "schedule[0].lr_schedule: 'cosine_annealing' is not one of"),
    ({"lr_schedule": "reduce_lr_on_plateau"}, "schedule[0].lr_schedule: 'reduce_lr_on_plateau' cannot be"),
    ({"lr_schedule": "greedy"}, "schedule[0].lr_schedule: 'greedy' cannot be"),
    (
        {"lr_schedule": "cosine", "lr_schedule_kwargs": {"cycles": 2}},
        "schedule[0].lr_schedule_kwargs.cycles: 'cosine'",
    ),
    ({"lr_schedule": "constant", "lr_schedule_kwargs": {"gamma": 2}}, "schedule[0].lr_schedule_kwargs.gamma:"),
    ({"lr_schedule": "linear", "lr_schedule_kwargs": {"num_training_steps": 5}}, "set by the phase"),
    ({"lr_schedule": "cosine", "lr_schedule_kwargs": [2]}, "schedule[0].lr_schedule_kwargs: expected a mapping"),
    ({"lr_schedule": "warmup_stable_decay"}, "schedule[0].lr_schedule_kwargs: 'warmup_stable_decay' needs"),
    ({"lr_schedule": "cosine_with_min_lr"}, "needs min_lr (an absolute rate) or min_lr_rate"),
    ({"lr_schedule": "step", "lr_schedule_kwargs": {"gamma": 0.5}}, "'step' needs step_size"),
    ({"lr_schedule": "exponential", "lr_schedule_kwargs": {"gamma": -1}}, "lr_schedule_kwargs.gamma: -1"),
    ({"lr_schedule": "step", "lr_schedule_kwargs": {"gamma": 0.5, "step_size": 0}}, "step_size: 0 is not"),
    ({"lr_schedule": "cosine", "lr_schedule_kwargs": {"num_cycles": [1]}}, "num_cycles: [1] is not a number"),
]


@pytest.mark.parametrize("fields, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_schedules_name_the_key(fields, message):
    with pytest.raises(RecipeError) as info:
        Schedule.from_list([{"until": 1.0, **fields}])
    assert message in str(info.value)


def test_step_counts_longer_than_the_phase_are_refused_when_resolved():
    schedule = Schedule.from_list(
        [
            {"until": 0.5},
            {"until": 1.0, "lr_schedule": "warmup_stable_decay", "lr_schedule_kwargs": {"num_decay_steps": 30}},
        ]
    )
    schedule.resolve(100)  # 50 steps: fits
    with pytest.raises(RecipeError, match=r"schedule\[1\]\.lr_schedule_kwargs\.num_decay_steps: 30 steps"):
        schedule.resolve(40)


def test_trainer_optimizer_follows_the_phase_schedule(tmp_path, token_dataset):
    """The optimizer's per-group rates at each step are the schedule's (transformers' shapes)."""
    from conftest import tiny_arguments, tiny_causal_lm
    from transformers import TrainerCallback

    from hf_stackwise.trainer import StackwiseTrainer

    schedule = [
        {"name": "top", "until": 0.5, "train": ["top"], "learning_rate": 1e-3},
        {
            "name": "all",
            "until": 1.0,
            "train": "all",
            "learning_rate": 1e-3,
            "warmup": 0.25,
            "lr_schedule": "cosine_with_restarts",
            "lr_schedule_kwargs": {"num_cycles": 2},
        },
    ]
    seen = []

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            seen.append(max(g["lr"] for g in optimizer.param_groups))

    args = tiny_arguments(
        tmp_path / "out",
        schedule=schedule,
        max_steps=12,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        blocks_per_stack=2,
    )
    trainer = StackwiseTrainer(model=tiny_causal_lm(), args=args, train_dataset=token_dataset)
    trainer.add_callback(Record())
    trainer.train()
    expected = [1e-3] * 6 + reference("cosine_with_restarts", {"num_cycles": 2}, 2, 6)
    assert seen == pytest.approx(expected, rel=1e-9)
