"""The phase schedule (standard library only): parsing and defaults, every validation error with its key path,
rack validation, step resolution, fingerprints and the trace (learning rates: test_schedule_rates.py)."""

from __future__ import annotations

import json
import math

import pytest

from hf_stackwise.schedule.phases import PHASE_KEYS, Phase, PhaseState, RecipeError, Schedule

# The schedule of tests/test_trainer.py and its golden trace (8 steps, 4 stacks of one block each).
SCHEDULE = [
    {"name": "top", "until": 0.25, "train": ["top"]},
    {"name": "shallow", "until": 0.5, "stacks": 2, "train": [0, 1], "head": "train"},
    {"name": "all", "until": 1.0, "train": "all"},
]
GOLDEN = [(0, "top", (3,)), (2, "shallow", (0, 1)), (4, "all", (0, 1, 2, 3))]


def parse(*phases) -> Schedule:
    return Schedule.from_list(list(phases))


def problems_of(raw) -> list[str]:
    with pytest.raises(RecipeError) as info:
        Schedule.from_list(raw)
    return info.value.problems


def one_phase(**fields) -> list[dict]:
    return [{"until": 1.0, **fields}]


# ---- parsing and defaults -------------------------------------------------------------------------


def test_defaults_are_filled_in():
    schedule = parse({"until": 0.5}, {"until": 1.0})
    assert [p.name for p in schedule.phases] == ["phase0", "phase1"]
    for phase, until in zip(schedule.phases, (0.5, 1.0)):
        assert phase.until == until
        assert phase.stacks is None
        assert phase.train == "all"
        assert phase.embeddings is None and phase.head is None
        assert phase.learning_rate is None
        assert phase.warmup == 0.0
        assert phase.lr_schedule == "constant"
        assert phase.weight_decay is None
        assert phase.layer_lr_decay == 1.0
    assert schedule.phases[1] == Phase(name="phase1", until=1.0)


def test_numbers_are_normalized_to_float():
    phase = parse({"until": 1, "learning_rate": 1, "weight_decay": 0, "warmup": 0, "layer_lr_decay": 2}).phases[0]
    for value in (phase.until, phase.learning_rate, phase.weight_decay, phase.warmup, phase.layer_lr_decay):
        assert type(value) is float
    assert (phase.until, phase.learning_rate, phase.weight_decay, phase.layer_lr_decay) == (1.0, 1.0, 0.0, 2.0)


@pytest.mark.parametrize(
    "train, parsed",
    [
        ("all", "all"),
        ("top", "top"),
        ("none", "none"),
        (["top"], ("top",)),
        (2, (2,)),  # an int is a one-element list
        (0, (0,)),
        ([2, "top"], (2, "top")),
        ([], ()),
    ],
)
def test_train_values_are_parsed(train, parsed):
    assert parse({"until": 1.0, "train": train}).phases[0].train == parsed


@pytest.mark.parametrize(
    "train, stacks, expected",
    [
        ("all", None, (0, 1, 2, 3)),
        ("all", 2, (0, 1)),
        ("top", None, (3,)),
        ("top", 2, (1,)),
        (["top"], 2, (1,)),
        (["top"], None, (3,)),
        ("none", None, ()),
        ("none", 3, ()),
        (2, None, (2,)),
        ([3, 1, 1], None, (1, 3)),
        ([2, "top"], None, (2, 3)),
        ([1, "top"], 2, (1,)),  # `top` of a 2-stack phase is stack 1: listed once
        ([0, "top"], 3, (0, 2)),
    ],
)
def test_trainable_stacks(train, stacks, expected):
    phase = parse({"until": 1.0, "train": train, "stacks": stacks}).phases[0]
    assert phase.active_depth(4) == (4 if stacks is None else stacks)
    assert phase.trainable_stacks(4) == expected


