"""The frozen-prefix activation cache: exactness (bitwise on fp32 CPU), hit rates, invalidation and refusals."""

from __future__ import annotations

import os
import re

import pytest
import torch
from conftest import tiny_arguments, tiny_causal_lm
from transformers import TrainerCallback

from hf_stackwise.trainer import StackwiseTrainer

TOP = [{"name": "top", "until": 1.0, "train": "top", "head": "train"}]


def rows(token_dataset, n=16):
    return token_dataset.select(range(n))


def run(tmp_path, dataset, schedule=TOP, cache=None, name="run", callbacks=(), resume=None, dtype=None, **overrides):
    """Train a tiny Llama; returns (trainer, losses)."""
    model = tiny_causal_lm("llama", layers=4)
    if dtype is not None:
        model = model.to(dtype)
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
    from hf_stackwise.cache.policy import CacheData, CacheModel, CacheSettings, decide
    from hf_stackwise.schedule.phases import Schedule

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


def decisions_for(schedule, cache="auto", tasks=None, model=None, rows=16, seqs=None, steps=12):
    from hf_stackwise.cache.policy import CacheData, CacheModel, CacheSettings, decide
    from hf_stackwise.schedule.phases import Schedule

    schedule = Schedule.from_list(schedule)
    n = len(schedule.phases)
    base = (1, 1, 1, 1)
    model = model or CacheModel((100,) * 4, 50, 64, 4)
    data = CacheData(rows, 4, seqs or (32,) * n, max(seqs or (32,)), tasks or ("clm",) * n)
    settings = CacheSettings.from_dict({"activations": cache})
    return decide(schedule, schedule.resolve(steps).bounds, schedule.layout(base), base, settings, model, data)


def test_auto_turns_on_where_exact_and_rows_repeat():
    (on,) = decisions_for(TOP)  # 12 steps x 4 rows over 16 rows: 3 visits
    assert on.on and on.cut == 3 and on.visits == 3 and on.hit_rate == pytest.approx(2 / 3)
    assert on.bytes == 16 * (32 * 64 * 4 + 16)
    # three stacks of 100 below the cut, the top one trains (3 x 100), the head trains (3 x 50)
    assert on.ratio == pytest.approx((300 + 300 + 150) / (300 + 150))
    (once,) = decisions_for(TOP, rows=64)  # each row seen 0.75 times: nothing to gain
    assert not once.on and "expected hit rate 0% (auto needs 50%)" in once.reason
    (forced,) = decisions_for(TOP, cache=True, rows=64)
    assert forced.on
    (everything,) = decisions_for([{"name": "all", "until": 1.0, "train": "all"}], cache=True)
    assert not everything.on and "stack 0 trains" in everything.reason


def test_a_phase_auto_leaves_uncached_fills_nothing_for_the_next():
    unfreeze = [
        {"name": "top", "until": 1 / 3, "train": [3]},
        {"name": "upper", "until": 2 / 3, "train": [2, 3]},
        {"name": "most", "until": 1.0, "train": [1, 2, 3]},
    ]
    top, upper, most = decisions_for(unfreeze, steps=18)  # 6 steps x 4 rows over 16 rows: 1.5 visits per phase
    assert top.visits == upper.visits == most.visits == 1.5
    assert not top.on and top.fills == ()  # auto: 1.5 visits and nothing stored before: a third of the rows hit
    assert not upper.on and upper.hit_rate == pytest.approx(1 / 3)  # `top` ran uncached: it stored nothing
    assert not most.on
    top, upper, most = decisions_for(unfreeze, cache=True, steps=18)
    assert top.on and top.fills == (upper.prefix, most.prefix)  # one forward fills the shallower cuts
    assert upper.hit_rate == most.hit_rate == 1.0


def test_the_formula_of_the_issue_for_k_equal_stacks():
    from hf_stackwise.cache.policy import CacheModel

    # K = 4 stacks of 100, the top one trains, the head (H = 0.5 stack-units) trains: (K + 2 + 3H) / (3 + 3H)
    (d,) = decisions_for(TOP, model=CacheModel((100,) * 4, 50, 64, 4))
    assert d.ratio == pytest.approx((4 + 2 + 1.5) / (3 + 1.5))


