"""How close a 2-rank DDP run comes to one process with the same global batch, with SGD and with AdamW, through
the growth schedule of tests/ddp_worker.py (a copy prepended, an identity stack inserted, a random stack on top,
each growth phase resetting the optimizer state).

Run it (CPU only, offline; about a minute on 2 idle cores)::

    python benchmarks/ddp_tolerance.py

Per optimizer: the largest |rank 0 - rank 1| (DDP keeps ranks bitwise equal: 0) and the largest |2 ranks - one
process| over every weight, written to benchmarks/results/ddp-tolerance.json. A report, not a test: exit status 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TESTS = os.path.join(ROOT, "tests")


def run(variant: str, folder: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([TESTS, ROOT]))
    two, one = os.path.join(folder, "two"), os.path.join(folder, "one")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run([*launch, "ddp_worker.py", two, "2", variant], cwd=TESTS, env=env, check=True)
    subprocess.run([sys.executable, "ddp_worker.py", one, "4", variant], cwd=TESTS, env=env, check=True)
    rank0, rank1, single = (
        torch.load(os.path.join(d, f)) for d, f in ((two, "rank0.pt"), (two, "rank1.pt"), (one, "rank0.pt"))
    )
    return {
        "max_abs_rank0_rank1": max((rank0[n] - rank1[n]).abs().max().item() for n in rank0),
        "max_abs_two_ranks_one_process": max((rank0[n] - single[n]).abs().max().item() for n in rank0),
    }


def main() -> None:
    results = {"job": "tests/ddp_worker.py growth schedule: tiny Llama, 8 steps, 2 ranks x batch 2 vs 1 x batch 4"}
    for name, variant, lr in (("sgd", "grow", 5e-2), ("adamw", "grow_adam", 1e-3)):
        with tempfile.TemporaryDirectory() as folder:
            results[name] = {"learning_rate": lr, **run(variant, folder)}
        print(name, results[name])
    out = os.path.join(HERE, "results", "ddp-tolerance.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