@pytest.mark.parametrize(
    "fields, embeddings, head",
    [
        ({"train": "all"}, True, True),
        ({"train": "top"}, False, False),
        ({"train": "none"}, False, False),
        ({"train": [0, 1, 2, 3]}, False, False),  # every stack listed is still not `all`
        ({"train": "all", "embeddings": "freeze"}, False, True),
        ({"train": "all", "head": "freeze"}, True, False),
        ({"train": "top", "head": "train"}, False, True),
        ({"train": "none", "embeddings": "train"}, True, False),
        ({"train": [1], "embeddings": "train", "head": "train"}, True, True),
    ],
)
def test_embeddings_and_head_defaults_and_explicit_values(fields, embeddings, head):
    phase = parse({"until": 1.0, **fields}).phases[0]
    assert phase.trains_embeddings() is embeddings
    assert phase.trains_head() is head


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({}, {"embeddings", "stack_0", "stack_1", "stack_2", "stack_3", "head"}),
        ({"stacks": 2}, {"embeddings", "stack_0", "stack_1", "head"}),
        ({"train": "top"}, {"stack_3"}),
        ({"stacks": 3, "train": [0, "top"], "head": "train"}, {"stack_0", "stack_2", "head"}),
        ({"train": "none", "embeddings": "train"}, {"embeddings"}),
        ({"train": "all", "embeddings": "freeze", "head": "freeze"}, {"stack_0", "stack_1", "stack_2", "stack_3"}),
    ],
)
def test_trainable_units(fields, expected):
    units = parse({"until": 1.0, **fields}).phases[0].trainable_units(4)
    assert isinstance(units, frozenset)
    assert units == expected


# ---- validation: every error names its key path ---------------------------------------------------


@pytest.mark.parametrize("raw", [None, {"until": 1.0}, "phases", (), [], 3])
def test_schedule_must_be_a_non_empty_list(raw):
    problems = problems_of(raw)
    assert len(problems) == 1
    assert problems[0].startswith("schedule: expected a non-empty list of phases")


