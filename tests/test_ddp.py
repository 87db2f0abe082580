"""Real 2-process DDP on CPU (torchrun, gloo): transitions that freeze and unfreeze stacks keep both ranks
identical and match one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_stackwise.cli.commands import main as cli_main

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONNECTION_ERRORS = ("Connection closed by peer", "Connection reset by peer", "Address already in use")


def torchrun(*args, cwd=HERE, launcher="torchrun"):
    """Launch 2 CPU ranks. A launch that dies while the gloo process group is being set up (a rare rendezvous
    failure on a loaded machine, before any training) is retried once; any other failure fails the test."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE)]))
    for attempt in (1, 2):
        if launcher == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        else:  # `--cpu --num_processes 2` silently runs one process; `--multi_gpu` on CPU runs two
            cmd = [
                os.path.join(os.path.dirname(sys.executable), "accelerate"),
                "launch",
                "--multi_gpu",
                "--num_processes",
                "2",
                "--num_machines",
                "1",
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                "--main_process_port",
                str(free_port()),
            ]
        result = subprocess.run(cmd + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        if result.returncode == 0 or attempt == 2 or not any(e in result.stderr for e in CONNECTION_ERRORS):
            break
    errors = [line for line in result.stderr.splitlines() if "Error" in line or "error" in line]
    assert result.returncode == 0, "\n".join(errors[:40]) + "\n...\n" + result.stderr[-2000:]
    return result


def run_worker_pair(tmp_path, variant: str):
    two, one = tmp_path / "two", tmp_path / "one"
    torchrun("ddp_worker.py", str(two), "2", variant)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE)]))
    subprocess.run(
        [sys.executable, "ddp_worker.py", str(one), "4", variant], cwd=HERE, env=env, check=True, timeout=300
    )
    return two, one


def test_two_ranks_with_adapters_stay_identical_and_match_one_process(tmp_path):
    two, one = run_worker_pair(tmp_path, "dual")
    rank0, rank1, single = (torch.load(p) for p in (two / "rank0.pt", two / "rank1.pt", one / "rank0.pt"))
    traces = [
        json.loads(p.read_text())["trace"] for p in (two / "trace0.json", two / "trace1.json", one / "trace0.json")
    ]
    golden = [
        [0, [0, 1, 2, 3]],
        [1, [0, 1, 2, 3]],
        [2, [0, 1, 2, 3]],
        [3, [0, 1, 2, 3]],
        [4, [0]],
        [5, [0]],
        [6, [0, 1, 2, 3]],
        [7, [0, 1, 2, 3]],
    ]  # blocks holding any trainable tensor (trunk adapter: all)
    assert all(t == golden for t in traces)
    assert any(".lora_B.trunk." in n for n in rank0) and any(".lora_B.stack_1." in n for n in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], single[name], rtol=0, atol=1e-5)


def test_two_ranks_stay_identical_and_match_one_process(tmp_path):
    two, one = run_worker_pair(tmp_path, "full")
    rank0, rank1, single = (torch.load(p) for p in (two / "rank0.pt", two / "rank1.pt", one / "rank0.pt"))
    traces = [json.loads(p.read_text()) for p in (two / "trace0.json", two / "trace1.json", one / "trace0.json")]
    assert [t["world_size"] for t in traces] == [2, 2, 1]
    golden = [[0, [3]], [1, [3]], [2, [0, 1]], [3, [0, 1]], [4, [1]], [5, [1]], [6, [0, 1, 2, 3]], [7, [0, 1, 2, 3]]]
    assert all(t["trace"] == golden for t in traces)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], single[name], rtol=0, atol=1e-5)
    # the run really trained a stack it unfroze late (not a vacuous equality)
    from conftest import tiny_causal_lm

    fresh = dict(tiny_causal_lm("llama").named_parameters())
    assert not torch.equal(rank0["model.layers.2.mlp.up_proj.weight"], fresh["model.layers.2.mlp.up_proj.weight"])


