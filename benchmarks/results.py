"""The measurements behind ``docs/results.md``: for each task, every arm users would pick, with a tuned learning rate,
at equal steps, at equal FLOPs and (for the main causal-LM arms) at a longer horizon; one JSON file per run under
``benchmarks/results/page/``.

Run it (CPU only, offline, after ``make assets``), then render the page::

    make bench-report                              # = python benchmarks/results.py && python benchmarks/report.py
    python benchmarks/results.py --quick           # development: steps / 8, 1 seed, into benchmarks/results/quick/
    python benchmarks/results.py --only clm --arms full,lora
    python benchmarks/results.py --jobs 1          # one run at a time (default: 2, one per core)

**The protocol** (the page prints it before any number; ``results_arms.py`` holds the tasks, arms and splits):

1. *Rate grid.* Every arm runs its recipe's rates (every ``learning_rate`` of its schedule) times ⅓, 1 and 3, on
   seed 0, for the task's steps, and is scored on the **validation** split. If the best factor is at an edge of the
   grid, the grid grows by another factor 3 past it (once).
2. *Seeds.* The best factor (validation) runs seeds 0, 1 and 2 (seed 0 is the grid's run) and is scored on the
   **test** split.
3. *Equal FLOPs.* The budget is full fine-tuning's training FLOPs at the task's steps (median over its seeds); every
   other arm runs, 3 seeds at its best factor, the number of steps that spends that budget (its FLOPs per step
   from its own runs; cheaper steps run more of them, at most 8×). Where that is within 5% of the task's steps the
   equal-step runs stand for it.
4. *Longer horizon* (causal LM, the arms of ``Task.long``): 4× the steps, 3 seeds, at the factor tuned at 1×.

Every run evaluates the test split a few times during training and at its end (DPO once, at the end: its policy
starts equal to its reference), so each gives a curve of the metric against its cumulative training FLOPs; the
grid's runs evaluate the validation split alongside, and each arm's ×1 grid run also before training (every factor
starts from the same weights); every eval runs on a fork of torch's RNG, so a run's training is the same whichever
evals it makes. FLOPs come from PyTorch's FLOP counter over every optimizer step
(machine-independent); CPU time is each run's process time over the same spans; each run is its own process with
1 torch thread, ``--jobs`` at a time from one queue: the grid's first round goes in first, factor by factor, and
each arm queues its next runs as soon as their inputs exist, so arms interleave and no slot waits for a stage to
end. Resumable: a run whose JSON file exists with the same settings, recipe and splits is skipped; failed runs are
retried at the next invocation.

**Progressive stacking** reuses ``benchmarks/growth.py`` (unchanged protocol: a target fixed from the full-depth
runs before any growth run); its runs share the queue. **Activation cache**: ``benchmarks/results/cache*.json``
is rendered if present.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import results_arms as arms  # noqa: E402
from common import cpu_jiffies, cpu_model  # noqa: E402

RESULTS = os.path.join(HERE, "results", "page")
TAG = "RESULTS-RUN "
GROWTH_TAG = "RESULTS-GROWTH "
GRID = (1 / 3, 1.0, 3.0)
EXTEND, MAX_EXTENSIONS, FLOP_CAP, SAME = 3.0, 1, 8, 0.05
LONG = 4
PROTOCOL = 2  # in every run's identity: a run of an earlier protocol (other evals, one more extension) is re-run


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="development run: steps / 8, 1 seed, results/quick/")
    parser.add_argument("--budget", type=float, default=1.0, help="multiply every step count by this (default 1)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 3)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, each on 1 thread (default 2)")
    parser.add_argument("--only", choices=(*arms.TASKS, "growth", "cache"), default=None)
    parser.add_argument("--arms", default=None, help="comma-separated arms, `arm` or `task:arm` (default: all)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/page[/quick])")
    parser.add_argument("--timeout", type=float, default=5400, help="seconds allowed per run")
    parser.add_argument("--growth-worker", nargs=2, default=None, help=argparse.SUPPRESS)  # arm seed
    return parser


def settings_from(opts) -> dict:
    """What makes two runs comparable, per task (stored in every JSON file; the number of seeds is not part of it)."""
    scale = opts.budget / (8 if opts.quick else 1)
    tasks = {}
    for name, task in arms.TASKS.items():
        tasks[name] = {
            "steps": max(4, round(task.steps * scale)),
            "batch_size": task.batch_size,
            "seq_len": task.seq_len,
            "eval_samples": 8 if opts.quick else 32,
            "evals": 1 if name == "dpo" else 2,  # evals in a run (plus one before training in the grid's runs)
        }
    growth = {
        "steps": max(20, round((60 if opts.quick else 400) * opts.budget)),
        "depth": 4,
        "batch_size": 16,
        "seq_len": 64,
        "lr": 2e-3,
        "eval_every": 10 if opts.quick else 20,
        "target_at": 0.75,
    }
    return {"tasks": tasks, "growth": growth, "quick": opts.quick, "budget": opts.budget}


# ---- running ---------------------------------------------------------------------------------------------


def rate_tag(rate: float) -> str:
    return f"{rate:.4g}".replace(".", "p")


def run_name(task: str, arm: str, rate: float, seed: int, steps: int) -> str:
    return f"{task}-{arm}-lr{rate_tag(rate)}-seed{seed}-steps{steps}"


def machine() -> dict:
    from importlib import metadata

    cpu = cpu_model()
    ram = None
    try:
        with open("/proc/meminfo") as f:
            ram = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    found = {}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "hf-stackwise"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_bytes": ram,
        "versions": found,
        "commit": commit.stdout.strip() or None,
    }


class Runner:
    """Runs (or finds) one JSON file per run, ``jobs`` subprocesses at a time."""

    def __init__(self, opts, settings: dict, splits: dict):
        self.opts, self.settings, self.splits = opts, settings, splits
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, opts.jobs))

    def identity(self, task: str, arm: str) -> dict:
        return {"settings": self.settings["tasks"][task], "recipe_sha1": arms.recipe_sha(task, arm),
                "splits": self.splits, "quick": self.settings["quick"], "protocol": PROTOCOL}  # fmt: skip

    def stored(self, path: str, identity: dict) -> dict | None:
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, ValueError):
            return None
        same = all(result.get(k) == v for k, v in identity.items())
        return result if same and result.get("status") in ("ok", "not run") else None

    def spawn(self, spec: dict, path: str, identity: dict) -> dict:
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))  # fmt: skip
        command = [sys.executable, os.path.join(HERE, "results_worker.py"), json.dumps(spec)]
        started, jiffies, load = time.perf_counter(), cpu_jiffies(), os.getloadavg()
        when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=self.opts.timeout, env=env, cwd=ROOT)
            stdout, stderr, code = out.stdout, out.stderr, out.returncode
        except subprocess.TimeoutExpired:
            stdout, stderr, code = "", f"timed out after {self.opts.timeout:.0f} s", None
        end = cpu_jiffies()
        result = next((json.loads(line[len(TAG) :]) for line in stdout.splitlines() if line.startswith(TAG)), None)
        if result is None:
            tail = " | ".join((stderr or stdout).strip().splitlines()[-6:])
            result = {"status": "failed", "reason": f"exit status {code}: {tail}"}
        busy = None
        if jiffies and end and end[1] > jiffies[1]:
            busy = (end[0] - jiffies[0]) / (end[1] - jiffies[1])  # the whole machine's busy share meanwhile
        result.update(identity, task=spec["task"], arm=spec["arm"], rate=spec["rate"], seed=spec["seed"],
                      steps=spec["steps"], started=when, wall_s=time.perf_counter() - started,
                      load_before=list(load), load_after=list(os.getloadavg()), machine_busy=busy,
                      machine=self.opts.machine)  # fmt: skip
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)
        shown = result.get("test", {}).get(arms.TASKS[spec["task"]].metric)
        extra = f"test {shown:.4f}" if isinstance(shown, float) else result.get("reason", "")
        print(f"  {os.path.basename(path)}: {result['status']} in {result['wall_s']:.0f} s, {extra}", flush=True)
        return result

    def submit(self, task: str, arm: str, rate: float, seed: int, steps: int):
        """A future of the run's result (at once when its file is already there)."""
        path = os.path.join(self.opts.out, run_name(task, arm, rate, seed, steps) + ".json")
        identity = self.identity(task, arm)
        found = self.stored(path, identity)
        if found is not None:
            future = concurrent.futures.Future()
            future.set_result(found)
            return future
        spec = {"task": task, "arm": arm, "rate": rate, "seed": seed, "steps": steps,
                "settings": self.settings["tasks"][task]}  # fmt: skip
        return self.pool.submit(self.spawn, spec, path, identity)


