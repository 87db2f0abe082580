"""Chat SFT of SmolLM2-135M-Instruct: gradual unfreezing against full fine-tuning and LoRA at the same step
budget, measured by the loss on held-out answers.

Run it (CPU only, offline, after `make assets`; ~10-12 minutes with the defaults on 2 cores)::

    python benchmarks/sft.py                      # or: make bench
    python benchmarks/sft.py --steps 3 --eval-samples 4   # a quick smoke run

The job: the chat SFT set of `make assets` (questions on Python's documentation, `messages` JSON lines, a fixed
held-out split), SmolLM2's own chat template, the loss on the assistant turns only (`data.loss_on: completion`),
conversations truncated to ``--seq-len`` tokens, batch ``--batch-size``, AdamW, fp32, one seed. Every arm runs
through the recipe path (`hf_stackwise.cli.pipeline`, as `hf-stackwise train` does), with the same data order:

* ``unfreeze``: top stack (+ tied embeddings / head) for 30% of the steps, then the upper half, then all with
  discriminative rates (``layer_lr_decay: 0.8``) — the shape of `recipes/smollm2-135m/sft_unfreeze.yaml`.
* ``full``: every parameter from step 0.
* ``lora``: a LoRA adapter (r 8, all linear layers) on every stack, the base frozen.

Reported per arm: the held-out answer loss (mean cross-entropy on the assistant tokens of the eval
conversations) before and after, the trainable parameters of the last phase, and the wall time. A report, not a
test: the numbers are whatever the machine shows, whichever way they come out.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, ".cache", "models", "SmolLM2-135M-Instruct")
TRAIN = os.path.join(ROOT, ".cache", "data", "pydoc_chat_train.jsonl")
EVAL = os.path.join(ROOT, ".cache", "data", "pydoc_chat_eval.jsonl")

SCHEDULES = {
    "unfreeze": [
        {"name": "top", "until": 0.3, "train": ["top"], "head": "train", "learning_rate": 2.0e-4},
        {"name": "upper-half", "until": 0.6, "train": [3, 4], "learning_rate": 1.0e-4, "layer_lr_decay": 0.5},
        {"name": "all", "until": 1.0, "train": "all", "learning_rate": 5.0e-5, "layer_lr_decay": 0.8},
    ],
    "full": [{"name": "full", "until": 1.0, "train": "all", "learning_rate": 5.0e-5}],
    "lora": [{"name": "lora", "until": 1.0, "train": [0, 1, 2, 3, 4], "adapter": "lora", "learning_rate": 1.0e-3}],
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per arm (default 12)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per conversation (truncated)")
    parser.add_argument("--eval-samples", type=int, default=16, help="held-out conversations (default 16)")
    parser.add_argument("--arms", default="unfreeze,full,lora")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser


def recipe(arm: str, opts, output_dir: str) -> dict:
    raw = {
        "model": {"name_or_path": MODEL, "dtype": "float32"},
        "rack": {"blocks_per_stack": 6},
        "data": {
            "task": "sft",
            "train": {"path": "json", "data_files": TRAIN},
            "eval": {"path": "json", "data_files": EVAL},
            "max_eval_samples": opts.eval_samples,
            "max_seq_length": opts.seq_len,
            "loss_on": "completion",
        },
        "schedule": SCHEDULES[arm],
        "training": {
            "output_dir": output_dir,
            "max_steps": opts.steps,
            "per_device_train_batch_size": opts.batch_size,
            "per_device_eval_batch_size": 8,
            "logging_steps": max(1, opts.steps // 5),
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
            "seed": 0,
            "data_seed": 0,
            "disable_tqdm": True,
        },
    }
    if arm == "lora":
        raw["adapters"] = {"r": 8, "alpha": 16}
    return raw


def run_arm(arm: str, opts, with_before: bool) -> dict:
    from hf_stackwise.cli import pipeline as run
    from hf_stackwise.recipe.loader import validate_recipe

    with tempfile.TemporaryDirectory() as out:
        prepared = run.prepare(validate_recipe(recipe(arm, opts, out)))
        trainer = run.build_trainer(prepared)
        before = trainer.evaluate()["eval_loss"] if with_before else None
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        after = trainer.evaluate()["eval_loss"]
        trainable = trainer.state.log_history[-1].get("trainable_params")
    return {"arm": arm, "before": before, "after": after, "train_seconds": seconds, "trainable_params": trainable}


def main(argv=None) -> None:
    opts = make_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if not os.path.isdir(MODEL) or not os.path.isfile(TRAIN):
        raise SystemExit("run `make assets` first (SmolLM2-135M-Instruct and the chat SFT set)")
    rows = []
    for index, arm in enumerate(opts.arms.split(",")):
        rows.append(run_arm(arm, opts, with_before=index == 0))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["before"]
    print(
        f"\nheld-out answer loss before training: {base:.4f}  ({opts.steps} steps of {opts.batch_size} conversations)"
    )
    print(f"{'arm':>9} {'answer loss':>11} {'change':>8} {'trainable (last phase)':>23} {'train time':>10}")
    for row in rows:
        change = row["after"] - base
        print(
            f"{row['arm']:>9} {row['after']:>11.4f} {change:>+8.4f} {row['trainable_params'] or 0:>23,} "
            f"{row['train_seconds']:>9.0f}s"
        )
    if opts.out:
        with open(opts.out, "w") as fh:
            json.dump({"options": vars(opts), "rows": rows}, fh)


if __name__ == "__main__":
    main()
