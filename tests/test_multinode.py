"""Multi-node launch: two "nodes" of one process each on this machine meet through a c10d rendezvous on
localhost (`torchrun --nnodes 2 --rdzv_backend c10d`, and accelerate's multi-machine launch), train a schedule
that freezes and unfreezes stacks, and give the result of one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from test_ddp import CONNECTION_ERRORS, free_port, write_two_phase_recipe

from hf_stackwise.cli.commands import main as cli_main

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.slow

# gloo's process group can abort in its destructor at interpreter exit, after the run has written its results
EXIT_ABORTS = ("terminate called", "Aborted", "SIGABRT")


def node_command(launcher: str, node: int, port: int) -> list[str]:
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--node_rank",
            str(node),
            "--rdzv_backend",
            "c10d",
            "--rdzv_id",
            "stackwise-test",
            "--rdzv_endpoint",
            f"127.0.0.1:{port}",
        ]
    return [
        os.path.join(os.path.dirname(sys.executable), "accelerate"),
        "launch",
        "--multi_gpu",  # with training.use_cpu: true, real CPU ranks (`--cpu` would run one process)
        "--num_machines",
        "2",
        "--num_processes",
        "2",
        "--machine_rank",
        str(node),
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
        "--rdzv_backend",
        "c10d",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]


def wait_all(procs, timeout: float = 300, grace: float = 30) -> list[tuple[str, int]]:
    """Wait for every node; once one fails (or the time is up), give the others ``grace`` seconds, then kill them,
    so a node left waiting in the rendezvous for a peer that died cannot hang the test."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        failed = any(p.poll() not in (None, 0) for p in procs)
        if failed or time.monotonic() > deadline:
            end = time.monotonic() + grace
            while any(p.poll() is None for p in procs) and time.monotonic() < end:
                time.sleep(0.5)
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.5)
    return [
        (p.communicate()[1] + ("" if p.returncode != -9 else "\n[killed: peer failed or timed out]"), p.returncode)
        for p in procs
    ]


def launch_two_nodes(launcher: str, args: list[str], cwd, output_dir) -> None:
    """Start both nodes at once (each with its own datasets cache, as on two machines) and wait for both. Retried
    once, only when a node failed on a gloo connection error at start-up or aborted at exit after the model was
    written; any other failure fails the test."""
    for attempt in (1, 2):
        port = free_port()
        procs = []
        for node in (0, 1):
            env = dict(
                os.environ,
                OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE)]),
                HF_DATASETS_CACHE=str(cwd / f"datasets-cache-{node}"),
            )
            cmd = node_command(launcher, node, port) + args
            procs.append(
                subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            )
        results = wait_all(procs)
        failed = [err for err, code in results if code != 0]
        if not failed:
            return
        written = os.path.exists(os.path.join(output_dir, "model.safetensors"))
        retry = all(
            (not written and any(e in err for e in CONNECTION_ERRORS))
            or (written and any(a in err for a in EXIT_ABORTS))
            for err in failed
        )
        if attempt == 2 or not retry:
            break
    errors = [line for err in failed for line in err.splitlines() if "rror" in line]
    raise AssertionError("\n".join(errors[:40]) + "\n...\n" + failed[0][-2000:])


# accelerate's multi-machine launch (`accelerate launch --num_machines 2 --rdzv_backend c10d`, see docs/scaling.md)
# starts the same torchrun elastic agent; node_command builds it, the suite runs the torchrun form only (time budget).
@pytest.mark.parametrize("launcher", ["torchrun"])
def test_two_nodes_through_c10d_rendezvous_match_one_process(tmp_path, tiny_llama_dir, pydoc_files, launcher):
    path = write_two_phase_recipe(tmp_path, tiny_llama_dir, pydoc_files[0])
    nodes = tmp_path / "nodes"
    launch_two_nodes(
        launcher, ["-m", "hf_stackwise", "train", str(path), "--training.output_dir", str(nodes)], tmp_path, nodes
    )
    one = tmp_path / "one"
    code = cli_main(
        ["train", str(path), "--training.output_dir", str(one), "--training.per_device_train_batch_size", "4"]
    )
    assert code == 0
    two, single = load_file(nodes / "model.safetensors"), load_file(one / "model.safetensors")
    start = load_file(os.path.join(tiny_llama_dir, "model.safetensors"))
    for name in single:
        torch.testing.assert_close(two[name], single[name], rtol=0, atol=1e-5)
    for trained in ("model.layers.3.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"):
        assert not torch.equal(single[trained], start[trained])  # both phases really trained
