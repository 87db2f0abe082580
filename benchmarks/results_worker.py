"""One run of ``benchmarks/results.py``, in its own process: train one arm at one rate and seed for a number of
steps, count the training FLOPs, time it, and score it on the validation and test splits during and after training.

    python benchmarks/results_worker.py '{"task": "clm", "arm": "full", "seed": 0, "rate": 1.0, "steps": 40, ...}'

It prints one line ``RESULTS-RUN {json}`` the parent parses. FLOPs come from PyTorch's own counter
(``torch.utils.flop_counter.FlopCounterMode``, the forward and backward matmuls, attention and convolutions it
knows) around every optimizer step, from ``on_step_begin`` to ``on_step_end``; evals are not counted. CPU time is
the process's (``time.process_time``) over the same spans; the process runs 1 torch thread.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
TAG = "RESULTS-RUN "


def optimizer_state_bytes(trainer) -> int:
    import torch

    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    if optimizer is None:
        return 0
    return sum(
        v.nelement() * v.element_size()
        for per_param in optimizer.state.values()
        for v in per_param.values()
        if isinstance(v, torch.Tensor)
    )


def step_counter():
    """PyTorch's FLOP counter without its module tracker. The tracker registers global module hooks while it counts,
    and the activation cache rightly reads a global hook as a hazard (it may change the prefix) and turns itself off
    at the next phase start, which runs inside the step; the per-module breakdown is not needed here."""
    from torch.utils.flop_counter import FlopCounterMode, _FlopCounterMode

    class StepFlops(FlopCounterMode):
        def __enter__(self):
            self.flop_counts.clear()
            self.mode = _FlopCounterMode(self)
            self.mode.__enter__()
            return self

        def __exit__(self, *args):
            done, self.mode = self.mode.__exit__(*args), None
            return done

    return StepFlops(display=False)


def probe(trainer, total_steps: int):
    """A callback that counts FLOPs and times every step, and asks for an eval at the last step."""
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def __init__(self):
            self.flops, self.cpu, self.wall, self.optim = [], [], [], 0
            self.counter = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.counter = step_counter()
            self.counter.__enter__()
            self.began = (time.process_time(), time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            cpu, wall = time.process_time() - self.began[0], time.perf_counter() - self.began[1]
            self.counter.__exit__(None, None, None)
            self.flops.append(self.counter.get_total_flops())
            self.cpu.append(cpu)
            self.wall.append(wall)
            self.optim = max(self.optim, optimizer_state_bytes(trainer))
            if state.global_step >= total_steps:
                control.should_evaluate = True

    return Probe()


def isolate_evals(trainer) -> None:
    """Run every eval on a fork of torch's RNG, so evals never change the training that follows: each DataLoader
    iterator draws its base seed from the global RNG, which would shift later dropout masks and shuffles (the
    classification runs train with dropout). A run's training is then the same whichever evals it makes."""
    import torch

    evaluate = trainer.evaluate

    def forked(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return evaluate(*args, **kwargs)

    trainer.evaluate = forked


def curve(log_history: list, flops: list, cpu: list, keys: list) -> list:
    """[step, cumulative FLOPs, cumulative CPU s, {split: {key: value}}] at every eval."""
    points = {}
    for entry in log_history:
        step = entry.get("step")
        for split in ("val", "test"):
            if f"eval_{split}_loss" not in entry:
                continue
            # TRL's trainers log their own metrics as eval_<key> whatever the eval set's prefix
            values = {k: entry.get(f"eval_{split}_{k}", entry.get(f"eval_{k}")) for k in keys}
            points.setdefault(step, {})[split] = {k: v for k, v in values.items() if v is not None}
    return [[s, sum(flops[:s]), sum(cpu[:s]), points[s]] for s in sorted(points)]


def run(spec: dict) -> dict:
    import memory
    import results_arms as arms
    import torch
    from transformers import PrinterCallback

    from hf_stackwise.cli import pipeline as pipe
    from hf_stackwise.errors import StackwiseError
    from hf_stackwise.recipe.loader import validate_recipe

    torch.set_num_threads(1)
    memory.quiet_libraries()
    task = arms.TASKS[spec["task"]]
    keys = [task.metric, *task.extra]
    settings = spec["settings"]
    with tempfile.TemporaryDirectory(prefix="stackwise-results-") as tmp:
        recipes = {
            split: arms.run_recipe(spec["task"], spec["arm"], spec, settings, os.path.join(tmp, split), split)
            for split in arms.eval_splits(spec, settings)
        }
        if recipes["test"] is None:
            return {"status": "not run", "reason": f"{task.arms[spec['arm']].recipe} does not exist (yet)"}
        try:
            prepared = {split: pipe.prepare(validate_recipe(raw, task.arms[spec["arm"]].recipe))
                        for split, raw in recipes.items()}  # fmt: skip
        except StackwiseError as err:
            return {"status": "not run", "reason": " ".join(str(err).split())}
        evals = {split: p.eval_dataset for split, p in sorted(prepared.items(), reverse=True)}  # val, then test
        prepared = dataclasses.replace(prepared["test"], eval_dataset=evals)
        base = memory.status_kib("VmRSS")["VmRSS"]
        trainer = pipe.build_trainer(prepared, model=pipe.load_model(prepared))
        trainer.remove_callback(PrinterCallback)
        isolate_evals(trainer)
        counter = probe(trainer, prepared.total_steps)
        trainer.add_callback(counter)
        started = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - started
        peak = memory.peak_kib()
        points = curve(trainer.state.log_history, counter.flops, counter.cpu, keys)
        stats = trainer.cache_stats() if hasattr(trainer, "cache_stats") else {}
        decisions = trainer.freeze_decisions() if hasattr(trainer, "freeze_decisions") else []
        before = next((p[3] for p in points if p[0] == 0), None)
        final = points[-1] if points and points[-1][0] == trainer.state.global_step else None
    if final is None:
        return {"status": "failed", "reason": f"no eval at the last step: {[p[0] for p in points]}"}
    return {
        "status": "ok",
        "steps_done": trainer.state.global_step,
        "val": final[3].get("val", {}),
        "test": final[3].get("test", {}),
        "before": before,  # the grid's runs only
        "curve": points,
        "flops": sum(counter.flops),
        "cpu_s": sum(counter.cpu),
        "step_wall_s": statistics.median(counter.wall[1:] or counter.wall),
        "step_cpu_s": statistics.median(counter.cpu[1:] or counter.cpu),
        "train_s": train_s,
        "base_rss_kib": base,
        "peak_rss_kib": peak,
        "optimizer_state_bytes_max": counter.optim,
        "trainable_params_end": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "cache_hit_rate": stats.get("hit_rate"),
        "freezes": [{"step": d["step"], "stacks": d["stacks"]} for d in decisions],
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    spec = json.loads(sys.argv[1])
    result = run(spec)
    import torch
    import transformers

    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    print(TAG + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