# (raw schedule, exact start of the only problem, a further fragment of it)
INVALID = [
    # phase not a mapping
    ([1.0], "schedule[0]: expected a mapping of phase fields", "got float"),
    ([{"until": 0.5}, "all"], "schedule[1]: expected a mapping of phase fields", "got str"),
    ([{"until": 0.5}, [1.0]], "schedule[1]: expected a mapping of phase fields", "got list"),
    # name
    (one_phase(name=""), "schedule[0].name: '' is not a non-empty string", ""),
    (one_phase(name=3), "schedule[0].name: 3 is not a non-empty string", ""),
    # until
    ([{"train": "all"}], "schedule[0].until: missing", "(0, 1]"),
    ([{"until": 0.5}, {"name": "b"}], "schedule[1].until: missing", ""),
    ([{"until": "1.0"}], "schedule[0].until: '1.0' is not a number in (0, 1]", ""),
    ([{"until": [1.0]}], "schedule[0].until: [1.0] is not a number", ""),
    ([{"until": True}], "schedule[0].until: True is not a number", ""),  # True == 1 must not pass as 1.0
    ([{"until": 0.3}, {"until": 0.6}, {"until": 1.3}], "schedule[2].until: 1.3 is not in (0, 1]", ""),
    ([{"until": 0}, {"until": 1.0}], "schedule[0].until: 0 is not in (0, 1]", ""),
    ([{"until": -0.5}, {"until": 1.0}], "schedule[0].until: -0.5 is not in (0, 1]", ""),
    ([{"until": math.nan}], "schedule[0].until: nan is not in (0, 1]", ""),
    ([{"until": 0.5}, {"until": 0.5}, {"until": 1.0}], "schedule[1].until: 0.5 does not come after", "(0.5)"),
    ([{"until": 0.6}, {"until": 0.4}, {"until": 1.0}], "schedule[1].until: 0.4 does not come after", "(0.6)"),
    ([{"until": 0.5}, {"until": 0.9}], "schedule[1].until: 0.9 but the last phase must end at 1.0", ""),
    ([{"until": 0.5}], "schedule[0].until: 0.5 but the last phase must end at 1.0", ""),
    # stacks
    (one_phase(stacks=0), "schedule[0].stacks: 0 is not a positive integer", ""),
    (one_phase(stacks=-1), "schedule[0].stacks: -1 is not a positive integer", ""),
    (one_phase(stacks=1.5), "schedule[0].stacks: 1.5 is not a positive integer", ""),
    (one_phase(stacks=2.0), "schedule[0].stacks: 2.0 is not a positive integer", ""),
    (one_phase(stacks=True), "schedule[0].stacks: True is not a positive integer", ""),
    (one_phase(stacks="2"), "schedule[0].stacks: '2' is not a positive integer", ""),
    # train
    (one_phase(train="bottom"), "schedule[0].train: 'bottom' is not a list of stack indices or one of", "'top'"),
    (one_phase(train="ALL"), "schedule[0].train: 'ALL' is not a list of stack indices", ""),
    (one_phase(train=-1), "schedule[0].train: [-1] are not stack indices", "non-negative"),
    (one_phase(train=[0, -2]), "schedule[0].train: [-2] are not stack indices", ""),
    (one_phase(train=[0, "x", 1.5]), "schedule[0].train: ['x', 1.5] are not stack indices", ""),
    (one_phase(train=["all"]), "schedule[0].train: ['all'] are not stack indices", "('top', 'new')"),
    (one_phase(train=[True]), "schedule[0].train: [True] are not stack indices", ""),
    (one_phase(train=[None]), "schedule[0].train: [None] are not stack indices", ""),
    (one_phase(train=1.5), "schedule[0].train: 1.5 is not a list of stack indices", ""),
    (one_phase(train=True), "schedule[0].train: True is not a list of stack indices", ""),
    (one_phase(train={"top": 1}), "schedule[0].train: {'top': 1} is not a list of stack indices", ""),
    # embeddings / head
    (one_phase(embeddings="yes"), "schedule[0].embeddings: 'yes' is not one of ('train', 'freeze')", ""),
    (
        one_phase(embeddings=True),  # `embeddings: yes` in YAML 1.1
        "schedule[0].embeddings: True: YAML reads yes/no/on/off/true/false as a boolean; write `embeddings: train` "
        "or `embeddings: freeze`",
        "",
    ),
    (one_phase(head="frozen"), "schedule[0].head: 'frozen' is not one of ('train', 'freeze')", ""),
    (one_phase(head=False), "schedule[0].head: False: YAML reads yes/no/on/off/true/false as a boolean; write", ""),
    # learning_rate
    (one_phase(learning_rate=-1e-3), "schedule[0].learning_rate: -0.001 is not a non-negative number", ""),
    (one_phase(learning_rate="1e-3"), "schedule[0].learning_rate: '1e-3' is not a non-negative number", ""),
    (one_phase(learning_rate=True), "schedule[0].learning_rate: True is not a non-negative number", ""),
    # warmup
    (one_phase(warmup=-0.1), "schedule[0].warmup: -0.1 is not a fraction of the phase in [0, 1)", ""),
    (one_phase(warmup=1.0), "schedule[0].warmup: 1.0 is not a fraction of the phase in [0, 1)", ""),
    (one_phase(warmup=1.5), "schedule[0].warmup: 1.5 is not a fraction", ""),
    (one_phase(warmup="0.1"), "schedule[0].warmup: '0.1' is not a fraction", ""),
    (one_phase(warmup=False), "schedule[0].warmup: False is not a fraction", ""),  # False == 0 must not pass
    # lr_schedule
    (one_phase(lr_schedule="exponentially"), "schedule[0].lr_schedule: 'exponentially' is not one of", "cosine"),
    (one_phase(lr_schedule="Cosine"), "schedule[0].lr_schedule: 'Cosine' is not one of", ""),
    # weight_decay
    (one_phase(weight_decay=-0.01), "schedule[0].weight_decay: -0.01 is not a non-negative number", ""),
    (one_phase(weight_decay=False), "schedule[0].weight_decay: False is not a non-negative number", ""),
    (one_phase(weight_decay="0.1"), "schedule[0].weight_decay: '0.1' is not a non-negative number", ""),
    # layer_lr_decay
    (one_phase(layer_lr_decay=0), "schedule[0].layer_lr_decay: 0 is not a positive number", "1.0 = no decay"),
    (one_phase(layer_lr_decay=-0.5), "schedule[0].layer_lr_decay: -0.5 is not a positive number", ""),
    (one_phase(layer_lr_decay=True), "schedule[0].layer_lr_decay: True is not a positive number", ""),
    (one_phase(layer_lr_decay="0.9"), "schedule[0].layer_lr_decay: '0.9' is not a positive number", ""),
    # duplicate names (also against a default name)
    (
        [{"name": "a", "until": 0.5}, {"name": "a", "until": 1.0}],
        "schedule: phase name 'a' is used more than once",
        "",
    ),
    ([{"until": 0.5, "name": "phase1"}, {"until": 1.0}], "schedule: phase name 'phase1' is used more than once", ""),
]


