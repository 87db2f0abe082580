"""Schedule generators (`cycle`, `sample`) expand into ordinary phases: golden phase lists, the same on every rank,
validated like hand-written phases, refused with the key path before any weight loads; `optimizer_state:
release_idle` frees exactly the idle units' state, matches `plan`, and resumes bitwise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny_recipe, write_recipe
from test_bad_input import no_weights, refused  # noqa: F401  (the fixture)
from test_resume import make_trainer as resume_trainer
from transformers import TrainerCallback

from hf_stackwise.cli import pipeline as run
from hf_stackwise.cli.plan import make_plan
from hf_stackwise.optimizers import keeps_state
from hf_stackwise.recipe.loader import load_recipe
from hf_stackwise.schedule.phases import RecipeError, Schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def phases(raw, base=None) -> list[tuple]:
    schedule = Schedule.from_list(raw)
    if base is not None:
        schedule = schedule.for_rack(base)
    return [(p.name, p.until, p.train) for p in schedule.phases]


def test_cycle_golden_phase_lists():
    descending = [{"name": "badam", "until": 1.0, "cycle": {"stacks": "all", "rounds": 2}}]
    assert phases(descending, 3) == [
        ("badam-1", 0.166666666667, (2,)),  # even sixths, rounded to 12 decimals
        ("badam-2", 0.333333333333, (1,)),
        ("badam-3", 0.5, (0,)),
        ("badam-4", 0.666666666667, (2,)),
        ("badam-5", 0.833333333333, (1,)),
        ("badam-6", 1.0, (0,)),
    ]
    ascending = [{"name": "c", "until": 1.0, "cycle": {"stacks": [0, 1, 2, 3, 4], "order": "ascending", "k": 2}}]
    assert phases(ascending) == [("c-1", 0.333333333333, (0, 1)), ("c-2", 0.666666666667, (2, 3)), ("c-3", 1.0, (4,))]
    random_order = [
        {"name": "c", "until": 1.0, "cycle": {"stacks": [0, 1, 2, 3], "order": "random", "rounds": 2, "seed": 7}}
    ]
    got = phases(random_order)
    assert got == [
        ("c-1", 0.125, (2,)),
        ("c-2", 0.25, (0,)),
        ("c-3", 0.375, (3,)),
        ("c-4", 0.5, (1,)),
        ("c-5", 0.625, (1,)),
        ("c-6", 0.75, (2,)),
        ("c-7", 0.875, (3,)),
        ("c-8", 1.0, (0,)),
    ]
    for round_ in (got[:4], got[4:]):  # every stack once per round, a fresh permutation each round
        assert sorted(t[0] for _, _, t in round_) == [0, 1, 2, 3]
    assert phases([{**random_order[0], "cycle": {**random_order[0]["cycle"], "seed": 8}}]) != got


def test_sample_golden_phase_lists_and_seeds():
    lisa = [{"name": "s", "until": 1.0, "sample": {"pool": "all", "k": 2, "every": 0.25}}]
    assert phases(lisa, 6) == [
        ("s-1", 0.25, (4, 5)),
        ("s-2", 0.5, (2, 4)),
        ("s-3", 0.75, (1, 2)),
        ("s-4", 1.0, (2, 3)),
    ]
    lisa[0]["sample"]["seed"] = 1
    assert phases(lisa, 6) == [
        ("s-1", 0.25, (2, 3)),
        ("s-2", 0.5, (0, 5)),
        ("s-3", 0.75, (3, 4)),
        ("s-4", 1.0, (1, 5)),
    ]


def test_generators_sit_between_phases_and_carry_their_fields():
    raw = [
        {"name": "warm", "until": 0.1, "train": "top"},
        {
            "name": "s",
            "until": 0.5,
            "sample": {"pool": [1, 2, 3], "k": 1, "every": 0.15},
            "learning_rate": 3e-4,
            "head": "train",
            "optimizer_state": "release_idle",
        },
        {"name": "full", "until": 1.0},
    ]
    schedule = Schedule.from_list(raw)
    assert [(p.name, p.until, p.train) for p in schedule.phases] == [
        ("warm", 0.1, "top"),
        ("s-1", 0.25, (3,)),
        ("s-2", 0.4, (2,)),
        ("s-3", 0.5, (1,)),  # the last span is shorter: it ends at the entry's `until`
        ("full", 1.0, "all"),
    ]
    for phase in schedule.phases[1:4]:
        assert (phase.learning_rate, phase.head, phase.optimizer_state) == (3e-4, "train", "release_idle")
    assert schedule.key_path(2, "train") == "schedule[1].sample.pool"
    assert schedule.resolve(20).trace(4) == [
        (0, "warm", (3,)),
        (2, "s-1", (3,)),
        (5, "s-2", (2,)),
        (8, "s-3", (1,)),
        (10, "full", (0, 1, 2, 3)),
    ]


RANK_SCRIPT = """
import json, sys
from hf_stackwise.schedule.phases import Schedule
raw = [{"name": "b", "until": 0.5, "cycle": {"stacks": "all", "order": "random", "rounds": 3, "seed": 5}},
       {"name": "l", "until": 1.0, "sample": {"pool": "all", "k": 3, "every": 0.05, "seed": 11}}]
