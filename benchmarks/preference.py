"""DPO on SmolLM2-135M-Instruct: what the reference model costs, TRL's way and the three stackwise ways.

Run it (CPU only, offline, after `make assets`)::

    python benchmarks/preference.py      # or: make bench (3 seeds x 5 arms; not yet timed on quiet cores)
    python benchmarks/preference.py --seeds 0 --steps 4 --batch-size 2 --eval-pairs 8 \
        --out benchmarks/results/preference-reduced.json    # the reduced run committed so far

The job: the preference pairs of `make assets` (questions on Python's documentation; chosen: the real answer;
rejected: another topic's answer or the real one with its words shuffled), pairs cut to ``--seq-len`` tokens, batch
``--batch-size`` pairs, ``--epochs`` passes over ``steps × batch / epochs`` training pairs (so ``precompute``'s
pass covers what training reads), AdamW, fp32, ``OMP_NUM_THREADS=1``. Every arm runs in its own process (peak RSS
is the process's), the arms interleaved and their order rotated per seed; each arm sees the same pairs in the same
order:

* ``trl-full``: TRL's ``DPOTrainer``, every parameter trains, the reference a full copy loaded by TRL;
* ``trl-lora``: TRL's ``DPOTrainer`` with a LoRA adapter (r 8, all linear layers), the reference the base with the
  adapter disabled;
* ``copy`` / ``precompute`` / ``shared``: ``StackwiseDPOTrainer`` training the two top stacks (top stack for the
  first half, then the top two; the head, tied to the embeddings, frozen), the reference held as TRL's frozen
  full copy, as log-probs computed before training, or sharing the frozen prefix (initial copies of stacks 3-4
  and the final norm only, forward from block 24, then 18).

The activation cache does not serve DPO (TRL's collator concatenates chosen and rejected rows with no row ids), so
there is no cache arm; the JSON says why. Reported per arm and seed: the median step time (``on_step_begin`` to
``on_step_end``, the first step dropped), the process's peak RSS, the reference's own bytes, the time of the
precompute pass, and the held-out DPO loss, reward accuracy and margin (``--eval-pairs`` held-out pairs). The
target of issue 21: ``shared`` ≤ 0.6× the step time and ≤ 0.6× the peak memory of ``copy`` at equal held-out
reward accuracy. A report, not a test: the numbers are whatever the machine shows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, ".cache", "models", "SmolLM2-135M-Instruct")
TRAIN = os.path.join(ROOT, ".cache", "data", "pydoc_pref_train.jsonl")
EVAL = os.path.join(ROOT, ".cache", "data", "pydoc_pref_eval.jsonl")
ARMS = ("trl-full", "trl-lora", "copy", "precompute", "shared")
TOP_STACKS = [
    {"name": "top", "until": 0.5, "train": ["top"]},
    {"name": "top-two", "until": 1.0, "train": [3, 4]},
]
LEARNING_RATES = {"trl-full": 1e-5, "trl-lora": 5e-4}  # the stackwise arms: 5e-5 (fewer parameters train)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per arm (default 24)")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    parser.add_argument("--seq-len", type=int, default=128, help="prompt + answer tokens (TRL's max_length)")
    parser.add_argument("--eval-pairs", type=int, default=32)
    parser.add_argument(
        "--epochs", type=int, default=2, help="passes over the training pairs: steps x batch / epochs pairs are used"
    )
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "preference.json"))
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # worker mode: run one arm, print its JSON row
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def pairs(path: str, count: int | None = None):
    from datasets import load_dataset

    dataset = load_dataset("json", data_files=path, split="train")
    return dataset.select(range(min(count, len(dataset)))) if count else dataset


class StepTimes:
    """``on_step_begin`` → ``on_step_end`` wall times (a TrainerCallback built lazily: transformers imports late)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Callback(TrainerCallback):
            def __init__(self):
                self.times, self.start = [], None

            def on_step_begin(self, args, state, control, **kwargs):
                self.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                self.times.append(time.perf_counter() - self.start)

        return Callback()


def common_args(opts, output_dir: str, arm: str) -> dict:
    return {
        "output_dir": output_dir,
        "max_steps": opts.steps,
        "per_device_train_batch_size": opts.batch_size,
        "per_device_eval_batch_size": opts.batch_size,
        "learning_rate": LEARNING_RATES.get(arm, 5e-5),
        "max_length": opts.seq_len,
        "logging_steps": opts.steps,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "seed": opts.seed,
        "data_seed": 0,
        "disable_tqdm": True,
        "gradient_checkpointing": False,
        "bf16": False,
        "beta": 0.1,
    }


