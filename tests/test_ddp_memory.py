"""DDP pays only for what trains: under real 2-rank DDP (torchrun, gloo) a block-coordinate schedule's gradient
buckets hold the phase's trainable parameters only, and the run stays bitwise equal to the superset-bucket DDP it
replaces, across ranks and through a mid-phase resume."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from ddp_memory_worker import SCHEDULE
from test_ddp import torchrun

from hf_stackwise.cli.plan import make_plan
from hf_stackwise.cli.plan_memory import per_rank
from hf_stackwise.recipe.loader import load_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    phase, superset = tmp_path_factory.mktemp("phase"), tmp_path_factory.mktemp("superset")
    torchrun("ddp_memory_worker.py", str(phase), "phase")
    torchrun("ddp_memory_worker.py", str(superset), "superset")
    torchrun("ddp_memory_worker.py", str(phase), "phase", str(phase / "checkpoint-3"))
    return phase, superset


def load(path, tag):
    return [torch.load(path / f"{tag}{r}.pt") for r in (0, 1)], [
        json.loads((path / f"{tag}{r}.json").read_text()) for r in (0, 1)
    ]


def test_buckets_hold_the_phase_parameters_only(runs):
    phase, superset = runs
    (_, rows), (_, before) = load(phase, "phase"), load(superset, "superset")
    assert [r["world_size"] for r in rows] == [2, 2]
    for rank_rows, old in zip(rows, before):
        # a DDP run whose trainable set is fixed to the phase's has exactly the phase's trainable bytes in buckets
        assert [b for _, b, _ in rank_rows["buckets"]] == [t for _, _, t in rank_rows["buckets"]]
        # the superset DDP held every stack, embeddings and head in its buckets at every step
        superset_bytes = {b for _, b, _ in old["buckets"]}
        assert len(superset_bytes) == 1 and superset_bytes.pop() > 2.5 * max(t for _, _, t in old["buckets"])
    assert len({b for _, b, _ in rows[0]["buckets"]}) == 3  # s3 == s0 (one block); s1 + embeddings; s2 + head


def test_equal_to_superset_ddp_bitwise_on_both_ranks(runs):
    phase, superset = runs
    (new, _), (old, _) = load(phase, "phase"), load(superset, "superset")
    from conftest import tiny_causal_lm

    fresh = dict(tiny_causal_lm("llama").named_parameters())
    for name in new[0]:
        assert torch.equal(new[0][name], new[1][name]), name
        assert torch.equal(new[0][name], old[0][name]), name
    for trained in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert not torch.equal(new[0][trained], fresh[trained]), trained  # every phase really trained


def test_mid_phase_resume_is_bitwise(runs):
    phase, _ = runs
    (full, _), (resumed, rows) = load(phase, "phase"), load(phase, "resumed")
    assert rows[0]["buckets"][0][:2] == [3, rows[0]["buckets"][0][2]]  # the resume re-registered phase s1 alone
    for rank in (0, 1):
        for name in full[rank]:
            assert torch.equal(full[rank][name], resumed[rank][name]), name


def test_plan_predicts_the_measured_buckets_per_rank(runs, tmp_path, tiny_llama_dir, pydoc_files):
    """`plan --world-size 2` of the worker's schedule on the same tiny Llama: DDP's bucket bytes per phase are the
    ones the real run measured (and its gradients the same again, in `.grad`)."""
    recipe = {
        "model": {"name_or_path": tiny_llama_dir, "dtype": "float32"},
        "rack": {"blocks_per_stack": 1},
        "data": {"train": {"path": "text", "data_files": pydoc_files[0]}, "max_seq_length": 32},
        "schedule": SCHEDULE,
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 8, "per_device_train_batch_size": 2},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    rows = per_rank(make_plan(load_recipe(str(path))), 2)
    _, measured = load(runs[0], "phase")
    by_phase = [measured[0]["buckets"][2 * i][1] for i in range(4)]  # two steps per phase
    assert [r["ddp"]["buckets"] for r in rows] == by_phase
    assert [r["ddp"]["gradients"] for r in rows] == by_phase


def test_plan_predicts_the_measured_fsdp2_shards_per_rank(tmp_path, tiny_llama_dir, pydoc_files):
    """A raw FSDP2 run (fully_shard per block, then the root) of the same tiny Llama on 2 ranks: rank 0's parameter
    shards plus buffers, and its gradient shards after training stack 1 and the head, are what `plan` predicts."""
    out = tmp_path / "shards.json"
    try:
        torchrun("plan_shard_worker.py", str(out))
    except AssertionError as err:
        # FSDP2 on gloo may abort at process exit after its results are written (measured: about 2 launches in 30);
        # the worker writes them atomically, so a file that exists is the run's whole result
        if not (out.exists() and "SIGABRT" in str(err)):
            raise
    measured = json.loads(out.read_text())
    recipe = {
        "model": {"name_or_path": tiny_llama_dir, "dtype": "float32"},
        "rack": {"blocks_per_stack": 1},
        "data": {"train": {"path": "text", "data_files": pydoc_files[0]}, "max_seq_length": 32},
        "schedule": [{"name": "s1", "until": 1.0, "train": [1], "head": "train"}],
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 2},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    (row,) = per_rank(make_plan(load_recipe(str(path))), 2)
    assert row["fsdp2"]["weights"] == measured["weights"]
    assert row["fsdp2"]["gradients"] == measured["gradients"]
