"""Adaptive freezing (`autofreeze:` on a phase): the criterion on synthetic gradient-norm series, bad input refused
naming `schedule[i].autofreeze.<key>` before any weight loads, and tiny real runs — a frozen stack stays
bit-identical from its freeze step, `release_idle` frees its optimizer state, resume before and after the first
decision is bitwise the uninterrupted run, and the activation cache at the deeper cut changes no bit."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import tiny_causal_lm, tiny_recipe, write_recipe
from safetensors.torch import load_file
from test_bad_input import no_weights, refused  # noqa: F401  (a fixture)

from hf_stackwise.errors import RecipeError
from hf_stackwise.schedule.autofreeze import AutoFreeze, FreezeTracker, decide, parse_autofreeze, percentile
from hf_stackwise.schedule.phases import Schedule
from hf_stackwise.trainer import StackwiseArguments, StackwiseTrainer

# ---- the criterion, on synthetic series ---------------------------------------------------------------------


def series_tracker(settings: AutoFreeze, norms: dict[int, list[float]], steps: int, keep_top: int = 3):
    """Feed per-step gradient norms (already squared inside) to a tracker over a phase of ``steps`` steps, deciding
    before each step as the trainer does; returns the tracker."""
    tracker = FreezeTracker(0, 0, steps)
    trainable = tuple(sorted(norms))
    for step in range(steps):
        tracker.step(settings, step, settings.freezable(trainable, keep_top + 1))
        frozen = set(tracker.frozen_positions(step))
        tracker.observe({p: norms[p][step] ** 2 for p in trainable if p not in frozen})
    return tracker


def test_percentile_interpolates_like_numpy():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([4.0, 1.0, 3.0], 50) == 3.0
    assert math.isclose(percentile([0.0, 10.0], 25), 2.5)


def test_a_converged_bottom_stack_freezes_at_the_expected_step():
    settings = AutoFreeze(every=4, warmup=8, percentile=50)
    steps = 40
    # every stack's norm grows by 50% per interval (change 0.5, not below the median 0.5: nothing freezes) until
    # stack 0's stops at step 12: its change at the decision of step 16 is 0 < 0.5, so it freezes then, alone
    grow = [1.5 ** (s // 4) for s in range(steps)]
    norms = {0: [1.5 ** min(s // 4, 2) for s in range(steps)], 1: grow, 2: grow, 3: grow}
    tracker = series_tracker(settings, norms, steps)
    assert [(d.step, d.positions) for d in tracker.decisions] == [(16, (0,))]
    assert tracker.decisions[0].changes == (0.0,)


def test_only_a_bottom_up_prefix_freezes_and_never_keep():
    settings = AutoFreeze(every=2, warmup=0, percentile=60)

    def series(rate):  # the interval norm changes by `rate` at every decision
        return [(1 + rate) ** (s // 2) for s in range(20)]

    # stacks 1 and 3 (the top) converge, stack 0 never does: nothing may freeze above a still-training stack 0
    assert (
        series_tracker(settings, {0: series(0.5), 1: series(0.01), 2: series(0.5), 3: series(0.01)}, 20).decisions
        == []
    )
    # changes 0.01, 0.02, 0.03, 1.0: the 60th percentile is 0.028, so stacks 0-1 freeze at the first decision; then
    # stack 2 (0.03) is below the 60th percentile of (0.03, 1.0) at the next; the top (keep) never freezes
    norms = {0: series(0.01), 1: series(0.02), 2: series(0.03), 3: series(1.0)}
    tracker = series_tracker(settings, norms, 20)
    assert [(d.step, d.positions) for d in tracker.decisions] == [(4, (0, 1)), (6, (2,))]
    # keep [1]: only stack 0 may ever freeze
    kept = AutoFreeze(every=2, warmup=0, percentile=60, keep=(1,))
    assert [d.positions for d in series_tracker(kept, norms, 20).decisions] == [(0,)]


def test_decide_applies_the_absolute_threshold_and_names_the_statistic():
    settings = AutoFreeze(percentile=50, threshold=0.01)
    changes = {0: 0.02, 1: 0.5, 2: 0.6}
    assert decide(settings, changes, (0, 1), 0, 10) is None  # 0.02 < median 0.5 but not < 0.01
    decision = decide(AutoFreeze(percentile=50), changes, (0, 1), 0, 10)
    assert decision.positions == (0,) and decision.threshold == 0.5
    assert decision.describe() == "stack 0 froze at step 10: grad-norm change 0.02 < 0.5"


def test_tracker_round_trips_through_json_mid_interval():
    import json

    settings = AutoFreeze(every=3, warmup=0)
    tracker = FreezeTracker(1, 10, 40)
    for step in range(10, 17):
        tracker.step(settings, step, (0, 1))
        tracker.observe({0: 0.25 + step, 1: 1.0 / step})
    again = FreezeTracker.from_dict(json.loads(json.dumps(tracker.to_dict())))
    assert again == tracker


# ---- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "phase, expected",
    [
        ({"train": ["top"], "autofreeze": {}}, "schedule[0].autofreeze.keep: the phase trains stacks [3]"),
        ({"train": "none", "head": "train", "autofreeze": {}}, "schedule[0].autofreeze: the phase trains no stack"),
        ({"autofreeze": {"criterion": "egeria"}}, "schedule[0].autofreeze.criterion: 'egeria' is not one of"),
        ({"autofreeze": {"every": 0}}, "schedule[0].autofreeze.every: 0 is not a positive number of steps"),
        ({"autofreeze": {"every": -0.5}}, "schedule[0].autofreeze.every: -0.5"),
        ({"autofreeze": {"percentile": 100}}, "schedule[0].autofreeze.percentile: 100 is not in (0, 100)"),
        ({"autofreeze": {"threshold": 1.5}}, "schedule[0].autofreeze.threshold: 1.5 is not in (0, 1]"),
        ({"autofreeze": {"keep": [7]}}, "schedule[0].autofreeze.keep: stack [7] is not active"),
        ({"autofreeze": {"every": 2, "when": 1}}, "schedule[0].autofreeze.when: unknown autofreeze setting"),
        ({"adapter": "lora", "autofreeze": {}}, "schedule[0].autofreeze: the phase trains through LoRA"),
        ({"train": [0, 3], "trunk": "lora", "autofreeze": {}}, "(`trunk: lora`)"),
    ],
)
def test_bad_autofreeze_is_refused_naming_the_key(phase, expected):
    with pytest.raises(RecipeError) as info:
        Schedule.from_list([{"until": 1.0, **phase}]).validate_rack(4)
    assert expected in str(info.value)


def test_a_phase_too_short_for_any_decision_is_refused_at_its_run_length():
    schedule = Schedule.from_list([{"until": 1.0, "autofreeze": {"every": 2, "warmup": 2}}])
    assert schedule.phases[0].autofreeze.first_decision(20) == 4  # two intervals of 2 steps, warm-up 2 behind it
    with pytest.raises(RecipeError, match=r"schedule\[0\]\.autofreeze\.every: phase 'phase0' has 4 steps"):
        schedule.resolve(4)
    schedule.resolve(5)


@pytest.mark.usefixtures("no_weights")
def test_the_cli_refuses_bad_autofreeze_before_any_weight_loads(tmp_path, tiny_llama_dir, pydoc_files, capsys):
    schedule = [{"name": "af", "until": 1.0, "train": ["top"], "autofreeze": {"every": 2}}]
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path, tiny_llama_dir, pydoc_files[0], schedule))
    refused(["train", recipe], capsys, tmp_path / "run", "schedule[0].autofreeze.keep")


def test_autofreeze_true_takes_the_defaults():
    assert parse_autofreeze(True, "x", []) == AutoFreeze()
    assert parse_autofreeze({"keep": "top"}, "x", []).keep == ("top",)


# ---- tiny real runs ----------------------------------------------------------------------------------------

SCHEDULE = [
    {
        "name": "auto",
        "until": 1.0,
        "train": "all",
        "optimizer_state": "release_idle",
        "autofreeze": {"every": 2, "warmup": 2},
    }
]
STEPS = 20


def make_trainer(output_dir, dataset, cache=False, **overrides):
    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=3e-4,
        weight_decay=0.01,
        logging_steps=1,
        save_steps=2,  # decisions come at even steps: a checkpoint holds the weights of every freeze step
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        schedule=SCHEDULE,
        blocks_per_stack=1,
        activation_cache={"activations": "auto" if cache else False},
    )
    kwargs.update(overrides)
    model = tiny_causal_lm("llama", layers=4)  # no dropout: the cache can serve the frozen prefix
    return StackwiseTrainer(model=model, args=StackwiseArguments(**kwargs), train_dataset=dataset)


def weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.fixture(scope="module")
def rows(token_dataset):
    return token_dataset.select(range(16))  # 4 steps an epoch: every row is seen 5 times


@pytest.fixture(scope="module")
def uncached(tmp_path_factory, rows):
    out = tmp_path_factory.mktemp("autofreeze")
    trainer = make_trainer(out, rows)
    trainer.train()
    return out, weights(trainer), trainer


def test_stacks_freeze_bottom_up_and_stay_bit_identical(uncached):
    out, final, trainer = uncached
    decisions = trainer.freeze_decisions()
    assert decisions, "no stack froze"
    frozen = [s for d in decisions for s in d["stacks"]]
    assert frozen == list(range(len(frozen))) and 3 not in frozen  # a bottom-up prefix, never the top (keep)
    assert all(d["step"] % 2 == 0 and d["step"] >= 4 for d in decisions)  # `every: 2`, two intervals first
    assert 4 < decisions[0]["step"] <= 12  # the resume tests start before and after the first decision
    initial = tiny_causal_lm("llama", layers=4).state_dict()
    for decision in decisions:
        at_freeze = load_file(str(out / f"checkpoint-{decision['step']}" / "model.safetensors"))
        for stack in decision["stacks"]:
            prefix = f"model.layers.{stack}."
            names = [n for n in final if n.startswith(prefix)]
            assert names
            for name in names:
                assert torch.equal(final[name], at_freeze[name]), name  # nothing moved from the freeze step on
            assert any(not torch.equal(initial[n], final[n]) for n in names)  # it trained before
    embed = "model.embed_tokens.weight"  # froze with the bottom stack
    first = load_file(str(out / f"checkpoint-{decisions[0]['step']}" / "model.safetensors"))
    assert torch.equal(final[embed], first[embed])
    assert not torch.equal(final["model.layers.3.mlp.up_proj.weight"], first["model.layers.3.mlp.up_proj.weight"])


def test_release_idle_frees_the_frozen_stacks_optimizer_state(uncached):
    _, _, trainer = uncached
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    stateful = {names[id(p)] for p in trainer.optimizer.state}
    frozen = ("model.embed_tokens.", "model.layers.0.", "model.layers.1.", "model.layers.2.")
    assert stateful and not [n for n in stateful if n.startswith(frozen)]
    assert any(n.startswith("model.layers.3.") for n in stateful)


def test_decisions_are_recorded_in_every_checkpoint_and_logged(uncached):
    from hf_stackwise.persist.checkpoint import MANIFEST_NAME, read_json

    out, _, trainer = uncached
    first = trainer.freeze_decisions()[0]["step"]
    before = read_json(str(out / "checkpoint-4" / MANIFEST_NAME))
    after = read_json(str(out / "checkpoint-12" / MANIFEST_NAME))
    assert before["freeze_decisions"] == []
    assert after["freeze_decisions"] == [d for d in trainer.freeze_decisions() if d["step"] <= 12]
    assert after["autofreeze"][0]["previous"] is not None  # the criterion's running statistics resume too
    frozen = {h["step"]: h["autofreeze/frozen_stacks"] for h in trainer.state.log_history if "loss" in h}
    count = len(trainer.freeze_decisions()[0]["stacks"])
    assert (frozen[first], frozen[first + 1]) == (0, count)  # the log of step `first` is written before it runs
    logs = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    assert logs[first + 1]["learning_rate/stack_0"] == 0.0 and logs[first]["learning_rate/stack_0"] > 0


@pytest.mark.parametrize("step", [4, 12], ids=["before-first-decision", "after-first-decision"])
def test_resume_is_bitwise_equal_to_uninterrupted(tmp_path, rows, uncached, step):
    out, final, trainer = uncached
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(out / f"checkpoint-{step}", resumed_dir / f"checkpoint-{step}")
    resumed = make_trainer(resumed_dir, rows)
    resumed.train(resume_from_checkpoint=str(resumed_dir / f"checkpoint-{step}"))
    assert resumed.freeze_decisions() == trainer.freeze_decisions()
    now = weights(resumed)
    for name, value in final.items():
        assert torch.equal(now[name], value), name


def test_cache_on_at_the_deeper_cut_is_bitwise_equal(tmp_path, rows, uncached):
    _, final, trainer = uncached
    cached = make_trainer(tmp_path / "cached", rows, cache=True, save_strategy="no")
    cached.train()
    assert cached.freeze_decisions() == trainer.freeze_decisions()
    stats = cached.cache_stats()
    assert stats["hits"] > 0, stats  # rows replayed at the cut after stacks 0-1 (and later 0-2) froze
    now = weights(cached)
    for name, value in final.items():
        assert torch.equal(now[name], value), name


def test_a_cut_that_deepens_reuses_the_shallower_store_and_changes_no_bit(tmp_path, rows):
    """Stack 0 frozen from the start (a static cut the cache fills), stacks 1-2 freeze adaptively: after a freeze,
    rows stored at the shallower cut start there; weights equal the uncached run's."""
    schedule = [{**SCHEDULE[0], "train": [1, 2, 3], "head": "train"}]
    runs = []
    for cache in (False, True):
        trainer = make_trainer(tmp_path / str(cache), rows, cache=cache, schedule=schedule, save_strategy="no")
        trainer.train()
        runs.append(trainer)
    off, on = runs
    assert off.freeze_decisions() and on.freeze_decisions() == off.freeze_decisions()
    assert on.cache_stats()["hits"] > 0 and on._shallow_rows[0] > 0
    now = weights(on)
    for name, value in weights(off).items():
        assert torch.equal(now[name], value), name