@pytest.mark.parametrize(
    ("schedule", "tasks", "model", "message"),
    [
        (TOP, ("mlm",), None, "schedule[0]: data.task mlm draws a new mask every step"),
        (TOP, ("diffusion",), None, "schedule[0]: data.task diffusion draws a new mask"),
        ([{**TOP[0], "embeddings": "train"}], None, None, "schedule[0]: the embeddings train"),
        (TOP, None, "tied", "schedule[0]: the head trains and is tied to the input embeddings"),
        ([{**TOP[0], "head": "freeze"}], None, "gpt2", "schedule[0]: model.config.attn_pdrop=0.1: the prefix is"),
    ],
    ids=["mlm", "diffusion", "embeddings", "tied-head", "dropout"],
)
def test_true_refuses_a_phase_that_cannot_be_exact(schedule, tasks, model, message):
    from conftest import tiny_config

    from hf_stackwise.cache.policy import CacheModel
    from hf_stackwise.errors import StackwiseError

    if model == "tied":
        model = CacheModel((100,) * 4, 50, 64, 4, tied=True)
    elif model == "gpt2":
        model = CacheModel.from_config(tiny_config("gpt2"), (100,) * 4, 50, 4)
    with pytest.raises(StackwiseError, match=re.escape(message)):
        decisions_for(schedule, cache=True, tasks=tasks, model=model)
    (auto,) = decisions_for(schedule, tasks=tasks, model=model)  # auto: simply off, with the reason
    assert not auto.on and message.split(": ", 1)[1] in auto.reason


def test_a_changed_max_seq_length_is_another_store():
    two = [{**TOP[0], "until": 0.5, "name": "long"}, {**TOP[0], "name": "short", "max_seq_length": 16}]
    long, short = decisions_for(two, seqs=(32, 16), steps=24)
    assert long.prefix == short.prefix and long.key() != short.key()
    assert short.slots == 2 * long.slots  # a 32-token row is two 16-token rows
    assert short.visits == pytest.approx(12 * 4 * 2 / 32)  # 12 steps of 4 rows, 2 pieces each, over 32 slots
    assert short.hit_rate == pytest.approx(2 / 3)  # its store starts empty: (E - 1) / E


def test_trunk_lora_with_true_is_refused_before_any_weight_loads(tmp_path, tiny_llama_dir, pydoc_files):
    from conftest import tiny_recipe, write_recipe

    from hf_stackwise.cli.pipeline import check_recipe
    from hf_stackwise.errors import StackwiseError
    from hf_stackwise.recipe.loader import load_recipe

    schedule = [
        {"name": "top", "until": 0.5, "train": "top", "head": "train"},
        {"name": "trunk", "until": 1.0, "train": "top", "trunk": "lora"},
    ]
    raw = tiny_recipe(tmp_path, tiny_llama_dir, pydoc_files[0], schedule)
    raw["cache"] = {"activations": True}
    with pytest.raises(
        StackwiseError, match=r"schedule\[1\]: stack 0 carries trunk LoRA, so the prefix is not frozen"
    ):
        check_recipe(load_recipe(write_recipe(tmp_path, raw)))
    assert not os.path.exists(raw["training"]["output_dir"])


@pytest.mark.parametrize(
    ("cache", "message"),
    [
        ({"max_memory": "lots"}, "cache.max_memory: 'lots' is not a size"),
        ({"activations": "yes"}, "cache.activations: 'yes' is not auto, true or false"),
        ({"size": 1}, "cache.size: unknown key"),
    ],
)
def test_bad_cache_settings_are_one_message(tmp_path, cache, message):
    from hf_stackwise.errors import StackwiseError
    from hf_stackwise.recipe.loader import validate_recipe

    raw = {
        "model": {"name_or_path": "x"},
        "data": {"train": {"path": "text", "data_files": "x.txt"}},
        "schedule": TOP,
        "training": {"output_dir": str(tmp_path)},
        "cache": cache,
    }
    with pytest.raises(StackwiseError, match=message):
        validate_recipe(raw)


def test_storage_beyond_the_budget_needs_a_writable_folder_with_room(tmp_path):
    from hf_stackwise.cache.activations import check_storage
    from hf_stackwise.cache.policy import CacheSettings, PhaseCache, parse_bytes
    from hf_stackwise.errors import StackwiseError

    assert parse_bytes("8GiB") == 8 * 2**30 and parse_bytes("512MB") == 512 * 10**6 and parse_bytes(7) == 7
    small = [PhaseCache(0, True, cut=1, prefix=(0,), bytes=1000, seq_length=32)]
    check_storage(small, CacheSettings(max_memory=1000), "/nonexistent/never/created")  # fits in RAM: no disk
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(StackwiseError, match="cache.dir: .* cannot be written"):
        check_storage(small, CacheSettings(max_memory=10), str(a_file / "cache"))
    huge = [PhaseCache(0, True, cut=1, prefix=(0,), bytes=2**62, seq_length=32)]
    with pytest.raises(StackwiseError, match="cache.dir: .* GiB free but the cache needs"):
        check_storage(huge, CacheSettings(max_memory=0), str(tmp_path / "cache"))


