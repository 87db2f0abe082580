"""Growth arithmetic (standard library only): which stacks exist in each phase, in what order, copied from
which blocks; `train: new`; and every growth error naming its key."""

from __future__ import annotations

import pytest

from hf_stackwise.schedule.layout import NewStack
from hf_stackwise.schedule.phases import RecipeError, Schedule


def grow_schedule(grow, train="new", **extra):
    return Schedule.from_list(
        [{"name": "base", "until": 0.5}, {"name": "grow", "until": 1.0, "grow": grow, "train": train, **extra}]
    )


@pytest.mark.parametrize(
    "grow, order, new",
    [
        # whole stacks on top: copies of the top N, in order (G_stack's duplication when N = all)
        ({"op": "copy", "stacks": 2}, (0, 1, 2, 3, 4), [NewStack(3, 3, (1,), "copy"), NewStack(4, 4, (2,), "copy")]),
        ({"op": "copy", "stacks": 3}, (0, 1, 2, 3, 4, 5), None),
        # bottom: copies of the bottom stacks, below everything (right-to-left)
        ({"op": "identity", "stacks": 1, "at": "bottom"}, (3, 0, 1, 2), [NewStack(3, 0, (0,), "identity")]),
        # interleave: one new stack after every k-th, copying the one below it (LLaMA Pro)
        ({"op": "identity", "stacks": 3, "at": "interleave"}, (0, 3, 1, 4, 2, 5), None),
        # explicit positions of the current rack; position 0 copies the stack above it
        (
            {"op": "random", "at": [0, 2]},
            (3, 0, 1, 4, 2),
            [NewStack(3, 0, (0,), "random"), NewStack(4, 3, (1,), "random")],
        ),
        # blocks: one new stack holding copies of the top (or bottom) N blocks
        ({"op": "copy", "blocks": 2}, (0, 1, 2, 3), [NewStack(3, 3, (1, 2), "copy")]),
    ],
)
def test_growth_orders(grow, order, new):
    layout = grow_schedule(grow).layout(3)
    assert layout.orders == ((0, 1, 2), order)
    assert layout.grown[0] == ()
    if new is not None:
        assert list(layout.grown[1]) == new
    assert layout.num_base == 3 and len(layout.sizes) == len(order)


def test_stack_sizes_follow_the_sources():
    # base stacks of 2 blocks: a grown stack copies whole stacks; blocks are appended after the last one
    layout = grow_schedule({"op": "copy", "stacks": 1, "at": "bottom"}).layout((2, 2))
    assert layout.sizes == (2, 2, 2) and layout.boundaries == (0, 2, 4, 6)
    assert layout.grown[1][0].sources == (0, 1)
    assert layout.blocks(layout.orders[1]) == [4, 5, 0, 1, 2, 3]


def test_progressive_stacking_doubles_twice():
    schedule = Schedule.from_list(
        [
            {"name": "small", "until": 0.25},
            {"name": "x2", "until": 0.5, "grow": {"op": "copy", "stacks": 2}, "train": "all", "warmup": 0.1},
            {"name": "x4", "until": 1.0, "grow": {"op": "copy", "stacks": 4}, "train": "all", "warmup": 0.1},
        ]
    )
    layout = schedule.layout(2)
    assert layout.orders == ((0, 1), (0, 1, 2, 3), (0, 1, 2, 3, 4, 5, 6, 7))
    # the second growth copies the grown rack, including stacks grown before
    assert [n.sources for n in layout.grown[2]] == [(0,), (1,), (2,), (3,)]
    resolved = schedule.resolve(8)
    assert resolved.trace(2) == [(0, "small", (0, 1)), (2, "x2", (0, 1, 2, 3)), (4, "x4", tuple(range(8)))]


def test_train_new_and_units_use_physical_ids():
    schedule = grow_schedule({"op": "copy", "stacks": 1, "at": "bottom"}, train=["new", "top"], layer_lr_decay=0.5)
    resolved = schedule.resolve(4)
    state = resolved.state_at(2, 3)
    assert state.trainable_stacks == (0, 3)  # positions: the new bottom stack and the top
    assert state.trainable_units == {"stack_3", "stack_2"}  # physical ids: the new stack is stack_3
    assert state.order == (3, 0, 1, 2)
    # layer_lr_decay follows positions, not ids: the new stack sits 3 levels below the top
    assert resolved.unit_lr(2, "stack_3", 1.0, 3) == pytest.approx(0.5**3)
    assert resolved.unit_lr(2, "stack_2", 1.0, 3) == pytest.approx(1.0)
    assert schedule.ever_trainable_units(3) == {"embeddings", "stack_0", "stack_1", "stack_2", "stack_3", "head"}