def test_plot_draws_and_the_card_lists_the_freezes(tmp_path, uncached):
    from hf_stackwise.persist.checkpoint import MANIFEST_NAME, read_json
    from hf_stackwise.report.card import build_card
    from hf_stackwise.report.plots import freeze_points, plot_run, plot_timeline

    out, _, trainer = uncached
    decisions = trainer.freeze_decisions()
    assert freeze_points(str(out)) == decisions  # from the last checkpoint's stackwise_state.json
    written = plot_run(str(out), str(tmp_path / "plots"))
    without = plot_timeline(trainer.schedule, trainer.base_sizes, str(tmp_path / "plain.png"), 3e-4, STEPS)
    with open(written[0], "rb") as a, open(without, "rb") as b:
        assert a.read() != b.read()  # the freeze lines and greyed stacks are drawn
    manifest = read_json(str(out / f"checkpoint-{STEPS}" / MANIFEST_NAME))
    (tmp_path / "export").mkdir()
    card = build_card(str(out / f"checkpoint-{STEPS}"), str(tmp_path / "export"), manifest)
    assert "## Adaptive freezing" in card
    for d in decisions:
        stacks = ", ".join(map(str, d["stacks"]))
        assert f"| auto | {d['step']} | {stacks} | " in card


# ---- plan ---------------------------------------------------------------------------------------------------