def test_two_ranks_expand_a_sample_generator_alike_and_match_one_process(tmp_path):
    """`sample` draws the same stacks on every rank (the expansion is pure), and `release_idle` keeps them in sync."""
    two, one = run_worker_pair(tmp_path, "sample")
    rank0, rank1, single = (torch.load(p) for p in (two / "rank0.pt", two / "rank1.pt", one / "rank0.pt"))
    traces = [
        json.loads(p.read_text())["trace"] for p in (two / "trace0.json", two / "trace1.json", one / "trace0.json")
    ]
    golden = [[0, [3]], [1, [3]], [2, [0, 1]], [3, [0, 1]], [4, [2, 3]], [5, [2, 3]], [6, [1, 3]], [7, [1, 3]]]
    assert all(t == golden for t in traces)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], single[name], rtol=0, atol=1e-5)


def test_two_ranks_through_growth_stay_identical_and_match_one_process(tmp_path):
    """Stacks grown mid-run (copy below, identity inserted, random on top) were registered with DDP from the start."""
    two, one = run_worker_pair(tmp_path, "grow")
    rank0, rank1, single = (torch.load(p) for p in (two / "rank0.pt", two / "rank1.pt", one / "rank0.pt"))
    traces = [
        json.loads(p.read_text())["trace"] for p in (two / "trace0.json", two / "trace1.json", one / "trace0.json")
    ]
    # physical blocks with trainable weights: 4..6 are the grown ones (4 below everything, 5 inserted, 6 on top)
    golden = [[0, [0, 1, 2, 3]], [1, [0, 1, 2, 3]], [2, [4]], [3, [4]], [4, [3, 5]], [5, [3, 5]]]
    golden += [[6, list(range(7))], [7, list(range(7))]]
    assert all(t == golden for t in traces)
    assert len({n.split(".")[2] for n in rank0 if n.startswith("model.layers.")}) == 7
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], single[name], rtol=0, atol=1e-5)  # SGD: see ddp_worker.py


def write_two_phase_recipe(tmp_path, tiny_llama_dir, train_file):
    """The launch tests' recipe (top stack, then bottom stack and embeddings; 4 steps of 2 rows per rank), written to
    ``tmp_path``; returns its path."""
    recipe = {
        "model": {"name_or_path": tiny_llama_dir, "dtype": "float32"},
        "rack": {"blocks_per_stack": 2},
        "data": {"train": {"path": "text", "data_files": train_file}, "max_seq_length": 32},
        "schedule": [
            {"name": "top", "until": 0.5, "train": ["top"]},
            {"name": "bottom", "until": 1.0, "train": [0], "embeddings": "train"},
        ],
        "training": {
            "max_steps": 4,
            "per_device_train_batch_size": 2,
            "learning_rate": 1e-3,
            "report_to": "none",
            "save_strategy": "no",
            "use_cpu": True,
            "seed": 0,
            "dataloader_drop_last": True,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_launched_module_cli_matches_one_process(tmp_path, tiny_llama_dir, pydoc_files, launcher):
    """`torchrun -m hf_stackwise train` and `accelerate launch -m hf_stackwise train` run 2 real ranks: the
    result equals one process with the doubled per-device batch (one rank alone would not)."""
    path = write_two_phase_recipe(tmp_path, tiny_llama_dir, pydoc_files[0])
    # torchrun: `ddp_find_unused_parameters: false` as the user writes it; accelerate: unset, which means false
    # here (DDP's reducer holds each phase's trainable set, every one of which the forward uses)
    unused = ["--training.ddp_find_unused_parameters", "false"] if launcher == "torchrun" else []
    launched = torchrun(
        "-m",
        "hf_stackwise",
        "train",
        str(path),
        "--training.output_dir",
        str(tmp_path / "ddp"),
        *unused,
        cwd=tmp_path,
        launcher=launcher,
    )
    assert "did not find any unused parameters" not in launched.stderr  # DDP's warning when searching in vain
    assert "pin_memory" not in launched.stderr
    code = cli_main(
        [
            "train",
            str(path),
            "--training.output_dir",
            str(tmp_path / "one"),
            "--training.per_device_train_batch_size",
            "4",
        ]
    )
    assert code == 0
    ddp, single = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    start = load_file(os.path.join(tiny_llama_dir, "model.safetensors"))
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=0, atol=1e-5)
    assert not torch.equal(single["model.layers.3.mlp.up_proj.weight"], start["model.layers.3.mlp.up_proj.weight"])
    assert not torch.equal(single["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(single["lm_head.weight"], start["lm_head.weight"])  # the head never trains
