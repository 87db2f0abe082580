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
fixed baseline of the same invocation. The results, with the settings, the machine and how busy it was, go to
``benchmarks/results/ddp.json`` (``--json``); the DDP paragraph of ``docs/stories/block-coordinate.md`` is
:func:`summary` of that file, word for word (a test checks it). A report, not a test: exit status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # also when loaded by file path (tests/)
from common import cpu_jiffies, cpu_model  # noqa: E402

ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "ddp.json")


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


def machine() -> dict:
    import torch
    import transformers

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def phase_rows(superset: dict, phase: dict, fixed: dict) -> list[dict]:
    """Per phase: what trains, the buckets and RSS of each run, and the step ratios against the fixed run."""
    rows = []
    for s in sorted(fixed):
        f, o, n = fixed[s], superset["rows"][s], phase["rows"][s]
        rows.append(
            {
                "phase": s,
                "trains_mib": f["trainable_mib"],
                "bucket_mib": {"fixed": f["bucket_mib"], "superset": o["bucket_mib"], "phase": n["bucket_mib"]},
                "rss_mib": {"fixed": f["rss_mib"], "superset": o["rss_mib"], "phase": n["rss_mib"]},
                "step_s": {"fixed": fastest_step(f), "superset": fastest_step(o), "phase": fastest_step(n)},
                "step_ratio": {
                    "superset": fastest_step(o) / fastest_step(f),
                    "phase": fastest_step(n) / fastest_step(f),
                },
                "cpu_ratio": {
                    "superset": fastest_step(o, "cpu") / fastest_step(f, "cpu"),
                    "phase": fastest_step(n, "cpu") / fastest_step(f, "cpu"),
                },
            }
        )
    return rows


def _span(values, spec: str, unit: str = "") -> str:
    low, high = format(min(values), spec), format(max(values), spec)
    return f"{low}{unit}" if low == high else f"{low}-{high}{unit}"


def summary(data: dict) -> str:
    """The docs' paragraph on these measurements, from the JSON alone."""
    s, rows = data["settings"], data["phases"]
    other = data.get("other_cpu")
    busy = (
        f"other processes used {100 * other:.0f}% of the machine's CPU during the runs, which slows the steps "
        "(the bucket sizes do not change)"
        if other is not None
        else "the machine's load was not recorded"
    )
    phase_cpu = [r["cpu_ratio"]["phase"] for r in rows]
    superset_cpu = [r["cpu_ratio"]["superset"] for r in rows]
    if max(phase_cpu) < min(superset_cpu):
        steps = "every phase's step was cheaper with the phase's buckets"
    else:
        steps = "the two ranges overlap, so at this size and load the step times do not tell the two apart"
    return (
        f"Measured on 2 CPU ranks (`python benchmarks/ddp.py --steps-per-phase {s['steps_per_phase']}`, "
        f"{s['layers']} blocks, batch {s['batch_size']} × {s['seq_len']} per rank; `benchmarks/results/ddp.json`), a "
        f"{data['params_mib']:.0f} MiB Llama training {_span([r['trains_mib'] for r in rows], '.0f')} MiB per "
        f"phase: the buckets hold {_span([r['bucket_mib']['phase'] for r in rows], '.0f')} MiB per rank, as in a "
        f"DDP run fixed to that phase's stack ({_span([r['bucket_mib']['fixed'] for r in rows], '.0f')} MiB), "
        f"instead of the {_span([r['bucket_mib']['superset'] for r in rows], '.0f')} MiB of every stack. A step "
        f"cost {_span(phase_cpu, '.2f', 'x')} the fixed run's CPU time, against {_span(superset_cpu, '.2f', 'x')} "
        f"with the superset's buckets (which all-reduce every stack's gradients at every step; fastest step of "
        f"{s['steps_per_phase']} per phase): {steps}. The machine was shared: {busy}."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="blocks (stacks of 2)")
    parser.add_argument("--steps-per-phase", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--json", default=RESULTS, help="where the results go (default: benchmarks/results/ddp.json)")
    parser.add_argument("--worker", choices=["superset", "phase", "fixed"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--only", type=int, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.worker:
        worker(opts.out, opts.worker, opts.layers, opts.steps_per_phase, opts.batch_size, opts.seq_len, opts.only)
        return 0
    stacks = opts.layers // 2
    started, load_start, jiffies, own = time.perf_counter(), os.getloadavg(), cpu_jiffies(), sum(os.times()[:4])
    with tempfile.TemporaryDirectory() as tmp:
        superset = launch(os.path.join(tmp, "superset"), "superset", opts)
        phase = launch(os.path.join(tmp, "phase"), "phase", opts)
        fixed = {s: launch(os.path.join(tmp, f"fixed{s}"), "fixed", opts, s)["rows"][s] for s in range(stacks)}
    end = cpu_jiffies()
    other = None
    if jiffies is not None and end is not None and end[1] > jiffies[1]:  # this process and its children excluded
        mine = (sum(os.times()[:4]) - own) * os.sysconf("SC_CLK_TCK")
        other = max(0.0, (end[0] - jiffies[0]) - mine) / (end[1] - jiffies[1])
    data = {
        "benchmark": "ddp",
        "settings": {
            "layers": opts.layers,
            "steps_per_phase": opts.steps_per_phase,
            "batch_size": opts.batch_size,
            "seq_len": opts.seq_len,
            "ranks": 2,
        },
        "machine": machine(),
        "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()),
        "other_cpu": other,
        "wall_s": time.perf_counter() - started,
        "params_mib": phase["params_mib"],
        "phases": phase_rows(superset, phase, fixed),
    }
    os.makedirs(os.path.dirname(os.path.abspath(opts.json)), exist_ok=True)
    with open(opts.json, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
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
    for r in data["phases"]:
        b, m, w, c = r["bucket_mib"], r["rss_mib"], r["step_ratio"], r["cpu_ratio"]
        print(
            f"  {r['phase']:>5}  {r['trains_mib']:>10.1f}  {b['fixed']:>18.1f}  {b['superset']:>8.1f}  "
            f"{b['phase']:>6.1f}  {m['fixed']:>14.0f}  {m['superset']:>8.0f}  {m['phase']:>6.0f}  "
            f"{w['superset']:>22.2f}  {w['phase']:>6.2f}  {c['superset']:>21.2f}  {c['phase']:>6.2f}"
        )
    print()
    print(summary(data))
    print(f"results: {os.path.relpath(opts.json, ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