print(json.dumps(Schedule.from_list(raw).for_rack(8).to_list()))
"""


def test_expansion_is_identical_on_every_rank():
    outputs = []
    for rank, hashseed in (("0", "1"), ("1", "2")):
        env = {**os.environ, "RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": "2", "PYTHONHASHSEED": hashseed}
        done = subprocess.run([sys.executable, "-c", RANK_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        outputs.append(json.loads(done.stdout))
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) == 3 * 8 + 10


@pytest.mark.parametrize(
    "raw, base, expected",
    [
        (
            [{"name": "b", "until": 1.0, "cycle": {"stacks": [0, 7]}}],
            4,
            "schedule[0].cycle.stacks: stack [7] does not exist",
        ),
        (
            [{"name": "b", "until": 1.0, "stacks": 2, "cycle": {"stacks": [0, 3]}}],
            4,
            "schedule[0].cycle.stacks: stack [3] is not active (`stacks: 2`",
        ),
        (
            [{"name": "b", "until": 1.0, "stacks": 2, "sample": {"pool": "all", "k": 3}}],
            4,
            "schedule[0].sample.k: 3 but the pool has 2 stacks",
        ),
        (
            [{"name": "b", "until": 1.0, "cycle": {"stacks": [1, 2], "k": 3}}],
            None,
            "schedule[0].cycle.k: 3 but the pool",
        ),
        ([{"name": "b", "until": 1.0, "sample": {"seed": 1.5}}], 4, "schedule[0].sample.seed: 1.5 is not an integer"),
        ([{"name": "b", "until": 1.0, "sample": {"seed": "x"}}], 4, "schedule[0].sample.seed: 'x' is not an integer"),
        ([{"name": "b", "until": 1.0, "sample": {"every": 0}}], 4, "schedule[0].sample.every: 0 is not a fraction"),
        ([{"name": "b", "until": 1.0, "cycle": {"stacks": [1], "step": 2}}], 4, "schedule[0].cycle.step: unknown"),
        ([{"name": "b", "until": 1.0, "cycle": {"order": "up"}}], 4, "schedule[0].cycle.order: 'up' is not one of"),
        ([{"name": "b", "until": 1.0, "train": [1], "cycle": {}}], 4, "schedule[0].train: a `cycle` entry sets"),
        ([{"name": "b", "until": 1.0, "cycle": {}, "learning_rate": -1}], 4, "schedule[0].learning_rate"),
        (
            [{"name": "b-1", "until": 0.5}, {"name": "b", "until": 1.0, "cycle": {"stacks": [0, 1]}}],
            4,
            "phase name 'b-1' is used more than once",
        ),
    ],
)
def test_bad_generators_name_their_key_path(raw, base, expected):
    with pytest.raises(RecipeError) as err:
        phases(raw, base)
    assert expected in str(err.value)
    assert str(err.value).count(expected) == 1  # a generator's problem is reported once, not per phase


def test_a_span_that_rounds_to_zero_steps_names_the_generator():
    schedule = Schedule.from_list([{"name": "l", "until": 1.0, "sample": {"pool": [0, 1, 2], "k": 1, "every": 0.05}}])
    schedule.resolve(20)  # one step per draw
    with pytest.raises(RecipeError, match=r"schedule\[0\]\.sample\.every: phase 'l-\d+' gets no optimizer step at 10"):
        schedule.resolve(10)


def test_keeps_state_probe():
    assert keeps_state(torch.optim.AdamW, {})
    assert keeps_state(torch.optim.SGD, {"momentum": 0.9})
    assert not keeps_state(torch.optim.SGD, {})


GENERATED = [
    {"name": "warm", "until": 0.25, "train": ["top"]},
    {"name": "bc", "until": 1.0, "cycle": {"stacks": "all", "k": 1}, "optimizer_state": "release_idle"},
]


@pytest.mark.usefixtures("no_weights")
@pytest.mark.parametrize(
    "schedule, extra, expected",
    [
        (
            GENERATED,
            ["--training.optim", "sgd"],
            ["schedule[1].optimizer_state: `release_idle`", "training.optim: 'sgd'"],
        ),
        (GENERATED, ["--training.max_steps", "3"], ["schedule[1].cycle: phase 'bc-"]),
        (
            [{"name": "s", "until": 1.0, "sample": {"pool": [9], "k": 1}}],
            [],
            ["schedule[0].sample.pool: stack [9] does not exist"],
        ),
        ([{"name": "s", "until": 1.0, "sample": {"k": 5}}], [], ["schedule[0].sample.k: 5 but the pool has 4 stacks"]),
    ],
    ids=["stateless-optimizer", "zero-step-span", "missing-stack", "k-beyond-pool"],
)
def test_cli_refuses_bad_generators_before_weights_load(
    tmp_path, tiny_llama_dir, pydoc_files, capsys, schedule, extra, expected
):
    raw = tiny_recipe(tmp_path, tiny_llama_dir, pydoc_files[0], schedule)
    path = write_recipe(tmp_path, raw)
    for command in ("validate", "plan", "train"):
        refused([command, path, *extra], capsys, raw["training"]["output_dir"], *expected)


# ---- release_idle: the state it frees, plan's count, exact resume ----------------------------------------------


class StateBytes(TrainerCallback):
    """After every optimizer step: the parameters holding state, the state tensors, and the moments' bytes."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        tensors = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        self.steps.append(
            {
                "params": {id(p) for p, s in optimizer.state.items() if s},
                "tensors": len(tensors),
                "moments": sum(t.nbytes for t in tensors if t.dim() > 0),  # AdamW's `step` scalars aside
            }
        )