@pytest.mark.parametrize(
    "raw, start, fragment", INVALID, ids=[f"{i}-{case[1][:40]}" for i, case in enumerate(INVALID)]
)
def test_each_validation_error_names_its_key_path(raw, start, fragment):
    with pytest.raises(RecipeError) as info:
        Schedule.from_list(raw)
    problems = info.value.problems
    assert len(problems) == 1, problems
    assert problems[0].startswith(start), problems[0]
    assert fragment in problems[0]
    assert str(info.value) == problems[0]
    assert isinstance(info.value, ValueError)


def test_unknown_phase_field_lists_the_known_fields():
    problems = problems_of([{"until": 1.0, "unti": 0.5}])
    assert len(problems) == 1
    assert problems[0].startswith("schedule[0].unti: unknown phase field; known fields are ")
    fields, generators = problems[0].split("known fields are ", 1)[1].split(", and an entry of its own ")
    assert fields.split(", ") == list(PHASE_KEYS)
    assert generators == "may generate phases with cycle or sample"  # the generator entries are fields too


def test_all_problems_are_reported_together():
    raw = [
        {"until": 0, "stacks": 0, "bogus": 1},
        {"until": "x", "train": "bottom", "head": "maybe"},
        3,
        {"until": 1.0, "warmup": 1.0, "lr_schedule": "steps", "layer_lr_decay": 0},
    ]
    with pytest.raises(RecipeError) as info:
        Schedule.from_list(raw)
    problems = info.value.problems
    paths = [p.split(":", 1)[0] for p in problems]
    assert sorted(paths) == sorted(
        [
            "schedule[0].bogus",
            "schedule[0].until",
            "schedule[0].stacks",
            "schedule[1].until",
            "schedule[1].train",
            "schedule[1].head",
            "schedule[2]",
            "schedule[3].warmup",
            "schedule[3].lr_schedule",
            "schedule[3].layer_lr_decay",
        ]
    )
    message = str(info.value)
    assert message.startswith(f"{len(problems)} problems in the recipe:\n")
    for problem in problems:
        assert f"  - {problem}" in message


def test_recipe_error_from_a_single_string():
    err = RecipeError("rack.layers: nope")
    assert err.problems == ["rack.layers: nope"]
    assert str(err) == "rack.layers: nope"


# ---- validate_rack --------------------------------------------------------------------------------


def rack_problems(raw, num_stacks) -> list[str]:
    schedule = Schedule.from_list(raw)
    with pytest.raises(RecipeError) as info:
        schedule.validate_rack(num_stacks)
    return info.value.problems


@pytest.mark.parametrize(
    "raw, start, fragment",
    [
        (one_phase(stacks=5), "schedule[0].stacks: 5 but the rack has only 4 stacks", "1..4"),
        ([{"until": 0.5}, {"until": 1.0, "stacks": 9}], "schedule[1].stacks: 9 but the rack has only 4", ""),
        (one_phase(train=[4]), "schedule[0].train: stack [4] does not exist; the rack has 4 stacks", "0..3"),
        (one_phase(train=[1, 7]), "schedule[0].train: stack [7] does not exist", ""),
        (one_phase(train=7), "schedule[0].train: stack [7] does not exist", ""),
        (one_phase(stacks=2, train=[2]), "schedule[0].train: stack [2] is not active in this phase", "`stacks: 2`"),
        (one_phase(stacks=1, train=[0, 3]), "schedule[0].train: stack [3] is not active", "stacks 0..0"),
        (one_phase(train="none"), "schedule[0]: phase 'phase0' trains nothing", "`train: none`"),
        (one_phase(train=[]), "schedule[0]: phase 'phase0' trains nothing", ""),
        (one_phase(train="none", head="freeze", embeddings="freeze"), "schedule[0]: phase 'phase0' trains", ""),
    ],
)
def test_validate_rack_errors(raw, start, fragment):
    problems = rack_problems(raw, 4)
    assert len(problems) == 1, problems
    assert problems[0].startswith(start), problems[0]
    assert fragment in problems[0]


