"""DDP pays only for what trains: under real 2-rank DDP (torchrun, gloo) a block-coordinate schedule's gradient
buckets hold the phase's trainable parameters only, and the run stays bitwise equal to the superset-bucket DDP it
replaces, across ranks and through a mid-phase resume."""

from __future__ import annotations

import json

import pytest
import torch
from test_ddp import torchrun

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
    for per_rank, old in zip(rows, before):
        # a DDP run whose trainable set is fixed to the phase's has exactly the phase's trainable bytes in buckets
        assert [b for _, b, _ in per_rank["buckets"]] == [t for _, _, t in per_rank["buckets"]]
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
