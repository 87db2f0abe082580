"""Adaptive freezing against full fine-tuning of every stack: time to the end and the held-out metric.

Run it (CPU only, offline, after `make assets`; the issue's protocol is the default: 3 seeds, arms interleaved, one
torch thread, on a quiet machine)::

    python benchmarks/autofreeze.py                         # or: make bench
    python benchmarks/autofreeze.py --seeds 1 --minilm-steps 60 --smollm2-steps 24   # a reduced run

One process per job (what wrote `benchmarks/results/autofreeze.json`, SmolLM2 at a reduced size for time) or, on a
shared machine, per (job, seed), then a merge (each process runs its seeds' two arms one after the other, the order
alternating with the seed)::

    python benchmarks/autofreeze.py --only minilm --out /tmp/af/minilm.json &
    python benchmarks/autofreeze.py --only smollm2 --smollm2-steps 24 --smollm2-rows 16 --out /tmp/af/smollm2.json &
    wait; python benchmarks/autofreeze.py --merge /tmp/af/*.json
    # per seed: add --seeds 1 --first-seed S to each command

**Jobs**, each run through the same code as `hf-stackwise train`:

* ``minilm``: `recipes/minilm/classify_autofreeze.yaml` (all-MiniLM-L6-v2, 3 stacks of 2 blocks, standard-library
  docstrings labelled by package, 6 classes, the fixed held-out split): ``--minilm-steps`` steps of
  ``--minilm-batch`` texts cut at ``--minilm-seq`` tokens (several epochs over the 517 training texts). Metric:
  accuracy and macro-F1 on the whole held-out set.
* ``smollm2``: `recipes/smollm2-135m/autofreeze.yaml` (SmolLM2-135M-Instruct, 5 stacks of 6, tied embeddings/head
  frozen) over the first ``--smollm2-rows`` chunks of the Python-docs corpus, ``--smollm2-steps`` steps of
  ``--smollm2-batch`` rows (so each row is seen several times and the cache can replay the frozen prefix). Metric:
  held-out loss on ``--eval-rows`` chunks of the eval text.

**Arms**, interleaved per seed (the order alternates): ``full``: the recipe with ``autofreeze`` removed (every stack
it trains trains to the end); ``autofreeze``: the recipe as shipped. Same data, steps, seed and learning rates.

Reported per run: wall and CPU time of ``train()`` (the process's CPU time, all threads), the held-out metric at the
end, the cache's hit rate (rows served from the store / rows looked up), and the freeze decisions (step, stacks).
Summary per job: the mean time ratio full / autofreeze and the metric difference. Targets (from the issue): ≥ 1.5×
less time with accuracy within 0.5 points (classification) or held-out loss within +1% (causal LM) on at least one
job, judged on CPU time (the process's own time: robust when other work shares the cores; wall time is reported
beside it, with the 1-minute load average at the start and end of each ``train()``). Both arms run the recipe's own
model config and padding (``LEVERS``, also in the JSON). A report, not a test: the exit status is 0 whatever the
numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time

import yaml
from common import pydoc_corpus  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {
    "minilm": os.path.join(ROOT, "recipes", "minilm", "classify_autofreeze.yaml"),
    "smollm2": os.path.join(ROOT, "recipes", "smollm2-135m", "autofreeze.yaml"),
}
ARMS = ("full", "autofreeze")
TARGET_SPEEDUP = 1.5
TARGET_ACCURACY_POINTS = 0.5
TARGET_LOSS_RELATIVE = 0.01
# What the shipped recipes set for BOTH arms so that a frozen prefix can be replayed (recorded in the JSON).
LEVERS = {
    "minilm": "model.config dropout 0 (hidden_dropout_prob, attention_probs_dropout_prob) and data.padding "
    "max_length at max_seq_length 64, in both arms: the frozen prefix is deterministic and a row's inputs repeat",
    "smollm2": "none beyond the recipe (Llama blocks draw no random numbers; rows are fixed-length chunks)",
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3)")
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed.. (one process per seed)")
    parser.add_argument("--only", nargs="+", choices=list(RECIPES), help="jobs to run (default: both)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--minilm-steps", type=int, default=200, help="default 200 (~6 epochs at batch 16)")
    parser.add_argument("--minilm-batch", type=int, default=16)
    parser.add_argument("--minilm-seq", type=int, default=64)
    parser.add_argument("--smollm2-steps", type=int, default=96, help="default 96 (6 epochs of 64 rows at batch 4)")
    parser.add_argument("--smollm2-batch", type=int, default=4)
    parser.add_argument("--smollm2-seq", type=int, default=128)
    parser.add_argument("--smollm2-rows", type=int, default=64, help="training chunks (default 64)")
    parser.add_argument("--eval-rows", type=int, default=32, help="SmolLM2 held-out chunks (default 32)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "autofreeze.json"))
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="write one report from these runs' JSON files")
    return parser


def arm_recipe(job: str, arm: str, seed: int, opts, folder: str, train_file: str | None) -> dict:
    """The shipped recipe with the arm's schedule, the budget, no checkpoints and no evals during training."""
    with open(RECIPES[job]) as f:
        raw = yaml.safe_load(f)
    raw = copy.deepcopy(raw)
    if arm == "full":
        for phase in raw["schedule"]:
            phase.pop("autofreeze", None)
    steps, batch, seq = (
        (opts.minilm_steps, opts.minilm_batch, opts.minilm_seq)
        if job == "minilm"
        else (opts.smollm2_steps, opts.smollm2_batch, opts.smollm2_seq)
    )
    raw["data"]["max_seq_length"] = seq
    if train_file is not None:
        raw["data"]["train"] = {"path": "text", "data_files": train_file}
        raw["data"]["max_eval_samples"] = opts.eval_rows
    raw.pop("callbacks", None)
    training = raw["training"]
    for key in ("save_total_limit", "eval_steps", "save_steps"):
        training.pop(key, None)
    training.update(
        output_dir=os.path.join(folder, f"{job}-{arm}-{seed}"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=max(1, steps // 10),
        seed=seed,
        disable_tqdm=True,
        use_cpu=True,
        report_to="none",
    )
    return raw


def run_one(job: str, arm: str, seed: int, opts, folder: str, train_file: str | None) -> dict:
    from transformers import PrinterCallback

    from hf_stackwise.cli import pipeline as run
    from hf_stackwise.recipe.loader import validate_recipe

    recipe = validate_recipe(arm_recipe(job, arm, seed, opts, folder, train_file))
    prepared = run.prepare(recipe)
    trainer = run.build_trainer(prepared)
    trainer.remove_callback(PrinterCallback)
    load = os.getloadavg()[0]
    start, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    load = (load, os.getloadavg()[0])
    metrics = trainer.evaluate()
    stats = trainer.cache_stats()
    result = {
        "job": job,
        "arm": arm,
        "seed": seed,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "load_average_1min": list(load),  # at the start and at the end of train()
        "steps": trainer.state.global_step,
        "eval_loss": metrics["eval_loss"],
        "cache_hit_rate": stats["hit_rate"],
        "cache_rows_looked_up": stats["rows"],
        "freezes": [{"step": d["step"], "stacks": d["stacks"]} for d in trainer.freeze_decisions()],
    }
    for key in ("accuracy", "f1"):
        if f"eval_{key}" in metrics:
            result[key] = metrics[f"eval_{key}"]
    metric = f"accuracy {result['accuracy']:.4f}" if "accuracy" in result else f"eval loss {result['eval_loss']:.4f}"
    freezes = ", ".join(f"{d['stacks']}@{d['step']}" for d in result["freezes"]) or "none"
    print(
        f"{job:>8} {arm:>10} seed {seed}: {metric}  {seconds:.0f} s wall, {cpu:.0f} s CPU, cache hits "
        f"{stats['hit_rate']:.2f}, freezes {freezes}",
        flush=True,
    )
    return result


def per_seed(full: dict, auto: dict) -> dict:
    """One seed's pair: the time ratios, the metrics of both arms, the freeze steps and the cache's hit rate."""
    keys = [k for k in ("accuracy", "f1", "eval_loss") if k in full]
    return {
        "seed": full["seed"],
        "cpu_ratio": full["cpu_seconds"] / auto["cpu_seconds"],
        "wall_ratio": full["seconds"] / auto["seconds"],
        **{f"{k}_full": full[k] for k in keys},
        **{f"{k}_autofreeze": auto[k] for k in keys},
        "freeze_steps": {str(s): d["step"] for d in auto["freezes"] for s in d["stacks"]},
        "cache_hit_rate": auto["cache_hit_rate"],
    }


def summarize(results: list[dict]) -> dict:
    """Per job: mean times, metric means, the time ratios full / autofreeze and the targets."""
    summary = {}
    for job in sorted({r["job"] for r in results}):
        arms = {arm: sorted((r for r in results if r["job"] == job and r["arm"] == arm), key=lambda r: r["seed"])
                for arm in ARMS}  # fmt: skip
        if not all(arms.values()):
            continue
        mean = {arm: {k: statistics.mean(r[k] for r in rows) for k in ("seconds", "cpu_seconds", "eval_loss")}
                for arm, rows in arms.items()}  # fmt: skip
        for arm, rows in arms.items():
            if "accuracy" in rows[0]:
                mean[arm]["accuracy"] = statistics.mean(r["accuracy"] for r in rows)
                mean[arm]["f1"] = statistics.mean(r["f1"] for r in rows)
        wall = mean["full"]["seconds"] / mean["autofreeze"]["seconds"]
        cpu = mean["full"]["cpu_seconds"] / mean["autofreeze"]["cpu_seconds"]
        entry = {"mean": mean, "wall_ratio_full_over_autofreeze": wall, "cpu_ratio_full_over_autofreeze": cpu}
        if "accuracy" in mean["full"]:
            points = 100 * (mean["autofreeze"]["accuracy"] - mean["full"]["accuracy"])
            entry["accuracy_points_autofreeze_minus_full"] = points
            entry["f1_points_autofreeze_minus_full"] = 100 * (mean["autofreeze"]["f1"] - mean["full"]["f1"])
            quality = points >= -TARGET_ACCURACY_POINTS
        else:
            relative = mean["autofreeze"]["eval_loss"] / mean["full"]["eval_loss"] - 1
            entry["eval_loss_relative_autofreeze_vs_full"] = relative
            quality = relative <= TARGET_LOSS_RELATIVE
        entry["target_met"] = bool(cpu >= TARGET_SPEEDUP and quality)
        entry["per_seed"] = [per_seed(full, auto) for full, auto in zip(*arms.values(), strict=True)]
        entry["autofreeze_cache_hit_rate_mean"] = statistics.mean(r["cache_hit_rate"] for r in arms["autofreeze"])
        summary[job] = entry
    return summary


def main(argv=None) -> None:
    opts = make_parser().parse_args(argv)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers.utils import logging

    torch.set_num_threads(opts.threads)
    logging.set_verbosity_error()
    if opts.merge:
        write(merge(opts.merge), opts.out)
        return
    jobs = opts.only or list(RECIPES)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        train_file = pydoc_corpus(opts.smollm2_rows, opts.smollm2_seq, folder) if "smollm2" in jobs else None
        for seed in range(opts.first_seed, opts.first_seed + opts.seeds):
            for job in jobs:
                order = ARMS if seed % 2 == 0 else ARMS[::-1]
                for arm in order:
                    results.append(run_one(job, arm, seed, opts, folder, train_file if job == "smollm2" else None))
    options = {k: v for k, v in vars(opts).items() if k != "merge"}
    write({"options": options, "levers": LEVERS, "load_average": list(os.getloadavg()), "results": results}, opts.out)


def merge(paths: list[str]) -> dict:
    """The runs of several files (e.g. one process per job, run side by side) in one report."""
    parts = []
    for path in paths:
        with open(path) as fh:
            parts.append(json.load(fh))
    return {
        "options": [p["options"] for p in parts],
        "levers": parts[0].get("levers", LEVERS),
        "load_average": [p["load_average"] for p in parts],
        "merged_from": [os.path.basename(p) for p in paths],
        "results": [r for p in parts for r in p["results"]],
    }


def write(report: dict, out: str) -> None:
    report["summary"] = summary = summarize(report["results"])
    for job, entry in summary.items():
        quality = (
            f"accuracy {entry['accuracy_points_autofreeze_minus_full']:+.2f} points"
            if "accuracy_points_autofreeze_minus_full" in entry
            else f"eval loss {100 * entry['eval_loss_relative_autofreeze_vs_full']:+.2f}%"
        )
        print(
            f"{job}: full / autofreeze wall {entry['wall_ratio_full_over_autofreeze']:.2f}x, CPU "
            f"{entry['cpu_ratio_full_over_autofreeze']:.2f}x; {quality}; target met: {entry['target_met']}"
        )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(report, fh, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