def test_validate_rack_reports_every_phase():
    raw = [
        {"name": "a", "until": 0.3, "stacks": 6},
        {"name": "b", "until": 0.6, "stacks": 2, "train": [3]},
        {"name": "c", "until": 1.0, "train": "none"},
    ]
    problems = rack_problems(raw, 4)
    assert [p.split(":", 1)[0] for p in problems] == ["schedule[0].stacks", "schedule[1].train", "schedule[2]"]
    assert "not active" in problems[1]
    assert "'c' trains nothing" in problems[2]


@pytest.mark.parametrize(
    "raw",
    [
        SCHEDULE,
        one_phase(),
        one_phase(stacks=4, train=[3]),
        one_phase(stacks=1, train="top"),
        one_phase(train="none", head="train"),
        one_phase(train="none", embeddings="train"),
        one_phase(stacks=2, train=[0, "top"]),
        [{"until": 0.5, "stacks": 1, "train": [0]}, {"until": 1.0, "stacks": 4, "train": [3]}],
    ],
)
def test_validate_rack_accepts_valid_schedules(raw):
    assert Schedule.from_list(raw).validate_rack(4) is None


def test_validate_rack_depends_on_the_rack_size():
    schedule = parse({"until": 1.0, "stacks": 3, "train": [2]})
    schedule.validate_rack(3)
    schedule.validate_rack(8)
    with pytest.raises(RecipeError, match=r"schedule\[0\]\.stacks: 3 but the rack has only 2 stacks"):
        schedule.validate_rack(2)


# ---- resolve --------------------------------------------------------------------------------------


def untils(*values) -> Schedule:
    return Schedule.from_list([{"until": u} for u in values])


@pytest.mark.parametrize(
    "ends, total, bounds",
    [
        ((0.3, 0.6, 1.0), 10, ((0, 3), (3, 6), (6, 10))),
        ((0.25, 0.5, 1.0), 8, ((0, 2), (2, 4), (4, 8))),
        ((0.1, 1.0), 7, ((0, 1), (1, 7))),
        ((1 / 3, 2 / 3, 1.0), 100, ((0, 33), (33, 67), (67, 100))),
        ((0.999, 1.0), 10_000, ((0, 9990), (9990, 10_000))),
        ((0.7, 1.0), 10, ((0, 7), (7, 10))),  # 0.7 * 10 == 7.000000000000001
        ((1.0,), 1, ((0, 1),)),
        ((1.0,), 37, ((0, 37),)),
    ],
)
def test_resolve_golden_bounds(ends, total, bounds):
    resolved = untils(*ends).resolve(total)
    assert resolved.bounds == bounds
    assert resolved.total_steps == total
    for end, (_, stop) in zip(ends[:-1], bounds):
        assert stop == round(end * total)
    assert resolved.bounds[-1][1] == total


def test_a_phase_without_steps_is_an_error_naming_its_until():
    with pytest.raises(RecipeError) as info:
        parse({"until": 0.3}, {"name": "blink", "until": 0.32}, {"until": 1.0}).resolve(10)
    assert info.value.problems == [
        "schedule[1].until: phase 'blink' gets no optimizer step at 10 total steps (ends at step 3); "
        "raise `training.max_steps` or widen the phase"
    ]
    untils(0.3, 0.32, 1.0).resolve(100)  # enough steps: fine


