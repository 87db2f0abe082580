"""DPO on SmolLM2-135M-Instruct: what the reference model costs, TRL's way and the three stackwise ways, with the
activation cache off and on.

Run it (CPU only, offline, after `make assets`)::

    python benchmarks/preference.py      # or: make bench (3 seeds x 7 arms; over an hour on 2 busy cores)
    # the committed runs (a busy machine: the cache arms with 3 seeds, the other arms with one):
    python benchmarks/preference.py --arms copy,shared,copy-cache,shared-cache --eval-pairs 4 \
        --out benchmarks/results/preference-cache.json
    python benchmarks/preference.py --arms trl-full,trl-lora,precompute,copy --seeds 0 --eval-pairs 4 \
        --out benchmarks/results/preference-arms.json

The job: the preference pairs of `make assets` (questions on Python's documentation; chosen: the real answer;
rejected: another topic's answer or the real one with its words shuffled), pairs cut to ``--seq-len`` tokens and
every row padded to it (all arms: a row's inputs then repeat at every visit), batch ``--batch-size`` pairs,
``--epochs`` passes over ``steps × batch / epochs`` training pairs (so ``precompute``'s pass covers what training
reads), AdamW, fp32, ``OMP_NUM_THREADS=1``. Every arm runs in its own process (peak RSS is the process's), the arms
interleaved and their order rotated per seed; each arm sees the same pairs in the same order:

* ``trl-full``: TRL's ``DPOTrainer``, every parameter trains, the reference a full copy loaded by TRL;
* ``trl-lora``: TRL's ``DPOTrainer`` with a LoRA adapter (r 8, all linear layers), the reference the base with the
  adapter disabled;
* ``copy`` / ``precompute`` / ``shared``: ``StackwiseDPOTrainer`` training the two top stacks (top stack for the
  first half, then the top two; the head, tied to the embeddings, frozen), the reference held as TRL's frozen
  full copy, as log-probs computed before training, or sharing the frozen prefix (initial copies of stacks 3-4
  and the final norm only, forward from block 24, then 18); cache off;
* ``copy-cache`` / ``shared-cache``: the same with ``cache.activations: true`` (pair i stored as rows 2i and
  2i + 1): from the second visit of a pair the policy's frozen prefix is replayed, and under ``shared`` the
  reference's forward starts from that replayed state too.

The machine may be busy: besides wall times, each step's process CPU time is recorded, and the 1-minute load
average at each arm's start and end. Reported per arm and seed: the median step time, wall and CPU
(``on_step_begin`` to ``on_step_end``, the first step dropped), the same over the steps whose rows all came from the
cache (``hit_step_*``; every step with the cache off) and over the second phase (``phase2_*``: the same steps in
every arm; with ``--epochs 2`` a cache arm serves all of them from the store), the CPU time inside TRL's fused
LM-head log-prob (forward and backward: the part neither the cache nor ``shared`` removes), the mean over all
steps, the cache hit rate, the
process's peak RSS and what it is made of (runtime, weights, reference, optimizer state, gradients, cache, the
rest), the reference's own bytes, the setup time (with ``precompute``'s pass), and the held-out DPO loss, reward
accuracy and margin (``--eval-pairs`` held-out pairs). The target of issue 21: ``shared`` ≤ 0.6× the step time and
≤ 0.6× the peak memory of ``copy`` at equal held-out reward accuracy; ``memory_projection`` computes (labelled as
such) how the peak ratio moves as the model grows. A report, not a test: the numbers are whatever the machine shows.
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
ARMS = ("trl-full", "trl-lora", "copy", "precompute", "shared", "copy-cache", "shared-cache")
TOP_STACKS = [
    {"name": "top", "until": 0.5, "train": ["top"]},
    {"name": "top-two", "until": 1.0, "train": [3, 4]},
]
LEARNING_RATES = {"trl-full": 1e-5, "trl-lora": 5e-4}  # the stackwise arms: 5e-5 (fewer parameters train)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per arm (default 6)")
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per step")
    parser.add_argument(
        "--seq-len", type=int, default=96, help="prompt + answer tokens (TRL's max_length; every row padded to it)"
    )
    parser.add_argument("--eval-pairs", type=int, default=8)
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


HEAD_CPU = [0.0]  # process CPU seconds inside TRL's fused LM-head log-prob (forward and backward), since the start


def time_the_head() -> None:
    """Count the CPU time of TRL's ``ChunkedLogProbFunction`` (the LM head and its log-softmax: what the cache and
    ``shared`` do not remove) into :data:`HEAD_CPU`."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction as head

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                HEAD_CPU[0] += time.process_time() - start

        return staticmethod(wrapper)

    head.forward, head.backward = timed(head.forward), timed(head.backward)


