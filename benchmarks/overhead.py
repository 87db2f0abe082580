"""Per-step overhead of ``StackwiseTrainer`` against plain ``transformers.Trainer`` on the same job.

Run it (CPU only, offline, about 2-4 minutes with the defaults on 2 cores)::

    make bench                        # or: python benchmarks/overhead.py
    python benchmarks/overhead.py --repeats 2 --steps 12 --drop 3   # a quick smoke run
    python benchmarks/overhead.py --help

The job: a tiny Llama built in-process from a config (default 4 layers, hidden 128, byte-level vocabulary
of 256 so the LM head does not dominate), trained on real prose (``pydoc_data.topics``, UTF-8 bytes as
token ids, cut into sequences of ``--seq-len``), batch ``--batch-size``, AdamW, fp32, constant learning
rate, same seed and data order for both arms. The arms:

* ``baseline``: ``Trainer`` + ``TrainingArguments(lr_scheduler_type="constant")``;
* ``stackwise``: ``StackwiseTrainer`` + ``StackwiseArguments`` with one all-trainable phase
  (``schedule=[{"name": "all", "until": 1.0, "train": "all"}]``, ``blocks_per_stack=1``), i.e. exactly the
  same training, so any difference in step time is the package's overhead.

How it times: a callback records ``time.perf_counter()`` (or, with ``--clock cpu``, the training thread's CPU
time, which a shared machine's other processes disturb far less) at ``on_step_begin`` and ``on_step_end``; the
*step* time is the span between them (forward, backward, clipping, optimizer and LR-scheduler step, zero
grad). The first ``--drop`` steps of each run are discarded as warm-up and the median of the rest is the
run's value. Model construction, Trainer start-up and the final save/log are not timed. The *cycle*
column is the median end-to-end interval between consecutive ``on_step_end`` calls, which adds batch
loading and the per-step log/save/evaluate checks; it is shown for information.

Runs are interleaved (AB, BA, AB, ...) after one untimed warm-up pair, each with a freshly built model
(same init seed) and a fresh output directory under a temporary directory; the thread count is torch's
default unless ``--threads`` is given. With two cores, any other busy process stalls torch's two
threads and makes single runs jump by tens of percent: the summary prints how much CPU other processes
used during the timed runs; rerun on a quiet machine (or compare with ``--threads 1``) when it is high.

How to read it: the table lists each run's median step time (and, inside it, the median time of
``optimizer.step()``, where the stackwise arm's per-unit parameter groups show up); the summary gives the
median over repeats per arm and the ratio stackwise / baseline (target <= 1.02), a 90% bootstrap
interval of that ratio (if it reaches past the target, the machine was too noisy to tell; add
``--repeats``), and the median of the per-repeat ratios (each repeat pairs one baseline and
one stackwise run, which cancels slow drift of the machine). The ``loss`` column is each run's mean
training loss: both arms do the same work, so it should match across all runs. This is a report, not a
test: the exit status is 0 whatever the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

SCHEDULE = [{"name": "all", "until": 1.0, "train": "all"}]
BYTE_VOCAB = 256
TARGET_RATIO = 1.02
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}  # cpu: this thread's CPU time (with --threads 1)
clock = time.perf_counter


from common import cpu_jiffies  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Per-step overhead of StackwiseTrainer (one all-trainable phase) against plain Trainer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--repeats", type=int, default=12, help="timed runs per arm (interleaved AB, BA, ...)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run, warm-up steps included")
    parser.add_argument("--drop", type=int, default=5, help="warm-up steps dropped at the start of each run")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks of the tiny Llama")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size (intermediate size is 4x)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--batch-size", type=int, default=8, help="per-device train batch size")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens (bytes) per sequence")
    parser.add_argument(
        "--optim", default="adamw_torch_fused", help="TrainingArguments.optim (its default), the same for both arms"
    )
    parser.add_argument("--seed", type=int, default=0, help="model init, data order and Trainer seed")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads before the runs; unset: torch's default"
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: perf_counter; cpu: the training thread's CPU time, which other processes on a shared machine "
        "disturb far less (use with --threads 1, where all compute runs in that thread)",
    )
    parser.add_argument("--json", default=None, help="also write the runs and the summary to this JSON file")
    parser.add_argument("--label", default="", help="a note stored in the JSON (e.g. which code version ran)")
    return parser


def pydoc_byte_chunks(seq_len: int) -> list[list[int]]:
    """Real prose (the pydoc topics, one paragraph per line) as UTF-8 byte ids, cut into full sequences."""
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        for block in topics[name].split("\n\n"):
            line = " ".join(block.split())
            if line:
                paragraphs.append(line)
    ids = list("\n".join(paragraphs).encode("utf-8"))
    return [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]


def build_model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=BYTE_VOCAB,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def make_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """``perf_counter`` at the begin and end of every training step, and the span of ``optimizer.step()``."""

        def __init__(self):
            self.begin: list[float] = []
            self.end: list[float] = []
            self.optim: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin.append(clock())

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.optim.append(clock())

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.optim[-1] = clock() - self.optim[-1]

        def on_step_end(self, args, state, control, **kwargs):
            self.end.append(clock())

    return StepTimer()


def run_once(arm: str, args, dataset, output_dir: str) -> dict:
    """One training run of ``arm``; returns the median step and cycle times (ms) after the dropped steps."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from hf_stackwise.trainer import StackwiseArguments, StackwiseTrainer

    common = dict(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-3,
        optim=args.optim,
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    model = build_model(args)
    timer = make_timer()
    if arm == "baseline":
        training_args = TrainingArguments(lr_scheduler_type="constant", **common)
        trainer = Trainer(model=model, args=training_args, train_dataset=dataset, callbacks=[timer])
    else:
        training_args = StackwiseArguments(schedule=SCHEDULE, blocks_per_stack=1, **common)
        trainer = StackwiseTrainer(model=model, args=training_args, train_dataset=dataset, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # it prints the final train metrics of every run
    output = trainer.train()
    if len(timer.begin) != args.steps or len(timer.end) != args.steps:
        raise RuntimeError(f"{arm}: expected {args.steps} timed steps, got {len(timer.begin)}/{len(timer.end)}")
    steps = [e - b for b, e in zip(timer.begin, timer.end)][args.drop :]
    cycles = [e2 - e1 for e1, e2 in zip(timer.end, timer.end[1:])][max(args.drop - 1, 0) :]
    optim = timer.optim[args.drop :]
    result = {
        "arm": arm,
        "step_ms": 1000 * statistics.median(steps),
        "cycle_ms": 1000 * statistics.median(cycles) if cycles else float("nan"),
        "optim_ms": 1000 * statistics.median(optim) if optim else float("nan"),
        "loss": output.training_loss,
        "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
        "param_groups": len(trainer.optimizer.param_groups),
        "lr_scheduler": type(trainer.lr_scheduler).__name__,
    }
    del trainer, model
    return result


def other_load(start: tuple[int, int] | None, own_start: float) -> str:
    """Share of the machine's CPU time that other processes used since ``start`` (this process excluded)."""
    end = cpu_jiffies()
    if start is None or end is None or end[1] == start[1]:
        return "n/a"
    tick = os.sysconf("SC_CLK_TCK")
    own = (sum(os.times()[:2]) - own_start) * tick
    other = max(0.0, (end[0] - start[0]) - own) / (end[1] - start[1])
    return f"{100 * other:.0f}%"


def bootstrap_ratio(base: list[float], stack: list[float], rounds: int = 2000) -> tuple[float, float]:
    """5th and 95th percentiles of median(stack) / median(base) over runs resampled with replacement."""
    import random

    rng = random.Random(0)
    ratios = sorted(
        statistics.median(rng.choices(stack, k=len(stack))) / statistics.median(rng.choices(base, k=len(base)))
        for _ in range(rounds)
    )
    return ratios[int(0.05 * rounds)], ratios[int(0.95 * rounds) - 1]


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min)"
    except OSError:  # not available on this platform
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.repeats < 1 or args.steps < args.drop + 2 or args.drop < 0:
        make_parser().error("need --repeats >= 1, --drop >= 0 and --steps >= --drop + 2")
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)

    import gc
    import platform
    import sys
    import tempfile
    import warnings

    import datasets
    import torch
    import transformers

    import hf_stackwise

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.clock]
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        make_parser().error("--clock cpu measures one thread: give --threads 1")
    started = time.perf_counter()
    chunks = pydoc_byte_chunks(args.seq_len)
    dataset = datasets.Dataset.from_dict({"input_ids": chunks, "labels": chunks})
    probe = build_model(args)
    n_params = sum(p.numel() for p in probe.parameters())
    n_head = probe.lm_head.weight.numel()
    attn = probe.config._attn_implementation
    del probe

    print("StackwiseTrainer per-step overhead vs transformers.Trainer")
    print(f"  python {platform.python_version()}  torch {torch.__version__}  transformers {transformers.__version__}")
    print(f"  datasets {datasets.__version__}  hf_stackwise {hf_stackwise.__version__}  {platform.platform()}")
    print(
        f"  cpu cores {os.cpu_count()}  torch threads {torch.get_num_threads()}  "
        f"interop threads {torch.get_num_interop_threads()}"
    )
    print(
        f"  model: Llama, {args.layers} layers, hidden {args.hidden}, intermediate {4 * args.hidden}, "
        f"{args.heads} heads, attn {attn}, {n_params:,} parameters ({n_head:,} in the LM head)"
    )
    print(f"  vocab {BYTE_VOCAB} (UTF-8 bytes)  data: pydoc_data.topics, {len(chunks):,} sequences of {args.seq_len}")
    print(
        f"  batch {args.batch_size}  seq len {args.seq_len}  fp32  optim {args.optim}  lr constant 1e-3  "
        f"seed {args.seed}"
    )
    print(
        f"  {args.repeats} repeats x 2 arms x {args.steps} steps, first {args.drop} steps of each run dropped, "
        f"order AB BA AB ..."
    )
    print(f"  stackwise schedule {SCHEDULE}, blocks_per_stack=1  clock {args.clock}")
    print(f"  load average at start {load_average()} (other work on the machine makes the numbers noisy)", flush=True)

    results = []
    with tempfile.TemporaryDirectory(prefix="stackwise-bench-") as tmp:
        warm = argparse.Namespace(**{**vars(args), "steps": args.drop + 2})
        for arm in ("baseline", "stackwise"):
            info = run_once(arm, warm, dataset, os.path.join(tmp, f"warmup-{arm}"))
            print(
                f"  warm-up {arm}: {info['optimizer']}, {info['param_groups']} param groups, {info['lr_scheduler']}",
                flush=True,
            )
            gc.collect()
        jiffies, own_cpu = cpu_jiffies(), sum(os.times()[:2])
        print()
        print(f"{'repeat':>6}  {'arm':<9}  {'step ms':>8}  {'optim ms':>8}  {'cycle ms':>8}  {'loss':>10}")
        for repeat in range(args.repeats):
            order = ("baseline", "stackwise") if repeat % 2 == 0 else ("stackwise", "baseline")
            for arm in order:
                result = run_once(arm, args, dataset, os.path.join(tmp, f"{repeat:02d}-{arm}"))
                result["repeat"] = repeat
                results.append(result)
                print(
                    f"{repeat:>6}  {arm:<9}  {result['step_ms']:8.2f}  {result['optim_ms']:8.2f}  "
                    f"{result['cycle_ms']:8.2f}  {result['loss']:10.6f}",
                    flush=True,
                )
                gc.collect()

    others = other_load(jiffies, own_cpu)

    def arm_values(arm: str, key: str) -> list[float]:
        return [r[key] for r in results if r["arm"] == arm]

    base = statistics.median(arm_values("baseline", "step_ms"))
    stack = statistics.median(arm_values("stackwise", "step_ms"))
    base_cycle = statistics.median(arm_values("baseline", "cycle_ms"))
    stack_cycle = statistics.median(arm_values("stackwise", "cycle_ms"))
    base_optim = statistics.median(arm_values("baseline", "optim_ms"))
    stack_optim = statistics.median(arm_values("stackwise", "optim_ms"))
    low_ci, high_ci = bootstrap_ratio(arm_values("baseline", "step_ms"), arm_values("stackwise", "step_ms"))
    by_repeat: dict[int, dict[str, float]] = {}
    for r in results:
        by_repeat.setdefault(r["repeat"], {})[r["arm"]] = r["step_ms"]
    paired = statistics.median(v["stackwise"] / v["baseline"] for v in by_repeat.values())
    spread = {
        arm: (min(arm_values(arm, "step_ms")), max(arm_values(arm, "step_ms"))) for arm in ("baseline", "stackwise")
    }
    losses = [r["loss"] for r in results]
    loss_gap = max(losses) - min(losses)
    ratio = stack / base

    print()
    print(f"{'':<22}  {'step ms':>8}  {'min..max':>15}  {'optim ms':>8}  {'cycle ms':>8}")
    rows = (("baseline", base, base_optim, base_cycle), ("stackwise", stack, stack_optim, stack_cycle))
    for arm, value, optim, cycle in rows:
        low, high = spread[arm]
        print(f"median {arm:<15}  {value:8.2f}  {low:6.2f}..{high:<7.2f}  {optim:8.2f}  {cycle:8.2f}")
    verdict = "within" if ratio <= TARGET_RATIO else "ABOVE"
    print(f"ratio stackwise/baseline   {ratio:.4f}  ({verdict} the {TARGET_RATIO} target; median step times)")
    if high_ci <= TARGET_RATIO:
        reading = "all of it within the target"
    elif low_ci > TARGET_RATIO:
        reading = "all of it above the target"
    else:
        reading = "straddles the target: too noisy to tell, add --repeats"
    print(f"  90% bootstrap interval   {low_ci:.4f}..{high_ci:.4f}  (runs resampled; {reading})")
    print(f"median per-repeat ratio    {paired:.4f}  (each repeat's stackwise / baseline run)")
    print(f"optimizer.step difference  {stack_optim - base_optim:+.2f} ms  (stackwise - baseline, medians)")
    print(f"cycle ratio                {stack_cycle / base_cycle:.4f}  (information: includes data loading)")
    same = "identical" if loss_gap == 0 else f"max difference {loss_gap:.3g}"
    print(f"training loss, all runs    {same}")
    print(f"other processes' CPU use   {others} of the machine during the timed runs (0% = quiet machine)")
    print(f"total wall time            {time.perf_counter() - started:.1f} s, load average at end {load_average()}")
    sys.stdout.flush()
    if args.json:
        import json

        summary = {
            "label": args.label,
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "label")},
            "torch_threads": torch.get_num_threads(),
            "median_step_ms": {"baseline": base, "stackwise": stack},
            "ratio": ratio,
            "ratio_90ci": [low_ci, high_ci],
            "paired_ratio": paired,
            "target": TARGET_RATIO,
            "other_processes_cpu": others,
            "load_average_end": load_average(),
            "loss_gap": loss_gap,
            "runs": results,
        }
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