def test_plan_shows_memory_with_no_freeze_and_at_the_deepest_freeze(tmp_path, pydoc_files, capsys):
    """An autofreeze phase costs, before any freeze, what the same phase without autofreeze costs, and at its deepest
    freeze what a hand-written phase training only the kept stacks costs (the formula test_plan checks against real
    runs)."""
    from conftest import build_tokenizer
    from test_plan import write

    from hf_stackwise.cli.commands import main
    from hf_stackwise.cli.plan import make_plan
    from hf_stackwise.recipe.loader import load_recipe

    folder = tmp_path / "model"
    tiny_causal_lm("llama", layers=8).save_pretrained(folder)  # 4 stacks of 2 blocks in the plan tests' recipe
    build_tokenizer().save_pretrained(folder)
    for name in ("auto", "plain", "top", "again"):
        (tmp_path / name).mkdir()
    auto = {"name": "auto", "until": 1.0, "train": "all", "optimizer_state": "release_idle", "autofreeze": {}}
    plain = {"name": "plain", "until": 1.0, "train": "all", "optimizer_state": "release_idle"}
    top = {"name": "top", "until": 1.0, "train": [3], "head": "train", "optimizer_state": "release_idle"}
    plans = [
        make_plan(load_recipe(write(tmp_path / name, str(folder), pydoc_files[0], [phase])))
        for name, phase in (("auto", auto), ("plain", plain), ("top", top))
    ]
    adaptive = plans[0].phases[0]
    assert adaptive.memory == plans[1].phases[0].memory
    assert adaptive.frozen_memory == plans[2].phases[0].memory
    assert adaptive.frozen_memory["total"] < adaptive.memory["total"]
    assert main(["plan", write(tmp_path / "again", str(folder), pydoc_files[0], [auto])]) == 0
    out = capsys.readouterr().out
    assert "stacks full (adaptive)" in out and "(auto at its deepest autofreeze)" in out


