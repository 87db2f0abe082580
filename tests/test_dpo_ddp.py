"""DPO under real 2-process DDP (torchrun, gloo, CPU): both ranks stay identical and match one process with the
same global batch, with the `shared` reference (which reads each rank's own prefix hidden state) as with `copy`.
One torchrun launch runs both ways; the tests read its outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_ddp import HERE, torchrun

pytest.importorskip("trl")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dpo-ddp")
    two, one = folder / "two", folder / "one"
    torchrun("dpo_ddp_worker.py", str(two), "2")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE)]))
    subprocess.run([sys.executable, "dpo_ddp_worker.py", str(one), "4"], cwd=HERE, env=env, check=True, timeout=300)
    return two, one


@pytest.mark.parametrize("way", ["shared", "copy"])
def test_two_ranks_stay_identical_and_match_one_process(launched, way):
    two, one = launched
    rank0, rank1, single = (
        torch.load(p) for p in (two / f"{way}-rank0.pt", two / f"{way}-rank1.pt", one / f"{way}-rank0.pt")
    )
    logs = [json.loads(p.read_text()) for p in (two / f"{way}-log0.json", one / f"{way}-log0.json")]
    assert [log["world_size"] for log in logs] == [2, 1]
    assert [h["phase"] for h in logs[0]["log"]] == ["top"] * 3 + ["upper"] * 3
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], single[name], rtol=0, atol=1e-5)  # the suite's DDP tolerance
    from conftest import tiny_causal_lm

    fresh = {n: p.detach() for n, p in tiny_causal_lm("llama", layers=4).named_parameters()}
    trained, frozen = "model.layers.2.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(rank0[trained], fresh[trained])  # stack 2 trains in the second phase only
    assert torch.equal(rank0[frozen], fresh[frozen])


def test_shared_equals_copy_under_ddp(launched):
    two, _ = launched
    shared, copied = torch.load(two / "shared-rank0.pt"), torch.load(two / "copy-rank0.pt")
    assert all(torch.equal(shared[n], copied[n]) for n in shared)