def build(arm: str, opts, output_dir: str):
    """The trainer of one arm, and the reference's own bytes."""
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    train, held_out = pairs(TRAIN, max(1, opts.steps * opts.batch_size // opts.epochs)), pairs(EVAL, opts.eval_pairs)
    if arm.startswith("trl-"):
        peft_config = None
        if arm == "trl-lora":
            from peft import LoraConfig

            peft_config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
        args = trl.DPOConfig(**common_args(opts, output_dir, arm))
        trainer = trl.DPOTrainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=held_out,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        ref = trainer.ref_model
        ref_bytes = sum(p.numel() * p.element_size() for p in ref.parameters()) if ref is not None else 0
        return trainer, ref_bytes
    from hf_stackwise.integrations.dpo_trainer import StackwiseDPOConfig, StackwiseDPOTrainer

    args = StackwiseDPOConfig(
        **common_args(opts, output_dir, arm), blocks_per_stack=6, schedule=TOP_STACKS, reference=arm
    )
    trainer = StackwiseDPOTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=held_out, processing_class=tokenizer
    )
    return trainer, trainer.reference_bytes


def run_arm(arm: str, opts) -> dict:
    import resource

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        trainer, ref_bytes = build(arm, opts, out)
        setup = time.perf_counter() - start
        steps = StepTimes()
        trainer.add_callback(steps)
        trainer.train()
        metrics = trainer.evaluate()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    timed = steps.times[1:] or steps.times
    return {
        "arm": arm,
        "seed": opts.seed,
        "step_seconds": statistics.median(timed),
        "setup_seconds": setup,  # model load, tokenization, and for `precompute` the reference pass
        "peak_rss_mib": peak_kib / 1024,
        "reference_mib": ref_bytes / 2**20,
        "eval_loss": metrics.get("eval_loss"),
        "eval_reward_accuracy": metrics.get("eval_rewards/accuracies"),
        "eval_reward_margin": metrics.get("eval_rewards/margins"),
    }


def summarize(rows: list[dict]) -> dict:
    by_arm: dict[str, dict] = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        by_arm[arm] = {k: statistics.median(r[k] for r in mine) for k in mine[0] if k not in ("arm", "seed")}
    if "shared" in by_arm and "copy" in by_arm:
        shared, copy = by_arm["shared"], by_arm["copy"]
        by_arm["shared"]["step_ratio_vs_copy"] = shared["step_seconds"] / copy["step_seconds"]
        by_arm["shared"]["peak_rss_ratio_vs_copy"] = shared["peak_rss_mib"] / copy["peak_rss_mib"]
    return by_arm


def main(argv=None) -> None:
    opts = make_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if opts.arm:  # worker
        print("ROW " + json.dumps(run_arm(opts.arm, opts)), flush=True)
        return
    if not os.path.isdir(MODEL) or not os.path.isfile(TRAIN):
        raise SystemExit("run `make assets` first (SmolLM2-135M-Instruct and the preference pairs)")
    arms = opts.arms.split(",")
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false")
    for turn, seed in enumerate(int(s) for s in opts.seeds.split(",")):
        order = arms[turn % len(arms) :] + arms[: turn % len(arms)]  # interleaved, rotated per seed
        for arm in order:
            cmd = [sys.executable, __file__, "--arm", arm, "--seed", str(seed), "--steps", str(opts.steps)]
            cmd += ["--batch-size", str(opts.batch_size), "--seq-len", str(opts.seq_len)]
            cmd += ["--eval-pairs", str(opts.eval_pairs), "--epochs", str(opts.epochs)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{arm} (seed {seed}) failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(next(line[4:] for line in out.stdout.splitlines() if line.startswith("ROW "))))
            print(json.dumps(rows[-1]), flush=True)
    summary = summarize(rows)
    print(f"\n{'arm':>10} {'step s':>7} {'peak RSS MiB':>12} {'ref MiB':>8} {'acc':>5} {'margin':>8}")
    for arm, s in summary.items():
        print(
            f"{arm:>10} {s['step_seconds']:>7.2f} {s['peak_rss_mib']:>12.0f} {s['reference_mib']:>8.1f} "
            f"{s['eval_reward_accuracy']:>5.2f} {s['eval_reward_margin']:>8.4f}"
        )
    options = {k: v for k, v in vars(opts).items() if k not in ("arm", "seed", "out")}
    cache = (
        "not measured: the activation cache refuses data.task dpo (TRL's preference collator concatenates chosen "
        "and rejected rows, padded per batch, with no row ids)"
    )
    os.makedirs(os.path.dirname(opts.out), exist_ok=True)
    with open(opts.out, "w") as fh:
        json.dump({"options": options, "threads": 1, "cache": cache, "rows": rows, "median": summary}, fh, indent=1)
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