# ---- 2-rank DDP (torchrun, gloo): one launch ---------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_take_the_same_decisions_and_match_one_process(tmp_path):
    import json

    from test_ddp import run_worker_pair

    two, one = run_worker_pair(tmp_path, "autofreeze")
    rank0, rank1, single = (torch.load(p) for p in (two / "rank0.pt", two / "rank1.pt", one / "rank0.pt"))
    runs = [json.loads(p.read_text()) for p in (two / "trace0.json", two / "trace1.json", one / "trace0.json")]
    assert [r["world_size"] for r in runs] == [2, 2, 1]
    decisions = [r["freeze_decisions"] for r in runs]
    assert decisions[0], "no stack froze"
    assert decisions[0] == decisions[1]  # statistics all-reduced: bitwise the same on both ranks
    assert [(d["step"], d["stacks"]) for d in decisions[0]] == [(d["step"], d["stacks"]) for d in decisions[2]]
    for ddp, alone in zip(decisions[0], decisions[2], strict=True):
        torch.testing.assert_close(ddp["changes"], alone["changes"], rtol=1e-4, atol=0)
    assert runs[0]["trace"] == runs[1]["trace"] == runs[2]["trace"]  # the parameters' own requires_grad flags
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], single[name], rtol=0, atol=1e-5)


