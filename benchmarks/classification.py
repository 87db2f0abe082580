"""ULMFiT-style gradual unfreezing against all-at-once fine-tuning and a head-only probe, at the same step budget,
on a real text-classification set with the pretrained MiniLM encoder.

Run it (CPU only, offline, after `make assets`; ~10 minutes with the defaults on 2 free cores)::

    python benchmarks/classification.py                  # or: make bench
    python benchmarks/classification.py --seeds 1 --steps 20   # a quick smoke run

The job: `recipes/minilm/classify_ulmfit.yaml` (all-MiniLM-L6-v2, 3 stacks of 2 blocks; standard-library docstrings
labelled by their package, 6 classes, the fixed held-out split of `scripts/demo_assets.py`), run through the same
code as `hf-stackwise train`, with ``--steps`` optimizer steps of ``--batch-size`` texts cut at ``--seq-len`` tokens,
no early stopping (every arm gets the whole budget), one eval at the end on the whole held-out set.

* ``ulmfit``: the recipe's schedule: head alone (15%), top stack + head (20%), everything with discriminative rates
  (``layer_lr_decay: 0.4``); each phase warms up for 10% and decays linearly (slanted triangular).
* ``all``: one phase, everything trains from step 0, the ULMFiT last phase's peak rate, 10% warm-up, linear decay.
* ``head``: one phase, only the classifier head (pooler + classifier) trains, the ULMFiT head phase's rate.

Reported per arm: accuracy and macro-F1 (mean ± sample standard deviation over ``--seeds`` seeds; the seed sets the
head's initialisation, dropout and the batch order) and the time per run (training + the final eval), as wall time and
as the process's CPU time (all threads; on a busy machine the wall time says more about the other jobs). This is a
report, not a test: the numbers are whatever the machine shows.
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

RECIPE = "recipes/minilm/classify_ulmfit.yaml"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run: first-seed, first-seed + 1, ...")
    parser.add_argument("--combine", nargs="+", metavar="JSON", help="only print the table of these --out files")
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per run (default 24)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--arms", default="ulmfit,all,head")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser


def arm_recipe(raw: dict, arm: str, seed: int, opts, output_dir: str) -> dict:
    """The shipped recipe with the arm's schedule, the budget, and no early stopping or checkpoints."""
    raw = copy.deepcopy(raw)
    phases = {p["name"]: p for p in raw["schedule"]}
    if arm == "all":
        last = phases["all"]
        raw["schedule"] = [
            {
                "name": "all",
                "until": 1.0,
                "train": "all",
                "learning_rate": last["learning_rate"],
                "warmup": 0.1,
                "lr_schedule": "linear",
            }
        ]
    elif arm == "head":
        head = phases["head"]
        raw["schedule"] = [
            {
                "name": "head",
                "until": 1.0,
                "train": "none",
                "learning_rate": head["learning_rate"],
                "warmup": 0.1,
                "lr_schedule": "linear",
            }
        ]
    raw.pop("callbacks", None)
    raw["data"]["max_seq_length"] = opts.seq_len
    training = raw["training"]
    training.update(
        output_dir=output_dir,
        max_steps=opts.steps,
        per_device_train_batch_size=opts.batch_size,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=max(1, opts.steps // 4),
        seed=seed,
        disable_tqdm=True,
        use_cpu=True,
    )
    training.pop("save_total_limit", None)
    training.pop("eval_steps", None)
    return raw


def run_one(raw: dict, arm: str, seed: int, opts) -> dict:
    from transformers import PrinterCallback

    from hf_stackwise.cli import pipeline as run
    from hf_stackwise.recipe.loader import validate_recipe

    with tempfile.TemporaryDirectory() as out:
        recipe = validate_recipe(arm_recipe(raw, arm, seed, opts, os.path.join(out, "run")))
        start, cpu = time.perf_counter(), time.process_time()
        prepared = run.prepare(recipe)
        trainer = run.build_trainer(prepared)
        trainer.remove_callback(PrinterCallback)  # the per-run summary line below is the report
        trainer.train()
        metrics = trainer.evaluate()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    result = {"arm": arm, "seed": seed, "seconds": seconds, "cpu_seconds": cpu}
    result.update({k: metrics[f"eval_{k}"] for k in ("accuracy", "f1", "loss")})
    print(
        f"{arm:>7} seed {seed}: accuracy {result['accuracy']:.4f}  macro-F1 {result['f1']:.4f}  {seconds:.0f} s wall, "
        f"{cpu:.0f} s CPU",
        flush=True,
    )
    return result


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def main(argv=None) -> None:
    opts = make_parser().parse_args(argv)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()
    arms = opts.arms.split(",")
    if opts.combine:  # several processes, e.g. one per seed
        results = []
        for path in opts.combine:
            with open(path) as fh:
                results += json.load(fh)["results"]
        seeds = sorted({r["seed"] for r in results})
    else:
        with open(RECIPE) as f:
            raw = yaml.safe_load(f)
        seeds = list(range(opts.first_seed, opts.first_seed + opts.seeds))
        results = [run_one(raw, arm, seed, opts) for seed in seeds for arm in arms]
    print(f"\n{opts.steps} steps x {opts.batch_size} texts x {opts.seq_len} tokens, seeds {seeds}, MiniLM-L6")
    print(f"{'arm':>7} {'accuracy':>17} {'macro-F1':>17} {'wall s/run':>10} {'CPU s/run':>9}")
    for arm in arms:
        rows = [r for r in results if r["arm"] == arm]
        seconds = statistics.mean(r["seconds"] for r in rows)
        cpu = statistics.mean(r["cpu_seconds"] for r in rows)
        print(
            f"{arm:>7} {spread([r['accuracy'] for r in rows]):>17} {spread([r['f1'] for r in rows]):>17} "
            f"{seconds:>10.0f} {cpu:>9.0f}"
        )
    if opts.out and not opts.combine:
        with open(opts.out, "w") as fh:
            json.dump({"options": vars(opts), "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
