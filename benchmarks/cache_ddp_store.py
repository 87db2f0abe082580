"""Would one activation-cache store per node pay under DDP? Per-rank stores against one store the ranks share.

Run it (CPU only, offline; about a minute)::

    python benchmarks/cache_ddp_store.py

Measured here: the hit rate of each rank's own store in a real 2-rank DDP run (``torchrun``, gloo) and of one
process's store, on the frozen-prefix phase of ``tests/cache_ddp_worker.py`` (16 rows, 3 epochs, global batch 4
in both, reshuffled each epoch). A store shared by the ranks of a node sees every row of an epoch (each row passes
through one of them), so its hit rate is one process's. The step times of a hit and of a miss come from the committed
``benchmarks/results/cache.json`` (``benchmarks/cache.py``: the same phase cached with every row a hit, and with every
row a miss); the phase time per rank is ``hits x hit step + misses x miss step``. For N ranks and E epochs the
expected hit rates are ``(E - 1) / E`` shared and ``sum over e < E of (1 - (1 - 1/N)^e) / E`` per rank (a row dealt
to a rank at random each epoch). Writes ``benchmarks/results/cache-ddp-store.json``. A report, not a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TESTS = os.path.join(ROOT, "tests")
OUT = os.path.join(HERE, "results", "cache-ddp-store.json")


def hit_rates(ranks: int) -> list[float]:
    """Each rank's measured hit rate over the cached phase (cache_ddp_worker.py, cache on, global batch 4)."""
    with tempfile.TemporaryDirectory() as folder:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([TESTS, ROOT]))
        cmd = [sys.executable]
        if ranks > 1:
            cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
        worker = ["cache_ddp_worker.py", folder, "on", str(4 // ranks)]
        subprocess.run([*cmd, *worker], cwd=TESTS, env=env, check=True, capture_output=True)
        stats = [json.load(open(os.path.join(folder, f"rank{r}.json")))["cache"] for r in range(ranks)]
    return [s["hits"] / s["rows"] for s in stats]


def expected(ranks: int, epochs: int) -> dict[str, float]:
    per_rank = sum(1 - (1 - 1 / ranks) ** e for e in range(1, epochs)) / epochs
    return {"per_rank": per_rank, "shared": (epochs - 1) / epochs}


def phase_time(hit_rate: float, step_ms: dict) -> float:
    """Milliseconds per step of a cached phase with this hit rate."""
    return hit_rate * step_ms["cached_hit"] + (1 - hit_rate) * step_ms["cached_miss"]


def main() -> None:
    two, one = hit_rates(2), hit_rates(1)
    per_rank, shared = sum(two) / len(two), one[0]
    cache = json.load(open(os.path.join(HERE, "results", "cache.json")))
    models = {}
    for name, model in cache["models"].items():
        step = model["step_ms"]
        models[name] = {
            "label": model["label"],
            "step_ms": {"hit": step["cached_hit"], "miss": step["cached_miss"], "uncached": step["off"]},
            "per_rank_store_ms": phase_time(per_rank, step),
            "shared_store_ms": phase_time(shared, step),
            "speedup_shared_vs_per_rank": phase_time(per_rank, step) / phase_time(shared, step),
            "speedup_per_rank_vs_uncached": step["off"] / phase_time(per_rank, step),
        }
    result = {
        "benchmark": "cache-ddp-store",
        "measured_hit_rate": {"rank0": two[0], "rank1": two[1], "one_process": shared},
        "phase": "tests/cache_ddp_worker.py: 16 rows, 3 epochs, global batch 4, frozen prefix of 3 blocks",
        "models": models,
        "expected_hit_rate": {f"{n} ranks, {e} epochs": expected(n, e) for n in (2, 8) for e in (3, 10)},
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
