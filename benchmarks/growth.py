"""Progressive stacking (copy growth) against training the full depth from the start: tokens and FLOPs to a
target eval loss fixed in advance from the full-depth baseline.

Run it (CPU only, offline; ~10 minutes with the defaults on 2 cores)::

    python benchmarks/growth.py                   # or: make bench
    python benchmarks/growth.py --seeds 1 --steps 120 --eval-every 20   # a quick smoke run

The job: a Llama of ``--depth`` blocks (hidden 128, 4 heads, byte-level vocabulary of 256 so the LM head
does not dominate the FLOPs) on real prose (``pydoc_data.topics`` as UTF-8 bytes: the first 90% of the
topics train, the last 10% evaluate), batch ``--batch-size`` × ``--seq-len`` tokens, AdamW, fp32.

* ``full``: ``--depth`` blocks from step 0, one phase, 5% warm-up.
* ``grow``: one block at first, copied on top of itself (G_stack's duplication, ``grow: {op: copy}``) at
  t = 0.15 (→ 2 blocks) and t = 0.35 (→ 4 blocks, and so on up to ``--depth``), each growth with fresh
  optimizer state and a 5%-of-phase warm-up, all inside one StackwiseTrainer run.

Both see the same batches in the same order (same data seed). The target is fixed before the growth runs:
the median, over seeds, of the full-depth runs' eval loss at ``--target-at`` of their budget. For every run
the report gives the first eval at or below the target: its step, tokens seen, and training FLOPs so far
(6 × tokens × the parameters a token passes through — active blocks plus the LM head; embeddings are a
lookup), and the ratio grow / full of tokens and FLOPs per seed. A run that never reaches the target is
reported as such. This is a report, not a test: the numbers are whatever the machine shows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

HIDDEN, HEADS, VOCAB = 128, 4, 256


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3)")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per run (default 400)")
    parser.add_argument("--depth", type=int, default=4, help="final depth, a power of 2 (default 4)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--target-at", type=float, default=0.75, help="fraction of the full run's budget")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser


def byte_chunks(text: str, seq_len: int) -> list[list[int]]:
    data = list(text.encode("utf-8"))
    return [data[i : i + seq_len] for i in range(0, len(data) - seq_len + 1, seq_len)]


def byte_datasets(seq_len: int):
    from pydoc_data.topics import topics

    from datasets import Dataset

    names = sorted(topics)
    cut = len(names) * 9 // 10
    train = byte_chunks("\n".join(topics[n] for n in names[:cut]), seq_len)
    evaluation = byte_chunks("\n".join(topics[n] for n in names[cut:]), seq_len)[:96]
    return (
        Dataset.from_dict({"input_ids": train, "labels": train}),
        Dataset.from_dict({"input_ids": evaluation, "labels": evaluation}),
    )


def grow_schedule(depth: int) -> list[dict]:
    """1 block, doubled by copy until ``depth``: growth at t = 0.15, 0.35, 0.55, ..."""
    phases = [{"name": "d1", "until": 0.15, "train": "all", "warmup": 0.05}]
    current, start = 1, 0.15
    while current < depth:
        until = 1.0 if current * 2 == depth else round(start + 0.2, 2)
        phases.append(
            {
                "name": f"d{current * 2}",
                "until": until,
                "train": "all",
                "grow": {"op": "copy", "stacks": current},
                "optimizer_state": "reset",
                "warmup": 0.05,
            }
        )
        current, start = current * 2, until
    return phases


def run_one(arm: str, seed: int, opts, train, evaluation) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

    from hf_stackwise import StackwiseArguments, StackwiseTrainer

    depth = opts.depth if arm == "full" else 1
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=depth,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=opts.seq_len,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    head = model.lm_head.weight.numel() + sum(p.numel() for p in model.model.norm.parameters())
    schedule = [{"name": "full", "until": 1.0, "train": "all", "warmup": 0.05}] if arm == "full" else None
    schedule = schedule or grow_schedule(opts.depth)
    with tempfile.TemporaryDirectory() as out:
        args = StackwiseArguments(
            output_dir=out,
            max_steps=opts.steps,
            per_device_train_batch_size=opts.batch_size,
            per_device_eval_batch_size=32,
            learning_rate=opts.lr,
            weight_decay=0.0,
            eval_strategy="steps",
            eval_steps=opts.eval_every,
            logging_steps=opts.eval_every,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            seed=seed,
            data_seed=0,
            schedule=schedule,
            disable_tqdm=True,
        )
        trainer = StackwiseTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation)
        flops = {"total": 0.0}
        curve = []

        class Count(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                blocks = len(trainer.producing_blocks())
                flops["total"] += 6.0 * opts.batch_size * opts.seq_len * (blocks * block + head)

            def on_evaluate(self, args, state, control, metrics=None, **kwargs):
                tokens = state.global_step * opts.batch_size * opts.seq_len
                curve.append((state.global_step, tokens, flops["total"], metrics["eval_loss"]))

        trainer.add_callback(Count())
        trainer.train()
    return {"arm": arm, "seed": seed, "curve": curve}


def first_below(curve, target):
    return next(((step, tokens, f) for step, tokens, f, loss in curve if loss <= target), None)


def main(argv=None) -> None:
    opts = make_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train, evaluation = byte_datasets(opts.seq_len)
    seeds = list(range(opts.seeds))
    full = [run_one("full", s, opts, train, evaluation) for s in seeds]
    at = max(1, round(opts.target_at * opts.steps / opts.eval_every)) - 1
    target = statistics.median(r["curve"][at][3] for r in full)
    print(f"target eval loss (median full-depth eval loss at step {full[0]['curve'][at][0]}): {target:.4f}")
    grow = [run_one("grow", s, opts, train, evaluation) for s in seeds]
    rows = []
    print(f"{'seed':>4} {'arm':>5} {'step':>5} {'tokens':>9} {'GFLOPs':>8} {'final loss':>10}")
    for f, g in zip(full, grow, strict=True):
        row = {"seed": f["seed"]}
        for run in (f, g):
            hit = first_below(run["curve"], target)
            row[run["arm"]] = hit
            final = run["curve"][-1][3]
            shown = (f"{hit[0]:>5} {hit[1]:>9} {hit[2] / 1e9:>8.2f}") if hit else f"{'never':>5} {'-':>9} {'-':>8}"
            print(f"{run['seed']:>4} {run['arm']:>5} {shown} {final:>10.4f}")
        if row["full"] and row["grow"]:
            row["token_ratio"] = row["grow"][1] / row["full"][1]
            row["flop_ratio"] = row["grow"][2] / row["full"][2]
        rows.append(row)
    ratios = [r for r in rows if "token_ratio" in r]
    if ratios:
        print(
            f"grow / full to the target: tokens median {statistics.median(r['token_ratio'] for r in ratios):.3f}, "
            f"FLOPs median {statistics.median(r['flop_ratio'] for r in ratios):.3f} "
            f"({len(ratios)} of {len(rows)} seeds reached it in both arms)"
        )
    else:
        print("no seed reached the target in both arms")
    if opts.out:
        with open(opts.out, "w") as fh:
            json.dump({"target": target, "options": vars(opts), "rows": rows, "full": full, "grow": grow}, fh)


if __name__ == "__main__":
    main()
