"""The measurements behind ``docs/results.md``: every schedule side by side on real weights and real text, and
progressive stacking against full depth; one JSON file per run under ``benchmarks/results/``.

Run it (CPU only, offline, after ``make assets``), then render the page::

    make bench-report                              # = python benchmarks/results.py && python benchmarks/report.py
    python benchmarks/results.py --quick           # a few minutes: 1 seed, 20 steps, into benchmarks/results/quick/
    python benchmarks/results.py --budget 4        # 4x the steps (fine-tuning and growth) on a bigger machine
    python benchmarks/results.py --only finetune --arms full,lisa --seeds 3

Resumable: a run whose JSON file exists with the same settings (and the same recipe text) is skipped, so a long
job can be split across invocations or interrupted; delete a file to re-run it. Runs that were not run (a recipe
missing or refused) or failed are retried at the next invocation.

**Fine-tuning** (SmolLM2-135M-Instruct from ``.cache/models``, float32 except the 4-bit trunks): every arm trains
``--steps`` optimizer steps of batch ``--batch-size`` × ``--seq-len`` tokens of CPython's documentation
(``.cache/data/pydoc_train.txt``, as ``make demo``), and is scored by the same held-out eval: the mean
cross-entropy on the first ``--eval-samples`` chunks of ``.cache/data/pydoc_eval.txt``. The arms (``ARMS``) take
their schedule from the named recipe; the model, data and training sections are replaced by the common ones above
(each recipe keeps its phases, adapters, quantization and ``training.learning_rate``). ``training.seed`` is the
seed (model-side randomness and data order; the same order for every arm of a seed); a ``sample``/``cycle``
generator's own ``seed`` is offset by it, so each seed draws other layers. Each run is a fresh subprocess, so its
peak RSS (``ru_maxrss``) is its own. Per run: the held-out loss after training, peak RSS and peak RssAnon, the
optimizer-state bytes (largest over the steps, after each step), trainable values, the median wall time of a
step (``on_step_begin`` to ``on_step_end``, the first step left out), the training-loss curve, the load average
and the share of the machine's CPU other processes used meanwhile. Within a seed the arms run back to back,
in alternating order from seed to seed, so each arm's step time has a full fine-tuning run of the same seed
measured next to it for the ratio.

**Progressive stacking** reuses ``benchmarks/growth.py`` (a byte-level Llama from a config, copy growth 1 → 2
→ 4 blocks against 4 blocks from the start; see its docstring): the full-depth runs go first, then the target
loss is fixed from them (median over seeds of their eval loss at ``--target-at`` of the budget) and written to
``growth-target.json`` before any growth run starts.

**Activation cache**: ``benchmarks/results/cache*.json`` is rendered if present; if ``benchmarks/cache.py``
exists and takes ``--out``, it is run once to produce ``cache.json``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from common import cpu_jiffies  # noqa: E402

MODEL = ".cache/models/SmolLM2-135M-Instruct"
TRAIN = ".cache/data/pydoc_train.txt"
EVAL = ".cache/data/pydoc_eval.txt"
RESULTS = os.path.join(HERE, "results")
TAG = "RESULTS-BENCH "
QUANTIZATION = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}

# arm -> (label, recipe whose schedule it runs, inline replacements of that recipe's sections or None)
ARMS = {
    "full": (
        "full fine-tuning",
        "recipes/demo.yaml",
        {"schedule": [{"name": "full", "until": 1.0, "train": "all", "learning_rate": 5.0e-5}], "adapters": None},
    ),
    "lora": (
        "LoRA (r 8, all linear layers, every stack)",
        "recipes/demo.yaml",
        {
            "schedule": [
                {"name": "lora", "until": 1.0, "train": [0, 1, 2, 3, 4], "adapter": "lora", "learning_rate": 1.0e-3}
            ],
            "adapters": {"r": 8, "alpha": 16},
        },
    ),
    "qlora-trunk": (
        "QLoRA trunk (4-bit blocks; LoRA r 16 on the top stack, r 4 trunk adapter below)",
        "recipes/demo.yaml",
        {
            "schedule": [
                {
                    "name": "trunk",
                    "until": 1.0,
                    "train": ["top"],
                    "adapter": "lora",
                    "trunk": "lora",
                    "learning_rate": 1.0e-3,
                }
            ],
            "adapters": {"r": 16, "alpha": 32, "trunk_r": 4},
            "quantization": QUANTIZATION,
        },
    ),
    "unfreeze": ("gradual unfreezing (the demo's schedule)", "recipes/demo.yaml", None),
    "badam": ("BAdam (block-coordinate cycle)", "recipes/smollm2-135m/badam.yaml", None),
    "lisa": ("LISA (sampled stacks)", "recipes/smollm2-135m/lisa.yaml", None),
    "llama-pro": ("LLaMA Pro expansion (4-bit trunk)", "recipes/smollm2-135m/llama_pro.yaml", None),
}
# training keys a recipe keeps (rates and optimizer); everything else comes from the common settings
KEEP_TRAINING = ("learning_rate", "weight_decay", "optim", "lr_scheduler_type", "warmup_ratio", "max_grad_norm")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="development run: 1 seed, 20 steps, results/quick/")
    parser.add_argument("--budget", type=float, default=1.0, help="multiply every step count by this (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run (default 40 x budget)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 3)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 64)")
    parser.add_argument("--eval-samples", type=int, default=None, help="held-out chunks (default 32)")
    parser.add_argument("--arms", default=",".join(ARMS), help="fine-tuning arms (default: all)")
    parser.add_argument("--growth-steps", type=int, default=None, help="growth runs' steps (default 400 x budget)")
    parser.add_argument("--only", choices=("finetune", "growth", "cache"), default=None)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results[/quick])")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads in every run (default: torch's own)"
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per run")
    parser.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)  # kind arm seed
    return parser


def settings_from(opts) -> dict:
    """The settings that make two runs comparable (stored in every JSON file; the number of seeds is not one of
    them: seed 0 of a 1-seed invocation is seed 0 of a 3-seed one)."""
    quick = opts.quick
    steps = opts.steps or max(1, round((20 if quick else 40) * opts.budget))
    return {
        "steps": steps,
        "batch_size": opts.batch_size,
        "seq_len": opts.seq_len or (32 if quick else 64),
        "eval_samples": opts.eval_samples or (8 if quick else 32),
        "growth": {
            "steps": opts.growth_steps or max(20, round((60 if quick else 400) * opts.budget)),
            "depth": 4,
            "batch_size": 16,
            "seq_len": 64,
            "lr": 2e-3,
            "eval_every": 10 if quick else 20,
            "target_at": 0.75,
        },
        "quick": quick,
        "budget": opts.budget,
    }


# ---- one run, inside a worker subprocess ---------------------------------------------------------------


def arm_recipe(arm: str, seed: int, settings: dict, output_dir: str) -> tuple[dict | None, str | None, str]:
    """(raw recipe, sha1 of the recipe file, reason) -- raw None with the reason when the recipe is missing."""
    import yaml

    _, path, inline = ARMS[arm]
    full_path = os.path.join(ROOT, path)
    if not os.path.isfile(full_path):
        return None, None, f"{path} does not exist (yet)"
    with open(full_path, "rb") as f:
        text = f.read()
    raw = yaml.safe_load(text)
    for key, value in (inline or {}).items():
        if key == "quantization":
            raw["model"]["quantization"] = value
        elif value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    raw["model"]["name_or_path"] = MODEL
    raw["data"] = {
        "train": {"path": "text", "data_files": TRAIN},
        "eval": {"path": "text", "data_files": EVAL},
        "max_eval_samples": settings["eval_samples"],
        "text_column": "text",
        "max_seq_length": settings["seq_len"],
        "task": "clm",
    }
    training = {k: v for k, v in (raw.get("training") or {}).items() if k in KEEP_TRAINING}
    training.update(
        output_dir=output_dir,
        overwrite_output_dir=True,
        max_steps=settings["steps"],
        per_device_train_batch_size=settings["batch_size"],
        per_device_eval_batch_size=8,
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
    )
    raw["training"] = training
    for phase in raw.get("schedule") or []:
        for generator in ("sample", "cycle"):
            if isinstance(phase, dict) and isinstance(phase.get(generator), dict):
                spec = phase[generator]
                spec["seed"] = (spec.get("seed", 0) if isinstance(spec.get("seed", 0), int) else 0) + seed
    return raw, hashlib.sha1(text).hexdigest(), ""


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


def finetune_worker(arm: str, seed: int, settings: dict) -> dict:
    import statistics
    import tempfile

    import memory
    from transformers import PrinterCallback, TrainerCallback

    from hf_stackwise.cli import pipeline as run
    from hf_stackwise.errors import StackwiseError
    from hf_stackwise.recipe.loader import validate_recipe

    memory.quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="stackwise-results-") as tmp:
        raw, sha, reason = arm_recipe(arm, seed, settings, os.path.join(tmp, "run"))
        result = {"recipe": ARMS[arm][1], "recipe_sha1": sha}
        if raw is None:
            return {**result, "status": "not run", "reason": reason}
        try:
            prepared = run.prepare(validate_recipe(raw, ARMS[arm][1]))
        except StackwiseError as err:
            return {**result, "status": "not run", "reason": " ".join(str(err).split())}
        base = memory.status_kib("VmRSS")["VmRSS"]
        sampler = memory.AnonSampler()
        model = run.load_model(prepared)
        trainer = run.build_trainer(prepared, model=model)
        trainer.remove_callback(PrinterCallback)
        spans, state = [], {"max": 0, "begin": 0.0}

        class Probe(TrainerCallback):
            def on_step_begin(self, args, st, control, **kwargs):
                state["begin"] = time.perf_counter()

            def on_step_end(self, args, st, control, **kwargs):
                spans.append(time.perf_counter() - state["begin"])
                state["max"] = max(state["max"], optimizer_state_bytes(trainer))

        trainer.add_callback(Probe())
        started = time.perf_counter()
        output = trainer.train()
        train_s = time.perf_counter() - started
        peak = memory.peak_kib()
        peak_anon = sampler.stop()
        eval_loss = trainer.evaluate()["eval_loss"]
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"]) if optimizer else 0
        curve = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e and "step" in e]
    return {
        **result,
        "status": "ok",
        "eval_loss": eval_loss,
        "train_loss": output.training_loss,
        "loss_curve": curve,
        "base_rss_kib": base,
        "peak_rss_kib": peak,
        "peak_anon_kib": peak_anon,
        "optimizer_state_bytes_max": state["max"],
        "optimizer_state_bytes_end": optimizer_state_bytes(trainer),
        "trainable_params_end": trainable,
        "requires_grad_params_end": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in trainer.model.parameters()),
        "step_s": statistics.median(spans[1:] or spans),
        "step_s_all": spans,
        "train_s": train_s,
        "phases": [p.name for p in prepared.recipe.schedule.phases]
        if hasattr(prepared.recipe.schedule, "phases")
        else None,
    }


def baseline_worker(settings: dict) -> dict:
    """The held-out loss of the pretrained model before any training (the fp32 arms start from it)."""
    import tempfile

    import memory

    from hf_stackwise.cli import pipeline as run
    from hf_stackwise.recipe.loader import validate_recipe

    memory.quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="stackwise-results-") as tmp:
        raw, _, _ = arm_recipe("full", 0, settings, os.path.join(tmp, "run"))
        trainer = run.build_trainer(run.prepare(validate_recipe(raw)))
        return {"status": "ok", "eval_loss": trainer.evaluate()["eval_loss"]}


def growth_worker(arm: str, seed: int, settings: dict) -> dict:
    import growth
    import memory

    memory.quiet_libraries()
    opts = argparse.Namespace(**settings["growth"])
    train, evaluation = growth.byte_datasets(opts.seq_len)
    started = time.perf_counter()
    out = growth.run_one(arm, seed, opts, train, evaluation)
    return {"status": "ok", "curve": out["curve"], "train_s": time.perf_counter() - started}


def worker_main(kind: str, arm: str, seed: int, settings: dict, threads: int | None) -> None:
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)
    if kind == "finetune":
        result = finetune_worker(arm, seed, settings)
    elif kind == "baseline":
        result = baseline_worker(settings)
    else:
        result = growth_worker(arm, seed, settings)
    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    result["torch_threads"] = torch.get_num_threads()
    print(TAG + json.dumps(result), flush=True)


# ---- the parent ------------------------------------------------------------------------------------------


def versions() -> dict:
    from importlib import metadata

    found = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "hf-stackwise"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    ram = None
    try:
        with open("/proc/meminfo") as f:
            ram = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        commit = commit.stdout.strip() or None
    except OSError:
        commit = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_bytes": ram,
        "versions": versions(),
        "commit": commit,
    }


def children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def spawn(kind: str, arm: str, seed: int, opts) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", kind, arm, str(seed)]
    command += sys.argv[1:] if opts.argv is None else opts.argv
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    started, jiffies, own, load = time.perf_counter(), cpu_jiffies(), children_cpu(), os.getloadavg()
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=opts.timeout, env=env, cwd=ROOT)
        stdout, stderr, code = out.stdout, out.stderr, out.returncode
    except subprocess.TimeoutExpired:
        stdout, stderr, code = "", f"timed out after {opts.timeout:.0f} s", None
    end = cpu_jiffies()
    other = None
    if jiffies and end and end[1] > jiffies[1]:
        mine = (children_cpu() - own) * os.sysconf("SC_CLK_TCK")
        other = max(0.0, (end[0] - jiffies[0]) - mine) / (end[1] - jiffies[1])
    result = next((json.loads(line[len(TAG) :]) for line in stdout.splitlines() if line.startswith(TAG)), None)
    if result is None:
        tail = " | ".join((stderr or stdout).strip().splitlines()[-6:])
        result = {"status": "failed", "reason": f"exit status {code}: {tail}"}
    result.update(
        kind=kind,
        arm=arm,
        seed=seed,
        started=when,
        wall_s=time.perf_counter() - started,
        load_before=list(load),
        load_after=list(os.getloadavg()),
        other_cpu=other,
    )
    return result


def existing(path: str, settings: dict, sha: str | None = "any") -> dict | None:
    """The stored result at ``path`` when it is a finished run with these settings (and recipe text)."""
    try:
        with open(path) as f:
            stored = json.load(f)
    except (OSError, ValueError):
        return None
    if stored.get("status") != "ok" or stored.get("settings") != settings:
        return None
    if sha != "any" and stored.get("recipe_sha1") != sha:
        return None
    return stored


def recipe_sha(arm: str) -> str | None:
    path = os.path.join(ROOT, ARMS[arm][1])
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def do(kind: str, arm: str, seed: int, path: str, opts, settings: dict, sha="any") -> dict:
    stored = existing(path, settings, sha)
    if stored is not None:
        print(f"  {os.path.basename(path)}: present, skipped", flush=True)
        return stored
    result = spawn(kind, arm, seed, opts)
    result["settings"] = settings
    result["machine"] = opts.machine
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    shown = result.get("eval_loss") if kind != "growth" else (result.get("curve") or [[None] * 4])[-1][3]
    extra = f"loss {shown:.4f}" if isinstance(shown, float) else result.get("reason", "")
    print(f"  {os.path.basename(path)}: {result['status']} in {result['wall_s']:.0f} s, {extra}", flush=True)
    return result


def run_finetune(opts, settings: dict) -> None:
    arms = [a.strip() for a in opts.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; known: {', '.join(ARMS)}")
    do("baseline", "none", 0, os.path.join(opts.out, "finetune-baseline.json"), opts, settings)
    for seed in range(opts.n_seeds):
        order = arms if seed % 2 == 0 else arms[::-1]  # alternate, so drift does not favour one arm
        for arm in order:
            path = os.path.join(opts.out, f"finetune-{arm}-seed{seed}.json")
            do("finetune", arm, seed, path, opts, settings, sha=recipe_sha(arm))


def run_growth(opts, settings: dict) -> None:
    import statistics

    g = settings["growth"]
    full = []
    for seed in range(opts.n_seeds):
        full.append(do("growth", "full", seed, os.path.join(opts.out, f"growth-full-seed{seed}.json"), opts, settings))
    curves = [r["curve"] for r in full if r.get("status") == "ok"]
    if not curves:
        print("  growth: no full-depth run finished; no target, no growth runs", flush=True)
        return
    target_path = os.path.join(opts.out, "growth-target.json")
    target = existing(target_path, settings)
    if target is not None and target.get("from_seeds") != len(curves):
        target = None  # more full-depth seeds since: fixed again, from the full-depth runs only
    if target is None:  # fixed before any growth run starts, from the full-depth runs only
        at = max(1, round(g["target_at"] * g["steps"] / g["eval_every"])) - 1
        at = min(at, min(len(c) for c in curves) - 1)
        target = {
            "status": "ok",
            "settings": settings,
            "target": statistics.median(c[at][3] for c in curves),
            "at_step": curves[0][at][0],
            "from_seeds": len(curves),
            "fixed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        with open(target_path, "w") as f:
            json.dump(target, f, indent=1)
    print(f"  growth target eval loss {target['target']:.4f} (full depth at step {target['at_step']})", flush=True)
    for seed in range(opts.n_seeds):
        do("growth", "grow", seed, os.path.join(opts.out, f"growth-grow-seed{seed}.json"), opts, settings)


def run_cache(opts) -> None:
    script = os.path.join(HERE, "cache.py")
    target = os.path.join(opts.out, "cache.json")
    if os.path.exists(target) or not os.path.isfile(script):
        print("  cache: " + ("cache.json present, skipped" if os.path.exists(target) else "no benchmarks/cache.py"))
        return
    with open(script) as f:
        if "--out" not in f.read():
            print("  cache: benchmarks/cache.py takes no --out; not run")
            return
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=ROOT)
    try:
        out = subprocess.run(
            [sys.executable, script, "--out", target], env=env, cwd=ROOT, timeout=opts.timeout, capture_output=True
        )
        print(f"  cache: benchmarks/cache.py exit status {out.returncode}", flush=True)
    except subprocess.TimeoutExpired:
        print("  cache: benchmarks/cache.py timed out", flush=True)


def write_manifest(opts, settings: dict, seconds: float | None) -> None:
    """The settings report.py renders (the last invocation's), the machine and the invocation's wall time."""
    manifest = {"settings": settings, "seeds": opts.n_seeds, "last_invocation_s": seconds, "machine": opts.machine}
    with open(os.path.join(opts.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


def main(argv=None) -> None:
    opts = make_parser().parse_args(argv)
    opts.argv = argv
    settings = settings_from(opts)
    if opts.worker:
        kind, arm, seed = opts.worker
        worker_main(kind, arm, int(seed), settings, opts.threads)
        return
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    if not os.path.isdir(os.path.join(ROOT, MODEL)) or not os.path.isfile(os.path.join(ROOT, TRAIN)):
        raise SystemExit("run `make assets` first (SmolLM2-135M-Instruct and the Python-docs corpus)")
    opts.out = opts.out or (os.path.join(RESULTS, "quick") if opts.quick else RESULTS)
    os.makedirs(opts.out, exist_ok=True)
    opts.machine = machine()
    opts.n_seeds = opts.seeds or (1 if opts.quick else 3)
    started = time.perf_counter()
    write_manifest(opts, settings, None)  # now, so an interrupted invocation's runs render too
    print(f"results into {opts.out}: {opts.n_seeds} seeds, {json.dumps(settings)}", flush=True)
    if opts.only in (None, "finetune"):
        run_finetune(opts, settings)
    if opts.only in (None, "growth"):
        run_growth(opts, settings)
    if opts.only in (None, "cache"):
        run_cache(opts)
    seconds = time.perf_counter() - started
    write_manifest(opts, settings, seconds)
    print(f"done in {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