def score(result: dict, task: str, split: str) -> float | None:
    if result.get("status") != "ok":
        return None
    value = result.get(split, {}).get(arms.TASKS[task].metric)
    return None if value is None or math.isnan(value) else value


def best_rate(results: dict, task: str, arm: str, steps: int) -> float | None:
    """The grid factor with the best validation metric (ties: the one nearer 1)."""
    spec = arms.TASKS[task]
    tried = {k[2]: score(r, task, "val") for k, r in results.items() if k[:2] == (task, arm) and k[3] == 0
             and k[4] == steps}  # fmt: skip
    tried = {rate: value for rate, value in tried.items() if value is not None}
    if not tried:
        return None
    sign = 1 if spec.lower_is_better else -1
    return min(tried, key=lambda rate: (sign * tried[rate], abs(math.log(rate))))


def flop_steps(steps: int, budget: float, per_run: list) -> int:
    """Steps that spend ``budget`` at the FLOPs per step of an arm's runs of ``steps`` (at most FLOP_CAP× the steps;
    within SAME of ``steps``, ``steps`` itself: the equal-step runs stand for it)."""
    n = min(FLOP_CAP * steps, max(1, round(steps * budget / statistics.median(per_run))))
    return steps if abs(n - steps) <= SAME * steps else n


