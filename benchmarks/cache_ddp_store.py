"""Does one activation-cache store per node pay under DDP? The node store against one store per rank, measured.

Run it (CPU only, offline; about 10 minutes on 2 busy cores)::

    python benchmarks/cache_ddp_store.py              # or --repeats 1 while developing

**Phase**: the cached frozen-prefix phase of ``benchmarks/cache.py``'s Llama (12 blocks x 256 from a config, byte
vocabulary of 256, untied head, 4 stacks of 3, the top stack and the head train; a frozen prefix of 9 blocks) on
32 rows of 128 UTF-8 bytes of ``pydoc_data.topics``, 3 epochs, batch 4 per rank, on 2 DDP ranks (``torchrun``,
gloo, one torch thread each).

**Arms**, each a real 2-rank run, interleaved (the order rotates every repeat):

* ``off``: ``cache.activations: false``;
* ``node``: ``cache.activations: true`` with the node store (what the trainer does under DDP);
* ``per-rank``: the same with one store per rank (what it did before: the trainer's node-store switch turned off
  in a subclass), the baseline the node store has to beat;
* ``one-process`` (once): the same phase in one process with batch 8 (the same global batch and data order), for
  the hit rate a node store should reach.

The *hit rate* counts rows found in the store; a micro-batch skips the prefix only when every one of its rows is
found, so the share of *replayed steps* (batch 4 per rank, no accumulation: one micro-batch per step) is what the
time follows. Under DDP a step also waits for the slowest rank: with one store per rank, a step where one rank
replays and the other misses costs a miss. The *phase time* is the sum of rank 0's step spans (``on_step_begin``
to ``on_step_end``: forward, backward, the all-reduce, optimizer) over the whole 3-epoch run, fills included; the
ratios are per repeat, between arms of the same repeat, and the table gives their median. Every arm's final weights
are compared with ``off``'s bitwise (a SHA-256 of the state dict). The machine's load from other processes during
each launch is stored: on a shared machine it distorts the times (not the hit rates). Writes
``benchmarks/results/cache-ddp-store.json``. A report, not a test: the exit status is 0 whatever the numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "results", "cache-ddp-store.json")
ARMS = ("off", "node", "per-rank")
SIZE = {"seq_len": 128, "batch": 4, "rows": 32, "epochs": 3}


def worker(arm: str, out_dir: str) -> None:
    """One rank of one arm (run under torchrun, or alone for ``one-process``): trains and writes rank<r>.json."""
    import datasets
    import torch
    import torch.distributed as dist
    from cache import MODELS, build_model, schedules, token_rows
    from common import cache_step_timer
    from transformers import PrinterCallback

    from hf_stackwise.trainer import StackwiseArguments, StackwiseTrainer

    class PerRankStores(StackwiseTrainer):
        def _cache_shared(self) -> bool:
            return False

    torch.set_num_threads(1)
    spec = MODELS["llama"]
    batch = SIZE["batch"] * (2 if arm == "one-process" else 1)
    steps = SIZE["epochs"] * SIZE["rows"] // (SIZE["batch"] * 2)
    rows = token_rows("llama", SIZE["seq_len"], SIZE["rows"])
    args = StackwiseArguments(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-4,
        schedule=schedules(spec)["top"],
        blocks_per_stack=spec["blocks_per_stack"],
        activation_cache={"activations": arm != "off"},
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    timer = cache_step_timer()
    cls = PerRankStores if arm == "per-rank" else StackwiseTrainer
    dataset = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    model = build_model("llama", spec, SIZE["seq_len"])
    trainer = cls(model=model, args=args, train_dataset=dataset, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    timer.trainer = trainer
    trainer.train()
    digest = hashlib.sha256()
    for name, value in sorted(trainer.model.state_dict().items()):
        digest.update(name.encode() + value.detach().contiguous().numpy().tobytes())
    rank = dist.get_rank() if dist.is_initialized() else 0
    stats = trainer.cache_stats()
    result = {
        "arm": arm,
        "world": args.world_size,
        "phase_s": sum(s["s"] for s in timer.steps),
        "step_s": [s["s"] for s in timer.steps],
        "replayed_steps": sum(0 < s["hits"] == s["rows"] for s in timer.steps),  # every row stored: prefix skipped
        "hits": stats["hits"],
        "rows": stats["rows"],
        "stored_bytes": stats["bytes"],
        "weights_sha256": digest.hexdigest(),
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(arm: str, folder: str) -> dict:
    """Run one arm (2 ranks, or one process); rank results plus the other processes' CPU share meanwhile."""
    from common import CpuShare, load_average

    out = os.path.join(folder, arm)
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([HERE, ROOT]))
    cmd = [sys.executable]
    if arm != "one-process":
        cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    share = CpuShare()
    subprocess.run([*cmd, __file__, "--worker", arm, out], cwd=HERE, env=env, check=True, capture_output=True)
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(1 if arm == "one-process" else 2)]
    return {"ranks": ranks, "other_cpu_share": share.other(), "load_average": load_average()}