def test_release_idle_frees_exactly_the_idle_units_and_matches_plan(tmp_path, tiny_llama_dir, pydoc_files):
    schedule = [
        {"name": "all", "until": 0.25, "train": "all"},
        {
            "name": "bc",
            "until": 1.0,
            "cycle": {"stacks": "all", "rounds": 1},
            "optimizer_state": "release_idle",
            "head": "train",
        },
    ]
    raw = tiny_recipe(tmp_path, tiny_llama_dir, pydoc_files[0], schedule, max_steps=10, optim="adamw_torch")
    path = write_recipe(tmp_path, raw)
    plan = make_plan(load_recipe(path))
    assert [p.name for p in plan.phases] == ["all", "bc-1", "bc-2", "bc-3", "bc-4"]
    trainer = run.build_trainer(run.prepare(load_recipe(path)))
    measured = StateBytes()
    trainer.add_callback(measured)
    trainer.train()
    units = trainer.rack.parameter_units()
    for phase in plan.phases:
        trained = {id(p) for unit in phase.units for _, p in units[unit]}
        for step in range(phase.start, phase.end):
            got = measured.steps[step]
            assert got["params"] == trained, (phase.name, step)  # exactly the trained units hold state
            assert got["tensors"] == 3 * len(trained)  # AdamW: step, exp_avg, exp_avg_sq per parameter
            assert got["moments"] == phase.memory["optimizer"], (phase.name, step)
    assert plan.phases[1].memory["optimizer"] < plan.phases[0].memory["optimizer"]


def make_trainer(output_dir, dataset, schedule, **overrides):
    """test_resume's trainer (a tiny GPT-2 with dropout, a checkpoint every step) with plain AdamW's per-parameter
    state (step, exp_avg, exp_avg_sq), which the release_idle tests count."""
    return resume_trainer(output_dir, dataset, schedule, **{"optim": "adamw_torch", **overrides})


