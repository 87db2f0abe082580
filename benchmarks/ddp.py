"""DDP gradient buckets and step time per phase of a block-coordinate schedule, against fixed-set DDP runs.

Run it (CPU only, offline; a few minutes on 2 idle cores)::

    make bench                                   # or: python benchmarks/ddp.py
    python benchmarks/ddp.py --steps-per-phase 3  # a quicker run

The job: a Llama built from a config (``--layers`` blocks of hidden 512, vocabulary 32,000, fp32, about
250 MB), stacks of two blocks, AdamW, batch ``--batch-size`` x ``--seq-len`` random tokens per rank, under
``torchrun --nproc_per_node 2`` (gloo). The schedule trains one stack at a time (block-coordinate descent): the
superset the optimizer and DDP wrap is every block, each phase trains a quarter of it, with
``optimizer_state: reset`` so that each phase holds only its own AdamW moments (as in a fixed run).

Three kinds of run, all in this invocation:

- ``superset``: DDP keeps the buckets of every parameter it wrapped (what hf_stackwise did before it re-registered
  the reducer at transitions: the worker turns that off);
- ``phase``: hf_stackwise as it is: each transition re-registers the reducer with the phase's parameters;
- ``fixed``: the baseline, one run per phase whose schedule trains only that phase's stack, so DDP wraps exactly
  what trains.

Per phase and run: the reducer's bucket MiB (DDP's own logging data), the process's resident MiB after the
phase's steps (rank 0; in phase 0 of the ``phase`` run it still includes the superset buckets DDP allocated when it
wrapped the model, freed at the first step but kept by the allocator), and the fastest step (``on_step_begin`` to
``on_step_end``, the phase's first step excluded: other work on the machine only adds time), in wall time and in
the rank's CPU time (less sensitive to other work; gloo's all-reduce runs on the CPU too). Ratios are against the
fixed baseline of the same invocation. A report, not a test: exit status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def schedule(stacks: int, only: int | None = None) -> list[dict]:
    if only is not None:
        return [{"name": f"s{only}", "until": 1.0, "train": [only]}]
    # optimizer_state: reset (as BAdam): each phase holds only its own AdamW moments, like the fixed runs
    return [
        {"name": f"s{s}", "until": (s + 1) / stacks, "train": [s], "optimizer_state": "reset"} for s in range(stacks)
    ]


def resident_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(out: str, mode: str, layers: int, steps: int, batch: int, seq_len: int, only: int | None) -> None:
    import torch
    import torch.distributed as dist
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

    import hf_stackwise.trainer as trainer_module
    from hf_stackwise.distributed.ddp import bucket_bytes
    from hf_stackwise.trainer import StackwiseArguments, StackwiseTrainer

    if mode == "superset":
        trainer_module.register_trainable = lambda ddp: False
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    stacks = layers // 2
    phases = 1 if only is not None else stacks
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32000, (steps * phases * batch * 2, seq_len), generator=g).tolist()
    args = StackwiseArguments(
        output_dir=out,
        max_steps=steps * phases,
        per_device_train_batch_size=batch,
        learning_rate=1e-4,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        schedule=schedule(stacks, only),
        blocks_per_stack=2,
        disable_tqdm=True,
        logging_strategy="no",
        check_invariants=False,
    )
    trainer = StackwiseTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids})
    )
    rows: dict[int, dict] = {}

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start, self.cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            seconds, cpu = time.perf_counter() - self.start, time.process_time() - self.cpu
            index = only if only is not None else (state.global_step - 1) // steps
            row = rows.setdefault(index, {"steps": [], "cpu": []})
            row["steps"].append(seconds)
            row["cpu"].append(cpu)
            row["bucket_mib"] = bucket_bytes(trainer.model_wrapped) / 2**20
            row["trainable_mib"] = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad) / 2**20
            row["rss_mib"] = resident_mib()

    trainer.add_callback(Probe())
    trainer.train()
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(out, "rows.json"), "w") as f:
            json.dump({"rows": rows, "params_mib": sum(p.numel() * 4 for p in model.parameters()) / 2**20}, f)
    dist.destroy_process_group()


def launch(out: str, mode: str, opts, only: int | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    cmd += [
        "--worker",
        mode,
        "--out",
        out,
        "--layers",
        str(opts.layers),
        "--steps-per-phase",
        str(opts.steps_per_phase),
    ]
    cmd += ["--batch-size", str(opts.batch_size), "--seq-len", str(opts.seq_len)]
    if only is not None:
        cmd += ["--only", str(only)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{mode} run failed:\n{result.stderr[-3000:]}")
    with open(os.path.join(out, "rows.json")) as f:
        data = json.load(f)
    data["rows"] = {int(k): v for k, v in data["rows"].items()}
    return data


def fastest_step(row: dict, key: str = "steps") -> float:
    """The phase's fastest step after its first: other work on a shared machine only ever adds time to a step."""
    return min(row[key][1:] or row[key])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="blocks (stacks of 2)")
    parser.add_argument("--steps-per-phase", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--worker", choices=["superset", "phase", "fixed"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--only", type=int, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.worker:
        worker(opts.out, opts.worker, opts.layers, opts.steps_per_phase, opts.batch_size, opts.seq_len, opts.only)
        return 0
    stacks = opts.layers // 2
    with tempfile.TemporaryDirectory() as tmp:
        superset = launch(os.path.join(tmp, "superset"), "superset", opts)
        phase = launch(os.path.join(tmp, "phase"), "phase", opts)
        fixed = {s: launch(os.path.join(tmp, f"fixed{s}"), "fixed", opts, s)["rows"][s] for s in range(stacks)}
    print("DDP gradient buckets per phase of a block-coordinate schedule (2 ranks, torchrun, gloo, CPU)")
    print(f"  Llama from config: {opts.layers} blocks, hidden 512, vocab 32000, fp32, {phase['params_mib']:.0f} MiB")
    print(
        f"  {stacks} phases x {opts.steps_per_phase} steps, batch {opts.batch_size} x {opts.seq_len} per rank, AdamW"
    )
    print(f"  load average {'/'.join(f'{x:.1f}' for x in os.getloadavg())} at end (other work slows the steps)")
    print()
    print(
        f"  {'phase':>5}  {'trains MiB':>10}  {'buckets MiB: fixed':>18}  {'superset':>8}  {'phase':>6}  "
        f"{'RSS MiB: fixed':>14}  {'superset':>8}  {'phase':>6}  {'step x fixed: superset':>22}  {'phase':>6}  "
        f"{'CPU x fixed: superset':>21}  {'phase':>6}"
    )
    for s in range(stacks):
        f, o, n = fixed[s], superset["rows"][s], phase["rows"][s]
        cpu_o, cpu_n = fastest_step(o, "cpu") / fastest_step(f, "cpu"), fastest_step(n, "cpu") / fastest_step(f, "cpu")
        print(
            f"  {s:>5}  {f['trainable_mib']:>10.1f}  {f['bucket_mib']:>18.1f}  {o['bucket_mib']:>8.1f}  "
            f"{n['bucket_mib']:>6.1f}  {f['rss_mib']:>14.0f}  {o['rss_mib']:>8.0f}  {n['rss_mib']:>6.0f}  "
            f"{fastest_step(o) / fastest_step(f):>22.2f}  {fastest_step(n) / fastest_step(f):>6.2f}  "
            f"{cpu_o:>21.2f}  {cpu_n:>6.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