def test_the_deeper_cut_counts_only_visits_whose_inputs_repeat():
    """After a freeze, ``auto`` replays the deeper prefix only where at least half the later visits can hit: each row
    twice and, with rows padded per batch, its padded inputs repeating (the static decision's rule)."""
    from hf_stackwise.cache.adaptive import deeper_cut
    from hf_stackwise.cache.policy import CacheData, CacheModel, CacheSettings
    from hf_stackwise.cache.policy import decide as cache_decide
    from hf_stackwise.freezing import frozen_state

    schedule = Schedule.from_list([{"name": "auto", "until": 1.0, "train": "all", "autofreeze": True}])
    base, resolved = (1, 1, 1, 1), schedule.resolve(24)
    layout, model, settings = schedule.layout(base), CacheModel((100,) * 4, 50, 64, 4), CacheSettings()
    state = frozen_state(resolved.state_at(12, base), (0, 1))  # stacks 0-1 froze at step 12: 12 steps left

    def after_freeze(repeat, note=""):
        data = CacheData(16, 4, (32,), 32, ("clm",), repeat, note)  # 16 rows, 4 a step: 3 visits each after it
        static = cache_decide(schedule, resolved.bounds, layout, base, settings, model, data)[0]
        return deeper_cut(static, state, layout, settings, model, data, (12, 24))

    fixed = after_freeze(1.0)
    assert fixed.on and fixed.cut == 2 and fixed.hit_rate == pytest.approx(2 / 3)
    padded = after_freeze(0.5, "rows of 9 lengths are padded to the longest of their micro-batch")
    assert not padded.on  # misses: the first visit, and half of the two later ones -> a third of the visits hit
    assert "padded to the longest" in padded.reason and "expected hit rate 33% (auto needs 50%)" in padded.reason