def test_every_phase_without_steps_is_reported():
    with pytest.raises(RecipeError) as info:
        untils(0.01, 0.02, 1.0).resolve(10)
    assert [p.split(":", 1)[0] for p in info.value.problems] == ["schedule[0].until", "schedule[1].until"]
    assert "phase 'phase0' gets no optimizer step at 10 total steps (ends at step 0)" in info.value.problems[0]


@pytest.mark.parametrize("total", [0, -5])
def test_resolve_needs_a_positive_step_count(total):
    with pytest.raises(RecipeError) as info:
        untils(1.0).resolve(total)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"training.max_steps: the run has {total} optimizer steps")


def test_phase_index_t_and_clamping():
    resolved = untils(0.3, 0.6, 1.0).resolve(10)
    assert [resolved.phase_index(s) for s in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert resolved.phase_index(10) == 2
    assert resolved.phase_index(1000) == 2
    assert resolved.t(0) == 0.0
    assert resolved.t(3) == pytest.approx(0.3)
    assert resolved.t(5) == 0.5
    assert resolved.t(10) == 1.0


def test_state_at():
    resolved = Schedule.from_list(SCHEDULE).resolve(8)
    state = resolved.state_at(3, 4)
    assert state == PhaseState(
        index=1,
        name="shallow",
        active_depth=2,
        trainable_stacks=(0, 1),
        trainable_units=frozenset({"stack_0", "stack_1", "head"}),
        order=(0, 1),
    )
    assert resolved.state_at(0, 4).trainable_units == {"stack_3"}
    assert resolved.state_at(0, 6).trainable_units == {"stack_5"}  # depends on the rack size, not cached across it
    assert resolved.state_at(0, 4).trainable_units == {"stack_3"}
    assert resolved.state_at(7, 4).active_depth == 4
    assert resolved.state_at(99, 4).name == "all"


# ---- fingerprint, to_list, ever_trainable_units, trace --------------------------------------------

BASE = {
    "name": "p",
    "until": 1.0,
    "stacks": 2,
    "train": [1],
    "embeddings": "freeze",
    "head": "train",
    "learning_rate": 1e-3,
    "warmup": 0.1,
    "lr_schedule": "linear",
    "weight_decay": 0.01,
    "layer_lr_decay": 0.9,
}
CHANGED = {
    "name": "q",
    "until": 0.5,  # with a second phase ending at 1.0, below
    "stacks": 3,
    "train": [0],
    "embeddings": "train",
    "head": "freeze",
    "learning_rate": 2e-3,
    "warmup": 0.2,
    "lr_schedule": "cosine",
    "lr_schedule_kwargs": {"num_cycles": 1.5},
    "weight_decay": 0.0,
    "layer_lr_decay": 0.8,
    "adapter": "lora",
    "trunk": "lora",
    "lora": {"r": 4},  # with `adapter: lora`, below
    "grow": {"op": "copy", "stacks": 1},
    "optimizer_state": "reset",
    "task": "mlm",
    "max_seq_length": 64,
    "mask_rate": 0.3,
    "mask_schedule": "cosine",  # with a `mask_rate` ramp, below
    "data": {"general": 1.0},
    "autofreeze": {"every": 5},  # with `adapter: full` and `trunk: frozen`, below
}


def test_fingerprint_equal_for_equal_schedules():
    a = Schedule.from_list([dict(BASE)])
    b = Schedule.from_list([dict(BASE)])
    assert a == b
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 16 and int(a.fingerprint(), 16) >= 0
    # equivalent spellings normalize to the same schedule
    assert parse({"until": 1, "train": 2}).fingerprint() == parse({"until": 1.0, "train": [2]}).fingerprint()
    assert (
        parse({"until": 1.0, "learning_rate": 1}).fingerprint()
        == parse({"until": 1.0, "learning_rate": 1.0}).fingerprint()
    )


def test_fingerprint_changes_with_every_field():
    assert set(CHANGED) == set(PHASE_KEYS)
    base = Schedule.from_list([dict(BASE)])
    seen = {base.fingerprint()}
    for key, value in CHANGED.items():
        raw = [{**BASE, key: value}]
        if key == "until":
            raw.append({"name": "tail", "until": 1.0})
        if key == "lora":
            raw[0]["adapter"] = "lora"
        if key == "autofreeze":
            raw[0].update(adapter="full", trunk="frozen", lora=None)
        if key == "mask_schedule":
            raw[0]["mask_rate"] = [0.15, 0.5]
        if key == "lr_schedule_kwargs":  # differs from the `lr_schedule: cosine` case by the kwargs alone
            raw[0]["lr_schedule"] = "cosine"
        fingerprint = Schedule.from_list(raw).fingerprint()
        assert fingerprint not in seen, key
        seen.add(fingerprint)
    # and the order of phases matters
    ab = untils(0.5, 1.0)
    swapped = parse({"name": "phase1", "until": 0.5}, {"name": "phase0", "until": 1.0})
    assert ab.fingerprint() != swapped.fingerprint()


@pytest.mark.parametrize("raw", [SCHEDULE, [BASE], [{"until": 0.5, "train": [0, "top"]}, {"until": 1.0, "train": 3}]])
def test_to_list_round_trips(raw):
    schedule = Schedule.from_list(raw)
    listed = schedule.to_list()
    # `autofreeze` is listed only by adaptive phases, so the schedules of runs written before it keep their fingerprint
    assert [set(d) for d in listed] == [set(PHASE_KEYS) - {"autofreeze"}] * len(raw)
    assert json.loads(json.dumps(listed)) == listed  # plain JSON data
    again = Schedule.from_list(listed)
    assert again == schedule
    assert again.fingerprint() == schedule.fingerprint()
    assert again.to_list() == listed


def test_to_list_writes_train_as_a_list():
    assert parse({"until": 1.0, "train": [2, "top"]}).to_list()[0]["train"] == [2, "top"]
    assert parse({"until": 1.0, "train": "top"}).to_list()[0]["train"] == "top"


def test_ever_trainable_units_is_the_union_over_phases():
    schedule = parse(
        {"until": 0.3, "stacks": 2, "train": ["top"]},
        {"until": 0.6, "train": [0], "head": "train"},
        {"until": 1.0, "train": "none", "head": "train"},
    )
    assert schedule.ever_trainable_units(4) == {"stack_1", "stack_0", "head"}
    assert Schedule.from_list(SCHEDULE).ever_trainable_units(4) == {
        "embeddings",
        "stack_0",
        "stack_1",
        "stack_2",
        "stack_3",
        "head",
    }
    assert parse({"until": 1.0, "train": "top"}).ever_trainable_units(6) == {"stack_5"}


def test_trace_golden():
    assert Schedule.from_list(SCHEDULE).resolve(8).trace(4) == GOLDEN
    growing = Schedule.from_list(
        [
            {"name": "grow1", "until": 0.2, "stacks": 1, "train": "top"},
            {"name": "grow2", "until": 0.4, "stacks": 2, "train": "top"},
            {"name": "grow3", "until": 0.6, "stacks": 3, "train": ["top"]},
            {"name": "polish", "until": 1.0, "train": "all"},
        ]
    )
    assert growing.resolve(10).trace(3) == [
        (0, "grow1", (0,)),
        (2, "grow2", (1,)),
        (4, "grow3", (2,)),
        (6, "polish", (0, 1, 2)),
    ]
    assert growing.resolve(100).trace(3)[-1] == (60, "polish", (0, 1, 2))


# ---- regressions (bugs found and fixed) ----------------------------------------------------------


def test_an_out_of_range_until_does_not_cascade():
    assert problems_of([{"until": 1.3}, {"until": 1.0}]) == ["schedule[0].until: 1.3 is not in (0, 1]"]


@pytest.mark.parametrize(
    "raw",
    [
        [{"name": ["a"], "until": 0.5}, {"name": ["a"], "until": 1.0}],
        [
            {"name": 1, "until": 0.25},
            {"name": 1, "until": 0.5},
            {"name": "x", "until": 0.75},
            {"name": "x", "until": 1.0},
        ],
    ],
)
def test_odd_phase_names_give_a_recipe_error(raw):
    problems = problems_of(raw)
    assert any(p.startswith("schedule[0].name:") for p in problems)