@pytest.mark.slow
def test_resume_with_the_cache_rebuilds_or_reloads_and_stays_bitwise_equal(tmp_path, token_dataset):
    import shutil

    data = rows(token_dataset)
    on_disk = {"max_memory": 0, "dir": str(tmp_path / "stores")}  # beyond the RAM budget: memory-mapped files
    saves = dict(save_strategy="steps", save_steps=6)
    full, _ = run(tmp_path, data, cache=on_disk, name="full", **saves)
    names = [re.sub(r"-[0-9a-f]{12}-", "-ID-", n) for n in sorted(os.listdir(tmp_path / "stores"))]
    assert names == [f"blocks0-2x3-seq32-ID-rank0.{x}" for x in ("data", "fp", "json", "lock", "sum")]
    final = full.model.state_dict()
    for cache, first_hit_rate in ((None, 0.0), (on_disk, 1.0)):  # RAM: rebuilt; disk: reloaded (signature matches)
        name = "reloaded" if cache else "rebuilt"
        shutil.copytree(tmp_path / "full" / "checkpoint-6", tmp_path / name / "checkpoint-6")
        resumed, _ = run(tmp_path, data, cache=cache, name=name, resume=str(tmp_path / name / "checkpoint-6"), **saves)
        assert resumed.state.global_step == 12
        assert all(torch.equal(v, final[k]) for k, v in resumed.model.state_dict().items()), name
        logs = [h for h in resumed.state.log_history if "loss" in h]  # steps 1-6 come from the checkpoint
        assert logs[6]["step"] == 7 and logs[6]["cache/hit_rate"] == first_hit_rate, name
        assert [h["loss"] for h in logs] == [h["loss"] for h in full.state.log_history if "loss" in h]


@pytest.mark.parametrize("mode", ["bf16-weights", "bf16-autocast"])
def test_bf16_with_the_cache_equals_without(tmp_path, token_dataset, mode):
    """Tolerance: none. The stored hidden state keeps the dtype it has at the cut (bfloat16 with bf16 weights,
    float32 on the residual stream under autocast) and a hit returns those exact bits."""
    data = rows(token_dataset)
    extra = {"dtype": torch.bfloat16} if mode == "bf16-weights" else {"bf16": True}
    off = run(tmp_path, data, cache={"activations": False}, name="off", **extra)
    on = run(tmp_path, data, name="on", **extra)
    assert_same_training(off, on)
    (store,) = on[0]._stores.values()
    assert store.dtype == (torch.bfloat16 if mode == "bf16-weights" else torch.float32)
    assert on[0].cache_stats()["hit_rate"] == pytest.approx(2 / 3)


def test_plan_shows_the_cache_per_phase(tmp_path, tiny_llama_dir, pydoc_files):
    from conftest import tiny_recipe, write_recipe

    from hf_stackwise.cli.plan import format_plan, make_plan
    from hf_stackwise.recipe.loader import load_recipe

    schedule = [{**TOP[0], "until": 0.5}, {"name": "all", "until": 1.0, "train": "all"}]
    raw = tiny_recipe(tmp_path, tiny_llama_dir, pydoc_files[0], schedule)
    raw["cache"] = {"activations": True}
    plan = make_plan(load_recipe(write_recipe(tmp_path, raw)))
    top, everything = (p.cache for p in plan.phases)
    assert top.on and top.cut == 3 and top.slots > 0 and top.ratio > 1
    assert top.bytes == top.slots * (32 * 64 * 4 + 16)
    assert not everything.on and "stack 0 trains" in everything.reason
    text = format_plan(plan)
    assert "activation cache per phase" in text
    assert [line.split()[:2] for line in text.splitlines() if line.startswith(("top ", "all "))][-2:] == [
        ["top", "on"],
        ["all", "off"],
    ]
    assert "after block 2 (3 stacks)" in text