def protocol(runner: Runner, opts, selected: dict, extra=None) -> dict:
    """Every stage of the protocol for the selected {task: [arms]}; returns the choices it made.

    One driver thread per arm walks the arm's stages and hands its runs to the runner's queue as soon as their
    inputs exist (an arm's seeds and longer horizon once its rate is chosen, its equal-FLOP runs once full
    fine-tuning's budget is known), so the ``--jobs`` slots never wait for a slow arm's stage to end. The grid's
    first round goes into the queue first, factor by factor, so the arms interleave. ``extra`` (a callable) runs
    as one more driver: the growth runs share the queue."""
    tasks = runner.settings["tasks"]
    seeds = list(range(opts.n_seeds))
    results, choices = {}, {task: {} for task in selected}
    budgets = {task: concurrent.futures.Future() for task in selected}  # full fine-tuning's FLOPs, per task
    first = {(t, a, r): runner.submit(t, a, r, 0, tasks[t]["steps"]) for r in GRID for t, names in selected.items()
             for a in names}  # fmt: skip

    def wait(keys: list) -> None:
        futures = {key: runner.submit(*key) for key in keys}
        results.update({key: future.result() for key, future in futures.items()})

    def arm(task: str, name: str) -> None:
        steps, spec = tasks[task]["steps"], arms.TASKS[task]
        try:
            results.update({(task, name, r, 0, steps): first[(task, name, r)].result() for r in GRID})
            rates = list(GRID)  # 1. the grid, grown past an edge where the best factor sits
            for _ in range(MAX_EXTENSIONS):
                best = best_rate(results, task, name, steps)
                if best is None or best not in (min(rates), max(rates)):
                    break
                rates.append(best * EXTEND if best == max(rates) else best / EXTEND)
                wait([(task, name, rates[-1], 0, steps)])
            rate = best_rate(results, task, name, steps)
            choices[task][name] = {"grid": sorted(rates), "rate": rate}
            if rate is None:
                return
            # 2. seeds at the chosen factor, with 4. the longer horizon queued first (its runs are the longest)
            long = [(task, name, rate, s, LONG * steps) for s in seeds] if name in spec.long else []
            long_futures = [runner.submit(*key) for key in long]
            wait([(task, name, rate, s, steps) for s in seeds])
            per_run = [f for s in seeds if (f := results[(task, name, rate, s, steps)].get("flops"))]
            if name == spec.full:  # 3. equal FLOPs: full fine-tuning's budget, spent by every arm
                budgets[task].set_result(statistics.median(per_run) if per_run else None)
                if per_run:
                    choices[task][name].update(flop_steps=steps, flop_budget=budgets[task].result())
            elif per_run and (budget := budgets[task].result()) is not None:
                n = flop_steps(steps, budget, per_run)
                choices[task][name].update(flop_steps=n, flop_budget=budget)
                wait([(task, name, rate, s, n) for s in seeds])
            results.update({key: future.result() for key, future in zip(long, long_futures)})
        finally:
            if name == spec.full and not budgets[task].done():
                budgets[task].set_result(None)  # the other arms skip equal FLOPs rather than wait forever

    names = [(t, a) for t, selected_arms in selected.items() for a in selected_arms]
    for task, selected_arms in selected.items():
        if arms.TASKS[task].full not in selected_arms:
            budgets[task].set_result(None)  # no full fine-tuning in this invocation: no FLOP budget
    print(f"protocol: {len(names)} arms, {len(first)} grid runs first, {runner.opts.jobs} at a time", flush=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(names) + 1) as drivers:
        done = [drivers.submit(arm, t, a) for t, a in names] + ([drivers.submit(extra)] if extra else [])
        for future in done:
            future.result()
    return {t: {a: choices[t][a] for a in selected[t] if a in choices[t]} for t in selected}


# ---- progressive stacking (benchmarks/growth.py) ----------------------------------------------------------