SAMPLE = [
    {
        "name": "lisa",
        "until": 1.0,
        "sample": {"pool": "all", "k": 2, "every": 0.5, "seed": 3},
        "head": "train",
        "optimizer_state": "release_idle",
    }
]


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory, token_dataset):
    out = tmp_path_factory.mktemp("sample-full")
    trainer = make_trainer(out, token_dataset, SAMPLE)
    assert [p.name for p in trainer.schedule.phases] == ["lisa-1", "lisa-2"]
    assert trainer.schedule.phases[0].train != trainer.schedule.phases[1].train
    trainer.train()
    last = {
        id(p)
        for unit in trainer.resolved.state_at(7, trainer.base_sizes).trainable_units
        for _, p in trainer.rack.parameter_units()[unit]
    }
    assert {id(p) for p, s in trainer.optimizer.state.items() if s} == last  # lisa-1's own stacks were released
    return out, trainer


def state_by_name(trainer) -> dict:
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    return {names[id(p)]: s for p, s in trainer.optimizer.state.items() if s}


@pytest.mark.slow
@pytest.mark.parametrize("step", [2, 4], ids=["mid-span", "at-switch"])
def test_sample_with_release_idle_resumes_bitwise(tmp_path, token_dataset, sample_run, step):
    out, full = sample_run
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(out / f"checkpoint-{step}", resumed_dir / f"checkpoint-{step}")
    resumed = make_trainer(resumed_dir, token_dataset, SAMPLE)
    resumed.train(resume_from_checkpoint=str(resumed_dir / f"checkpoint-{step}"))
    assert resumed.state.global_step == 8
    ours = dict(resumed.model.named_parameters())
    for name, value in full.model.named_parameters():
        assert torch.equal(ours[name], value), name
    theirs, mine = state_by_name(full), state_by_name(resumed)
    assert theirs.keys() == mine.keys()  # the released state stays released after the resume
    for name, state in theirs.items():
        for key, value in state.items():
            assert torch.equal(mine[name][key], value), (name, key)