@pytest.mark.slow
def test_split_rows_and_mixtures_key_on_the_underlying_row(tmp_path, token_dataset):
    """A shorter phase splits each 32-token row into two 16-token pieces (a slot each); a mixture stream names its
    rows by source and row, so a row met again at another stream position hits."""
    from hf_stackwise.data.mixture import MixtureDataset

    schedule = [{**TOP[0], "name": "long", "until": 0.5}, {**TOP[0], "name": "short", "max_seq_length": 16}]
    data = rows(token_dataset)
    plane = {"max_seq_length": 32}
    off = run(tmp_path, data, schedule, {"activations": False}, name="off", data_plane=plane)
    on = run(tmp_path, data, schedule, {"activations": True}, name="on", data_plane=plane)
    assert_same_training(off, on)
    long, short = on[0].cache_decisions
    assert (long.slots, short.slots) == (16, 32) and long.key() != short.key()
    # long: steps 0-5 = 1.5 epochs (the last 2 steps hit); short: a new store, its first rows all miss
    assert step_hit_rates(on[0])[:8] == [0.0] * 4 + [1.0] * 2 + [0.0] * 2

    sources = {"a": token_dataset.select(range(8)), "b": token_dataset.select(range(8, 16))}
    mixture = MixtureDataset(sources, [(12, {"a": 1.0, "b": 1.0})], samples_per_step=4, total_steps=12, seed=0)
    plane = {"max_seq_length": 32, "datasets": ["a", "b"]}
    off = run(tmp_path, mixture, TOP, {"activations": False}, name="mix-off", data_plane=plane)
    on = run(tmp_path, mixture, TOP, {"activations": True}, name="mix-on", data_plane=plane)
    assert_same_training(off, on)
    seen = [(mixture.source_of(i), mixture.row_of(mixture.source_of(i), i)) for i in range(len(mixture))]
    assert on[0].cache_stats()["hits"] == len(seen) - len(set(seen)) > 0  # every repeat of a row is a hit


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--cache.max_memory", "lots"], ["cache.max_memory: 'lots' is not a size"]),
        (
            ["--cache.activations", "true", "--schedule.1.trunk", "lora", "--schedule.1.train", "[3]"],
            ["schedule[1]: stack 0 carries trunk LoRA, so the prefix is not frozen"],
        ),
        (
            ["--cache.activations", "true", "--cache.max_memory", "0", "--cache.dir", "FILE/cache"],
            ["cache.dir:", "cannot be written", "is not a folder"],
        ),
    ],
    ids=["max-memory", "trunk-lora", "dir"],
)
def test_the_cli_refuses_before_any_weight_loads(
    tmp_path, tiny_llama_dir, pydoc_files, capsys, monkeypatch, extra, expected
):
    from conftest import tiny_recipe, write_recipe
    from transformers import AutoModelForCausalLM

    from hf_stackwise.cli import pipeline as run_module
    from hf_stackwise.cli.commands import main

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the recipe was refused")

    monkeypatch.setattr(run_module, "load_model", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    (tmp_path / "FILE").write_text("")
    schedule = [{**TOP[0], "until": 0.5}, {**TOP[0], "name": "second"}]
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, tiny_llama_dir, pydoc_files[0], schedule))
    extra = [str(tmp_path / "FILE" / "cache") if e == "FILE/cache" else e for e in extra]
    assert main(["train", path, *extra]) == 2
    err = capsys.readouterr().err  # the data is tokenized (progress bars) before the storage check
    last = err.strip().splitlines()[-1]
    assert last.startswith("hf-stackwise: error: ") and "Traceback" not in err
    assert all(text in last for text in expected), last
    assert not os.path.exists(tmp_path / "run")


def test_a_frozen_adapter_is_part_of_the_prefix_unless_it_drops_out():
    from hf_stackwise.cache.policy import CacheData, CacheModel, CacheSettings, decide
    from hf_stackwise.errors import StackwiseError
    from hf_stackwise.rack.adapters import plan_adapters
    from hf_stackwise.schedule.phases import Schedule

    schedule = Schedule.from_list([{**TOP[0], "until": 0.5}, {**TOP[0], "name": "trunk", "trunk": "lora"}])
    base = (1, 1, 1, 1)
    layout = schedule.layout(base)

    def decisions(cache, dropout):
        adapters = plan_adapters(schedule, {"dropout": dropout}, layout)
        model = CacheModel((100,) * 4, 50, 64, 4)
        data = CacheData(16, 4, (32, 32), 32, ("clm", "clm"))
        settings = CacheSettings(activations=cache)
        return decide(schedule, schedule.resolve(24).bounds, layout, base, settings, model, data, adapters)

    first, second = decisions("auto", 0.0)
    assert first.on and first.cut == 3  # the trunk adapter exists but does not train yet: frozen with its block
    assert not second.on and second.reason == "stack 0 carries trunk LoRA, so the prefix is not frozen"
    first, _ = decisions("auto", 0.1)
    assert not first.on and "carries trunk LoRA with dropout 0.1" in first.reason
    with pytest.raises(StackwiseError, match=r"^schedule\[1\]: stack 0 carries trunk LoRA"):
        decisions(True, 0.0)