def rss_mib() -> float:
    """The process's resident memory now (``/proc/self/statm``)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class StepTimes:
    """``on_step_begin`` → ``on_step_end`` wall and process CPU times, and the optimizer's state bytes at the end
    (a TrainerCallback built lazily: transformers imports late)."""

    def __new__(cls, trainer):
        from transformers import TrainerCallback

        counts = getattr(trainer, "_cache_counts", [0, 0])  # rows served from the cache, rows looked up

        class Callback(TrainerCallback):
            def __init__(self):
                self.times, self.cpu, self.head, self.missed, self.start = [], [], [], [], None
                self.optimizer_bytes = self.grad_bytes = 0

            def on_step_begin(self, args, state, control, **kwargs):
                self.start = (time.perf_counter(), time.process_time(), HEAD_CPU[0], counts[1] - counts[0])

            def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
                self.times.append(time.perf_counter() - self.start[0])
                self.cpu.append(time.process_time() - self.start[1])
                self.head.append(HEAD_CPU[0] - self.start[2])
                self.missed.append(counts[1] - counts[0] > self.start[3])  # some row ran the prefix
                if optimizer is not None:  # the largest over the run (a later phase trains more)
                    held = [t for st in optimizer.state.values() for t in st.values() if hasattr(t, "numel")]
                    self.optimizer_bytes = max(self.optimizer_bytes, sum(t.numel() * t.element_size() for t in held))
                    trained = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
                    grads = sum(p.numel() * p.element_size() for p in trained)
                    self.grad_bytes = max(self.grad_bytes, grads)

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
        "pad_to_multiple_of": opts.seq_len,  # every arm: a row's inputs do not depend on its batch-mates
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

    way, _, cache = arm.partition("-")
    args = StackwiseDPOConfig(
        **common_args(opts, output_dir, arm),
        blocks_per_stack=6,
        schedule=TOP_STACKS,
        reference=way,
        activation_cache={"activations": cache == "cache"},
    )
    trainer = StackwiseDPOTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=held_out, processing_class=tokenizer
    )
    return trainer, trainer.reference_bytes


def run_arm(arm: str, opts) -> dict:
    import resource

    import torch

    torch.set_num_threads(1)
    import transformers  # noqa: F401 - the runtime: what every arm holds before any weight
    import trl  # noqa: F401

    time_the_head()
    runtime = rss_mib()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        trainer, ref_bytes = build(arm, opts, out)
        setup = time.perf_counter() - start
        built = rss_mib()
        steps = StepTimes(trainer)
        trainer.add_callback(steps)
        started = time.perf_counter(), time.process_time()
        trainer.train()
        train_wall, train_cpu = time.perf_counter() - started[0], time.process_time() - started[1]
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # before evaluate (same batch, no backward)
        metrics = trainer.evaluate()
        policy = trainer.accelerator.unwrap_model(trainer.model)
        weights = sum(t.numel() * t.element_size() for t in (*policy.parameters(), *policy.buffers()))
        cache = trainer.cache_stats() if hasattr(trainer, "cache_stats") else {"hit_rate": 0.0, "bytes": 0}
    timed, cpu, head = (t[1:] or t for t in (steps.times, steps.cpu, steps.head))
    hit = [i for i, missed in enumerate(steps.missed) if i and not missed] or range(1, len(steps.times))
    late = range(opts.steps // 2, len(steps.times))  # the second phase (t >= 0.5): the same steps in every arm
    peak = peak_kib / 1024
    optimizer, grads = steps.optimizer_bytes / 2**20, steps.grad_bytes / 2**20
    return {
        "arm": arm,
        "seed": opts.seed,
        "step_seconds": statistics.median(timed),
        "step_cpu_seconds": statistics.median(cpu),  # the process's CPU time: what a busy machine does not inflate
        "step_head_cpu_seconds": statistics.median(head),  # of which in the LM head's log-prob (fwd + bwd)
        # the second phase's steps: the comparison across arms (with --epochs 2 a cache arm serves every row of
        # them from the store, filled by the first phase)
        "phase2_step_seconds": statistics.median(steps.times[i] for i in late),
        "phase2_step_cpu_seconds": statistics.median(steps.cpu[i] for i in late),
        "phase2_step_head_cpu_seconds": statistics.median(steps.head[i] for i in late),
        "phase2_all_hits": not any(steps.missed[i] for i in late),
        # the steps (first dropped) whose every row came from the cache (with the cache off: every step)
        "hit_step_seconds": statistics.median(steps.times[i] for i in hit),
        "hit_step_cpu_seconds": statistics.median(steps.cpu[i] for i in hit),
        "hit_step_head_cpu_seconds": statistics.median(steps.head[i] for i in hit),
        "hit_steps": len(hit),
        "mean_step_seconds": train_wall / opts.steps,  # every step, misses of the cache included
        "mean_step_cpu_seconds": train_cpu / opts.steps,
        "setup_seconds": setup,  # model load, tokenization, and for `precompute` the reference pass
        "load_average_1min": load,  # at the arm's start: other processes on the machine
        "load_average_1min_end": os.getloadavg()[0],
        "peak_rss_mib": peak,
        "reference_mib": ref_bytes / 2**20,
        "cache_hit_rate": cache["hit_rate"],
        "memory_mib": {  # what the peak (during training) is made of
            "runtime": runtime,  # python, torch, transformers, trl imported (RSS before the model loads)
            "weights": weights / 2**20,  # the policy's parameters and buffers
            "reference": ref_bytes / 2**20,  # the reference's own tensors
            "optimizer_state": optimizer,  # AdamW's two moments of everything the optimizer holds
            "gradients": grads,  # the largest trainable set's gradients
            "activation_cache": cache["bytes"] / 2**20,
            # the rest of the peak: activations of the step, allocator slack, data and tokenizer, load transients
            "activations_and_rest": peak
            - runtime
            - (weights + ref_bytes + cache["bytes"]) / 2**20
            - optimizer
            - grads,
            "after_build": built,  # RSS with the trainer built (model, reference, data), before the first step
        },
        "eval_loss": metrics.get("eval_loss"),
        "eval_reward_accuracy": metrics.get("eval_rewards/accuracies"),
        "eval_reward_margin": metrics.get("eval_rewards/margins"),
        "per_step": {"wall": steps.times, "cpu": steps.cpu, "head_cpu": steps.head, "missed": steps.missed},
    }


def _median(values: list):
    if isinstance(values[0], dict):
        return {k: statistics.median(v[k] for v in values) for k in values[0]}
    return statistics.median(values)


def summarize(rows: list[dict]) -> dict:
    """Per arm, the median over seeds of every field; each stackwise arm's ratios to ``copy`` (the full-copy arm
    training the same stacks, cache off)."""
    by_arm: dict[str, dict] = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        skip = ("arm", "seed", "per_step")
        by_arm[arm] = {k: _median([r[k] for r in mine]) for k in mine[0] if k not in skip}
    copy = by_arm.get("copy")
    for arm, s in by_arm.items():
        if copy is None or arm.startswith("trl-") or arm == "copy":
            continue
        keys = ("step_seconds", "step_cpu_seconds", "phase2_step_seconds", "phase2_step_cpu_seconds")
        for key in (*keys, "mean_step_seconds", "mean_step_cpu_seconds", "peak_rss_mib"):
            s[f"{key}_ratio_vs_copy"] = s[key] / copy[key]
        # the second phase's CPU time outside the LM head's log-prob (the part the cache and `shared` act on)
        rest = s["phase2_step_cpu_seconds"] - s["phase2_step_head_cpu_seconds"]
        s["phase2_step_cpu_without_head_ratio_vs_copy"] = rest / (
            copy["phase2_step_cpu_seconds"] - copy["phase2_step_head_cpu_seconds"]
        )
    return by_arm


def memory_projection(summary: dict) -> dict | None:
    """A computed projection (not a measurement): the ``shared`` / ``copy`` peak-memory ratio for a model ``k`` times
    larger with the same schedule shape (the same share of blocks trains), assuming everything but the runtime grows
    k-fold (activations too: they grow more slowly than the weights at a fixed batch and length, so this overstates
    them and the ratio errs towards 1); and the bound from tensors alone (weights, reference, optimizer state,
    gradients)."""
    if "copy" not in summary or "shared" not in summary:
        return None
    copy, shared = summary["copy"]["memory_mib"], summary["shared"]["memory_mib"]
    runtime = copy["runtime"]
    scaled = {arm: summary[arm]["peak_rss_mib"] - runtime for arm in ("copy", "shared")}

    def tensors(m: dict) -> float:
        return m["weights"] + m["reference"] + m["optimizer_state"] + m["gradients"]

    return {
        "note": "computed from the measured medians, not measured: ratio(k) = (runtime + k * (shared peak - runtime)) "
        "/ (runtime + k * (copy peak - runtime))",
        "runtime_mib": runtime,
        "ratio_by_scale": {
            str(k): (runtime + k * scaled["shared"]) / (runtime + k * scaled["copy"]) for k in (1, 10, 100, 1000)
        },
        "ratio_limit": scaled["shared"] / scaled["copy"],
        "ratio_tensors_only": tensors(shared) / tensors(copy),
    }


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
    began, load = time.perf_counter(), os.getloadavg()[0]
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
    head = f"{'arm':>12} {'step s':>7} {'cpu s':>6} {'ph2 cpu':>7} {'hit':>5} {'peak RSS MiB':>12} {'ref MiB':>8}"
    print(f"\n{head} {'acc':>5} {'margin':>8}")
    for arm, s in summary.items():
        print(
            f"{arm:>12} {s['step_seconds']:>7.2f} {s['step_cpu_seconds']:>6.2f} {s['phase2_step_cpu_seconds']:>7.2f} "
            f"{s['cache_hit_rate']:>5.2f} {s['peak_rss_mib']:>12.0f} {s['reference_mib']:>8.1f} "
            f"{s['eval_reward_accuracy']:>5.2f} {s['eval_reward_margin']:>8.4f}"
        )
    options = {k: v for k, v in vars(opts).items() if k not in ("arm", "seed", "out")}
    cache = (
        "copy-cache / shared-cache: cache.activations true; pair i is stored as rows 2i (chosen) and 2i + 1 "
        "(rejected); every arm pads rows to --seq-len, so a row's inputs repeat at every visit"
    )
    result = {
        "options": options,
        "threads": 1,
        "cache": cache,
        "load_average_1min_at_start": load,
        "load_average_1min_at_end": os.getloadavg()[0],
        "wall_seconds": time.perf_counter() - began,
        "rows": rows,
        "median": summary,
        "memory_projection": memory_projection(summary),
    }
    os.makedirs(os.path.dirname(opts.out), exist_ok=True)
    with open(opts.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