def summarize(runs: dict[str, list[dict]], one: dict) -> dict:
    phase = {arm: [r["ranks"][0]["phase_s"] for r in runs[arm]] for arm in ARMS}
    ratio = {  # per repeat, between arms of that repeat; median over repeats
        "node_vs_per_rank_ratio": [p / n for p, n in zip(phase["per-rank"], phase["node"])],
        "node_vs_uncached_ratio": [o / n for o, n in zip(phase["off"], phase["node"])],
        "per_rank_vs_uncached_ratio": [o / p for o, p in zip(phase["off"], phase["per-rank"])],
    }
    reference = runs["off"][0]["ranks"][0]["weights_sha256"]
    arms = {}
    for arm in ARMS:
        first = runs[arm][0]["ranks"]
        arms[arm] = {
            "phase_s": phase[arm],
            "phase_s_median": statistics.median(phase[arm]),
            "hit_rate_per_rank": [r["hits"] / r["rows"] if r["rows"] else 0.0 for r in first],
            "replayed_step_share_per_rank": [r["replayed_steps"] / len(r["step_s"]) for r in first],
            "stored_bytes_per_rank": [r["stored_bytes"] for r in first],
            "weights_equal_uncached": all(
                rank["weights_sha256"] == reference for run in runs[arm] for rank in run["ranks"]
            ),
            "other_cpu_share": [r["other_cpu_share"] for r in runs[arm]],
        }
    (solo,) = one["ranks"]
    return {
        "arms": arms,
        "one_process": {"hit_rate": solo["hits"] / solo["rows"]},
        "ratios": {k: {"per_repeat": v, "median": statistics.median(v)} for k, v in ratio.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("ARM", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    from cache import machine

    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as folder:
        one = launch("one-process", os.path.join(folder, "solo"))
        for repeat in range(args.repeats):
            order = ARMS[repeat % len(ARMS) :] + ARMS[: repeat % len(ARMS)]
            for arm in order:
                runs[arm].append(launch(arm, os.path.join(folder, f"r{repeat}")))
                print(f"repeat {repeat} {arm}: {runs[arm][-1]['ranks'][0]['phase_s']:.2f} s", flush=True)
    result = {
        "benchmark": "cache-ddp-store",
        "phase": (
            "Llama 12 x 256 from a config (vocab 256, untied head), 4 stacks of 3, top stack + head train (frozen "
            f"prefix of 9 blocks); {SIZE['rows']} rows of {SIZE['seq_len']} bytes, {SIZE['epochs']} epochs, batch "
            f"{SIZE['batch']} per rank on 2 DDP ranks (gloo, 1 thread each)"
        ),
        "repeats": args.repeats,
        "machine": machine(),
        **summarize(runs, one),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("arms", "one_process", "ratios")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