def growth_worker(arm: str, seed: int, settings: dict) -> None:
    import growth
    import memory
    import torch

    torch.set_num_threads(1)
    memory.quiet_libraries()
    opts = argparse.Namespace(**settings["growth"])
    train, evaluation = growth.byte_datasets(opts.seq_len)
    started = time.perf_counter()
    out = growth.run_one(arm, seed, opts, train, evaluation)
    result = {"status": "ok", "curve": out["curve"], "train_s": time.perf_counter() - started}
    print(GROWTH_TAG + json.dumps(result), flush=True)


def run_growth(opts, settings: dict, pool: concurrent.futures.Executor) -> None:
    """The full-depth runs, the target from them, then the growth runs; each run a subprocess started from
    ``pool`` (the protocol's queue)."""

    def one(arm: str, seed: int) -> dict:
        path = os.path.join(opts.out, f"growth-{arm}-seed{seed}.json")
        try:
            with open(path) as f:
                stored = json.load(f)
            if stored.get("status") == "ok" and stored.get("settings") == settings["growth"] and "started" in stored:
                return stored  # (a run without its start time is re-run: the page's wall time needs its interval)
        except (OSError, ValueError):
            pass
        command = [sys.executable, os.path.abspath(__file__), "--growth-worker", arm, str(seed), *opts.argv]
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
        when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        started = time.perf_counter()
        out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=opts.timeout)
        line = next((s for s in out.stdout.splitlines() if s.startswith(GROWTH_TAG)), None)
        result = json.loads(line[len(GROWTH_TAG) :]) if line else {"status": "failed", "reason": out.stderr[-500:]}
        result.update(arm=arm, seed=seed, settings=settings["growth"], started=when,
                      wall_s=time.perf_counter() - started)  # fmt: skip
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"  growth-{arm}-seed{seed}: {result['status']}", flush=True)
        return result

    g = settings["growth"]
    full = list(pool.map(lambda s: one("full", s), range(opts.n_seeds)))
    curves = [r["curve"] for r in full if r.get("status") == "ok"]
    if not curves:
        return
    target_path = os.path.join(opts.out, "growth-target.json")
    at = min(max(1, round(g["target_at"] * g["steps"] / g["eval_every"])) - 1, min(len(c) for c in curves) - 1)
    target = {"settings": g, "target": statistics.median(c[at][3] for c in curves), "at_step": curves[0][at][0],
              "from_seeds": len(curves)}  # fmt: skip
    with open(target_path, "w") as f:  # fixed before any growth run starts, from the full-depth runs only
        json.dump(target, f, indent=1)
    list(pool.map(lambda s: one("grow", s), range(opts.n_seeds)))


def main(argv=None) -> None:
    opts = make_parser().parse_args(argv)
    opts.argv = sys.argv[1:] if argv is None else list(argv)
    opts.n_seeds = opts.seeds or (1 if opts.quick else 3)
    settings = settings_from(opts)
    if opts.growth_worker:
        growth_worker(opts.growth_worker[0], int(opts.growth_worker[1]), settings)
        return
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    if not all(os.path.isdir(os.path.join(ROOT, t.model)) for t in arms.TASKS.values()):
        raise SystemExit("run `make assets` first (SmolLM2-135M-Instruct, MiniLM and the Python-docs data)")
    opts.out = opts.out or (os.path.join(HERE, "results", "quick") if opts.quick else RESULTS)
    os.makedirs(opts.out, exist_ok=True)
    opts.machine = machine()
    splits = arms.write_splits()
    runner = Runner(opts, settings, splits)
    tasks = [t for t in arms.TASKS if opts.only in (None, t)]
    wanted = None if opts.arms is None else {a.strip() for a in opts.arms.split(",") if a.strip()}
    selected = {t: [a for a in arms.TASKS[t].arms if wanted is None or a in wanted or f"{t}:{a}" in wanted]
                for t in tasks}  # fmt: skip
    started = time.perf_counter()
    print(f"results into {opts.out}: {opts.n_seeds} seeds, {opts.jobs} at a time", flush=True)
    growth = (lambda: run_growth(opts, settings, runner.pool)) if opts.only in (None, "growth") else None
    choices = protocol(runner, opts, {t: a for t, a in selected.items() if a}, growth)
    manifest_path = os.path.join(opts.out, "manifest.json")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        manifest = {}
    if manifest.get("settings") != settings:
        manifest = {"settings": settings, "choices": {}, "invocations": []}
    manifest["choices"].update(choices)
    manifest["seeds"] = opts.n_seeds
    manifest["machine"] = opts.machine
    ended = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    manifest["invocations"].append({"argv": opts.argv, "seconds": time.perf_counter() - started, "ended": ended})
    with open(manifest_path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(manifest_path + ".tmp", manifest_path)
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