@pytest.mark.parametrize("name, count", [("badam", 10), ("lisa", 20)])
def test_shipped_recipes_expand_and_hold_one_phase_of_state(tiny_30_block_dir, name, count):
    """The BAdam and LISA recipes: their generators expand as their headers say, and with `release_idle` every
    phase holds AdamW state (two tensors per value) for what it trains only."""
    path = os.path.join(ROOT, "recipes", "smollm2-135m", f"{name}.yaml")
    plan = make_plan(load_recipe(path, ["--model.name_or_path", tiny_30_block_dir]))
    assert [p.name for p in plan.phases] == [f"{name}-{i}" for i in range(1, count + 1)]
    if name == "badam":
        assert [p.trainable_stacks for p in plan.phases] == [(4 - i % 5,) for i in range(10)]
    else:
        assert all(len(p.trainable_stacks) == 2 and {"embeddings", "head"} <= set(p.units) for p in plan.phases)
        assert len({p.trainable_stacks for p in plan.phases}) > 10  # fresh draws
    assert [(p.start, p.end) for p in plan.phases] == [
        (i * 500 // count, (i + 1) * 500 // count) for i in range(count)
    ]
    for phase in plan.phases:
        assert phase.memory["optimizer"] == 2 * phase.memory["gradients"] > 0


def test_python_api_refuses_release_idle_with_a_stateless_optimizer(tmp_path, token_dataset):
    trainer = make_trainer(tmp_path / "run", token_dataset, SAMPLE, optim="sgd")
    with pytest.raises(RecipeError, match=r"schedule\[0\]\.optimizer_state: `release_idle` .* training.optim: sgd"):
        trainer.train()
    assert trainer.state.global_step == 0


# One warm-up and one decay over a generator's whole span (issue 18): 20 steps, 4 generated phases of 5 steps;
# the entry's `warmup: 0.2` is 4 steps of the span and `linear` decays from step 4 to 0 at step 20.
SPAN = [
    {
        "name": "b",
        "until": 1.0,
        "cycle": {"stacks": [0, 1], "rounds": 2},
        "warmup": 0.2,
        "lr_schedule": "linear",
        "learning_rate": 1e-3,
    }
]
# Hand-computed: steps 0..3 ramp k/4; steps 4..19 decay (20 - k) / 16.
SPAN_GOLDEN = [0.0, 0.25, 0.5, 0.75] + [(20 - k) / 16 for k in range(4, 20)]
# With `each: {warmup: 0.4}` every 5-step phase also warms up over 2 steps (0, 1/2, 1, 1, 1), times the span's.
EACH_GOLDEN = [s * e for s, e in zip(SPAN_GOLDEN, [0.0, 0.5, 1.0, 1.0, 1.0] * 4, strict=True)]


def test_a_generator_entry_warms_up_and_decays_once_over_its_span():
    resolved = Schedule.from_list(SPAN).resolve(20)
    assert [p.name for p in resolved.schedule.phases] == ["b-1", "b-2", "b-3", "b-4"]
    assert all((p.warmup, p.lr_schedule) == (0.0, "constant") for p in resolved.schedule.phases)
    trained = [resolved.state_at(k, 2).trainable_units for k in range(20)]
    lrs = [resolved.unit_lr(k, min(units), 5e-4, 2) for k, units in enumerate(trained)]
    assert lrs == pytest.approx([1e-3 * f for f in SPAN_GOLDEN], abs=1e-15)
    each = [{**SPAN[0], "cycle": {**SPAN[0]["cycle"], "each": {"warmup": 0.4}}}]
    assert [Schedule.from_list(each).resolve(20).lr_factor(k) for k in range(20)] == pytest.approx(EACH_GOLDEN)
    # the span survives the run folder's round trip (`to_list` → `from_list`) and enters the fingerprint
    schedule = Schedule.from_list(SPAN)
    assert Schedule.from_list(schedule.to_list()) == schedule
    per_phase = [
        {k: v for k, v in SPAN[0].items() if k != "cycle"} | {"name": f"p{i}", "until": (i + 1) / 4} for i in range(4)
    ]
    assert Schedule.from_list(per_phase).fingerprint() != schedule.fingerprint()


def test_a_generator_span_with_bad_kwargs_names_the_entry():
    raw = [{**SPAN[0], "lr_schedule": "warmup_stable_decay", "lr_schedule_kwargs": {"num_decay_steps": 30}}]
    with pytest.raises(
        RecipeError,
        match=r"schedule\[0\]\.lr_schedule_kwargs\.num_decay_steps: 30 steps, but the "
        r"entry's span has 20",
    ):
        Schedule.from_list(raw).resolve(20)
    with pytest.raises(RecipeError, match=r"schedule\[0\]\.cycle\.each: "):
        Schedule.from_list([{**SPAN[0], "cycle": {"stacks": [0, 1], "each": {"until": 0.5}}}])
    with pytest.raises(RecipeError, match=r"schedule\[0\]\.cycle\.each\.warmup: 2 is not a fraction"):
        Schedule.from_list([{**SPAN[0], "cycle": {"stacks": [0, 1], "each": {"warmup": 2}}}])
    with pytest.raises(RecipeError, match=r"schedule\[0\]\.cycle\.each\.warmup: 2 is not a fraction"):
        Schedule.from_list([{**SPAN[0], "cycle": {"stacks": [0, 1], "each": {"warmup": 2}}}])


class LearningRates(TrainerCallback):
    def __init__(self):
        self.lrs = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(max(group["lr"] for group in optimizer.param_groups))


def test_a_real_run_follows_the_span_golden_rates(tmp_path, token_dataset):
    """The optimizer's rates at each of 20 steps of a real run: one warm-up, one linear decay, no restart at the
    three phase switches (before the fix each 5-step phase warmed up from 0 again)."""
    trainer = resume_trainer(tmp_path / "run", token_dataset, SPAN, max_steps=20, save_steps=100)
    rates = LearningRates()
    trainer.add_callback(rates)
    trainer.train()
    assert rates.lrs == pytest.approx([1e-3 * f for f in SPAN_GOLDEN], abs=1e-15)


def test_plan_says_the_entry_shape_runs_once(tmp_path, tiny_llama_dir, pydoc_files):
    recipe = tiny_recipe(tmp_path, tiny_llama_dir, pydoc_files[0], schedule=SPAN, max_steps=20)
    plan = make_plan(load_recipe(write_recipe(tmp_path, recipe)))
    assert all("× b's linear, warmup 0.2 once over all its phases" in p.lr_text for p in plan.phases)


def test_the_model_card_says_the_entry_shape_runs_once():
    from hf_stackwise.report.card import phase_table

    run = {"schedule": Schedule.from_list(SPAN).to_list(), "rack": {"boundaries": [0, 1, 2]}, "defaults": {}}
    rows = [line for line in phase_table(run, 20).splitlines() if line.startswith("| b-")]
    assert len(rows) == 4 and all("× b's linear, warm-up 0.2 over all its phases" in row for row in rows)
