"""Cost of a phase transition on a real model, as a multiple of the median training step of the same run.

Run it (CPU only, offline; a few minutes with the defaults on 2 idle cores)::

    make bench                          # or: python benchmarks/transition.py
    python benchmarks/transition.py --steps 10 --drop 1   # a quick smoke run

The job: SmolLM2-135M-Instruct from ``.cache/models`` (30 blocks, fp32, tied embeddings; ``make assets``
puts it there), stacks of 6 blocks, on real prose (``pydoc_data.topics`` tokenized by the model's
tokenizer, rows of ``--seq-len`` tokens), batch ``--batch-size``, AdamW, and a schedule that unfreezes the
rack from the top in five phases (``top`` → ``upper`` → ``middle`` → ``lower`` → ``all``): four transitions,
each with most of the model frozen on one side of it.

What is timed: every call of ``StackwiseTrainer._apply_phase`` that changes the phase — the frozen check of
the phase that ends (a checksum of every parameter it froze), the ``requires_grad`` flips and gradient drops,
the trainable ⊆ optimized check and the checksums of the parameters the new phase freezes (those frozen on
both sides reuse the checksum just verified). The *step* is the span from ``on_step_begin`` to
``on_step_end`` (forward, backward, optimizer); its median excludes the first ``--drop`` steps and the steps
that began a phase. The table gives each transition's time, the part spent in checksums, and the ratio to
the median step (target < 1). For comparison, the former check — a float64 copy of every frozen tensor
summed with its squares, on both sides of the transition — is timed on the same tensors right after each
transition (outside the timed window). The checksums run on one thread, the steps on torch's pool: on a
machine busy with other work the steps slow down more than the checksums, so read the ratio with the
printed load average (idle, the checksums take about 0.1 s per 128 MB of frozen weights). A report, not a
test: the exit status is 0 whatever the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

SCHEDULE = [
    {"name": "top", "until": 0.2, "train": ["top"]},
    {"name": "upper", "until": 0.4, "train": [3, 4]},
    {"name": "middle", "until": 0.6, "train": [2, 3, 4]},
    {"name": "lower", "until": 0.8, "train": [1, 2, 3, 4]},
    {"name": "all", "until": 1.0, "train": "all"},
]
TARGET_RATIO = 1.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2 = os.path.join(ROOT, ".cache", "models", "SmolLM2-135M-Instruct")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, default=25, help="optimizer steps, 5 phases (default 25)")
    parser.add_argument("--drop", type=int, default=2, help="warm-up steps left out of the median (default 2)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; unset: torch's default")
    parser.add_argument("--model", default=SMOLLM2, help="model folder (default: the SmolLM2-135M in .cache)")
    return parser


def token_rows(tokenizer, seq_len: int, count: int) -> list[list[int]]:
    from pydoc_data.topics import topics

    text = "\n".join(" ".join(topics[name].split()) for name in sorted(topics))
    ids = tokenizer(text[: 400 * seq_len * count // 64])["input_ids"]
    rows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    if len(rows) < count:
        raise RuntimeError(f"only {len(rows)} rows of {seq_len} tokens; need {count}")
    return rows[:count]


def load_average() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:  # not available on this platform
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    import tempfile
    import warnings

    import datasets
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback

    import hf_stackwise.trainer as trainer_module
    from hf_stackwise.persist.checksum import float64_fingerprint
    from hf_stackwise.trainer import StackwiseArguments, StackwiseTrainer

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    datasets.utils.logging.set_verbosity_error()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not os.path.isdir(args.model):
        raise SystemExit(f"{args.model} is missing; run `make assets` first")

    checksum_seconds = [0.0]
    checksums = trainer_module.tensor_checksums

    def timed_checksums(tensors):
        start = time.perf_counter()
        try:
            return checksums(tensors)
        finally:
            checksum_seconds[0] += time.perf_counter() - start

    trainer_module.tensor_checksums = timed_checksums
    transitions: list[dict] = []

    class TimedTrainer(StackwiseTrainer):
        def _apply_phase(self, step: int) -> None:
            before = self._phase_state
            ending = list(self._frozen)
            checksum_seconds[0] = 0.0
            start = time.perf_counter()
            super()._apply_phase(step)
            seconds = time.perf_counter() - start
            if before is None or self._phase_state.index == before.index:
                return
            old = time.perf_counter()  # the former check on the same tensors: both sides of the transition
            for _, param in ending + self._frozen:
                float64_fingerprint(param)
            old = time.perf_counter() - old
            frozen_bytes = sum(p.numel() * p.element_size() for _, p in ending + self._frozen)
            transitions.append(
                {
                    "step": step,
                    "from": before.name,
                    "to": self._phase_state.name,
                    "seconds": seconds,
                    "checksum": checksum_seconds[0],
                    "float64": old,
                    "bytes": frozen_bytes,
                }
            )
            print(f"  step {step}: {before.name} -> {self._phase_state.name} in {seconds:.3f} s", flush=True)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.spans: list[tuple[int, float]] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.spans.append((state.global_step - 1, time.perf_counter() - self.begin))

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = token_rows(tokenizer, args.seq_len, args.steps * args.batch_size)
    dataset = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="stackwise-transition-") as tmp:
        training_args = StackwiseArguments(
            output_dir=tmp,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=1e-5,
            schedule=SCHEDULE,
            blocks_per_stack=6,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        trainer = TimedTrainer(model=model, args=training_args, train_dataset=dataset, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # it prints the final train metrics
        load_start = load_average()
        trainer.train()
    starts = {t["step"] for t in transitions} | {0}
    steps = [s for k, s in timer.spans if k >= args.drop and k not in starts]
    median = statistics.median(steps)

    print("Phase transition cost vs the median training step (StackwiseTrainer, real SmolLM2-135M)")
    print(f"  torch {torch.__version__}  transformers {transformers.__version__}  threads {torch.get_num_threads()}")
    print(f"  model {os.path.basename(args.model)}: {n_params:,} parameters, fp32, 5 stacks of 6 blocks")
    print(f"  {args.steps} steps, batch {args.batch_size} x {args.seq_len} tokens, AdamW, check_invariants on")
    print(f"  load average {load_start} at start, {load_average()} at end (other work slows the steps)")
    print(
        f"  median step {1000 * median:.0f} ms over {len(steps)} steps (min {1000 * min(steps):.0f}, max "
        f"{1000 * max(steps):.0f})"
    )
    print()
    header = f"{'step':>4}  {'transition':<16} {'frozen MB':>9}  {'ms':>7}  {'checksum ms':>11}  {'x step':>6}"
    print(header + f"  {'float64 ms':>10}  {'x step':>6}")
    for t in transitions:
        print(
            f"{t['step']:>4}  {t['from'] + ' -> ' + t['to']:<16} {t['bytes'] / 2**20:9.0f}  "
            f"{1000 * t['seconds']:7.1f}  {1000 * t['checksum']:11.1f}  {t['seconds'] / median:6.3f}  "
            f"{1000 * t['float64']:10.1f}  {t['float64'] / median:6.3f}"
        )
    worst = max(t["seconds"] for t in transitions) / median
    verdict = "within" if worst < TARGET_RATIO else "ABOVE"
    print()
    print(f"worst transition / median step   {worst:.3f}  ({verdict} the < {TARGET_RATIO:g} target)")
    old_worst = max(t["float64"] for t in transitions) / median
    print(f"former float64 check alone       {old_worst:.3f} x step at its worst (same tensors)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