def test_growth_round_trips_through_the_manifest_form():
    schedule = grow_schedule({"op": "identity", "at": [1, 3]}, optimizer_state="reset")
    again = Schedule.from_list(schedule.to_list())
    assert again == schedule and again.fingerprint() == schedule.fingerprint()
    assert again.phases[1].grow.at == (1, 3) and again.phases[1].optimizer_state == "reset"


@pytest.mark.parametrize(
    "grow, extra, fragment",
    [
        ({"op": "clone", "stacks": 1}, {}, "schedule[1].grow.op: 'clone' is not one of"),
        ({"stacks": 1}, {}, "schedule[1].grow.op: missing"),
        ({"op": "copy"}, {}, "schedule[1].grow: say how much to grow"),
        ({"op": "copy", "stacks": 1, "blocks": 1}, {}, "schedule[1].grow: give `stacks` or `blocks`, not both"),
        ({"op": "copy", "stacks": 0}, {}, "schedule[1].grow.stacks: 0 is not a positive integer"),
        ({"op": "copy", "stacks": 1, "at": "middle"}, {}, "schedule[1].grow.at: 'middle' is not one of"),
        ({"op": "copy", "at": [1, 1]}, {}, "schedule[1].grow.at: [1, 1] repeats a position"),
        ({"op": "copy", "stacks": 1, "size": 2}, {}, "schedule[1].grow.size: unknown growth setting"),
        ({"op": "copy", "stacks": 1}, {"optimizer_state": "drop"}, "schedule[1].optimizer_state: 'drop' is not one"),
    ],
)
def test_growth_parse_errors_name_the_key(grow, extra, fragment):
    with pytest.raises(RecipeError) as info:
        grow_schedule(grow, **extra)
    assert any(p.startswith(fragment) for p in info.value.problems), info.value.problems


@pytest.mark.parametrize(
    "grow, train, base, fragment",
    [
        (
            {"op": "copy", "at": [0, 5]},
            "new",
            3,
            "schedule[1].grow.at: position [5] is outside this phase's rack of 3",
        ),
        ({"op": "copy", "stacks": 4}, "new", 3, "schedule[1].grow.stacks: 4 copies, but the rack has 3 stacks"),
        ({"op": "copy", "blocks": 7}, "new", (2, 2, 2), "schedule[1].grow.blocks: 7 new blocks, but the rack has 6"),
        ({"op": "copy", "stacks": 2, "at": "interleave"}, "new", 3, "schedule[1].grow.stacks: 2 new stacks cannot"),
        ({"op": "copy", "blocks": 6, "at": "interleave"}, "new", (2, 2, 2), "schedule[1].grow.at: interleaving 6"),
        (
            {"op": "copy", "stacks": 1},
            [5],
            3,
            "schedule[1].train: stack [5] does not exist; the rack has 4 stacks (after this phase's growth)",
        ),
    ],
)
def test_growth_against_the_rack_errors_name_the_key(grow, train, base, fragment):
    schedule = grow_schedule(grow, train=train)
    with pytest.raises(RecipeError) as info:
        schedule.validate_rack(base)
    assert any(p.startswith(fragment) for p in info.value.problems), info.value.problems


def test_train_new_without_growth_is_refused():
    schedule = Schedule.from_list([{"until": 0.5}, {"until": 1.0, "train": "new"}])
    with pytest.raises(
        RecipeError,
        match=r"schedule\[1\].train: `new` names the stacks this phase grows, but it "
        r"has no `grow`",
    ):
        schedule.validate_rack(4)


def test_new_stacks_must_be_active():
    schedule = grow_schedule({"op": "copy", "stacks": 1}, stacks=2)
    with pytest.raises(RecipeError, match=r"schedule\[1\].train: the new stacks at positions \[3\] are not active"):
        schedule.validate_rack(3)
