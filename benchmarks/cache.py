"""What the frozen-prefix activation cache saves: step time cached vs uncached vs all-trainable, against FLOP limits.

Run it (CPU only, offline; about 15 minutes with the defaults on 2 quiet cores, 3 with ``--quick``)::

    make bench                          # or: python benchmarks/cache.py
    python benchmarks/cache.py --quick  # development: tiny sizes, one repeat -> benchmarks/results/quick/cache.json
    python benchmarks/cache.py --only llama --repeats 3

**Models** (``--only`` picks some): ``llama``, a 12-block Llama of width 256 built from a config (byte
vocabulary of 256, untied head, so the head is small), 4 stacks of 3 blocks, on UTF-8 bytes of
``pydoc_data.topics``; ``smollm2``, SmolLM2-135M-Instruct from ``.cache/models`` (30 blocks, tied 49k-token
head), 5 stacks of 6, on the same prose tokenized by its tokenizer. Each trains its top stack only (the Llama's
head trains too; SmolLM2's tied head cannot train under the cache, so it stays frozen): a frozen prefix of K - 1
stacks.

**Arms**, run interleaved (the order rotates every repeat) after one untimed warm-up round, each with a fresh model
of the same init and the same data order, ``max_steps`` = E epochs of N rows:

* ``off``: the top-stack phase with ``cache.activations: false`` (the uncached step);
* ``cached``: the same phase with ``activations: true``: epoch 1 fills the store (every row a miss), epochs 2..E
  are all hits (checked per step from the trainer's counts);
* ``auto-off``: ``activations: auto`` on E x N distinct rows, so each row is seen once and ``auto`` turns the
  cache off (the row-id column still travels with the batch): the cost of the feature when it does not run;
* ``all``: every stack and the head train, no cache.

The *step* is ``on_step_begin`` to ``on_step_end`` (forward, backward, optimizer). Each ratio pairs two runs of the
same repeat over the same step window (hits: epochs 2..E; misses: epoch 1 without its first ``--drop`` steps), and
the table gives the median over repeats. The *phase* is ``on_train_begin`` to ``on_train_end`` of the whole E-epoch
run, fills included.

**Limits from FLOP counts**: PyTorch's ``FlopCounterMode`` runs one real forward + backward of each arm's step on the
same batch shape (eager attention so the score matmuls count) and attributes FLOPs per block and to the head. A
cached step is the uncached step minus the prefix blocks' forward, so ``limit = FLOPs(uncached) / FLOPs(cached)``
(and likewise against all-trainable); with K equal stacks and H = the head's forward cost in stack units this is
``(K + 2 + 3H) / (3 + 3H)`` for a training head (``2H`` for a frozen one). A whole phase with E visits per row,
where only the first visit misses, is limited by the lazy-fill formula ``1 / (1/E + (1 - 1/E) / S)``; S is the
measured all-hit speedup (so the phase target isolates the cost of filling), and the formula with S at its FLOP
limit is shown too.

**Targets** (pass/fail printed and stored): cached/uncached >= 0.8 x its limit; >= 3x against all-trainable (the
Llama, K = 4, small vocabulary); the whole phase >= 0.8 x the lazy-fill formula; ``auto-off`` and the miss steps
<= 1.02 x the uncached step.

**Realistic job**: ``recipes/demo.yaml`` (SmolLM2-135M, three phases unfreezing from the top) for 3 epochs over the
first ``--demo-rows`` chunks of ``.cache/data/pydoc_train.txt``, once per ``cache.activations`` value: wall time of
``trainer.train()``, the final eval loss (the cache is exact, so it should not move), and per phase what the policy
decided and the hit rate it got.

Results go to ``benchmarks/results/cache.json`` (``--quick``: ``benchmarks/results/quick/cache.json``); every key
holding a measured speedup has ``ratio`` in its name. Load from other work distorts the step times (more for the
bigger arms, so ratios drift too): the load average and the other processes' CPU share are printed and stored; on a
busy machine ``--threads 1`` keeps torch's threads from stalling on each other and gives steadier ratios. A
report, not a test: the exit status is 0 whatever the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from cache_demo import bench_demo  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from common import CpuShare, cache_step_timer, cpu_model, load_average  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2 = os.path.join(ROOT, ".cache", "models", "SmolLM2-135M-Instruct")
ARMS = ("off", "cached", "auto-off", "all")
TARGET_OF_LIMIT = 0.8
TARGET_VS_ALL = 3.0
TARGET_OVERHEAD = 1.02
# name: model, stacks, step shape; the --quick sizes in "quick"
MODELS = {
    "llama": {
        "label": "Llama 12 x 256 from a config, vocab 256, 4 stacks of 3",
        "layers": 12,
        "hidden": 256,
        "blocks_per_stack": 3,
        "head": "train",
        "full": {"seq_len": 128, "batch": 8, "rows": 32, "epochs": 4, "repeats": 5},
        "quick": {"seq_len": 64, "batch": 2, "rows": 4, "epochs": 3},
    },
    "smollm2": {
        "label": "SmolLM2-135M-Instruct, 5 stacks of 6, tied head (frozen)",
        "blocks_per_stack": 6,
        "head": None,
        "full": {"seq_len": 64, "batch": 4, "rows": 16, "epochs": 3, "repeats": 3},
        "quick": {"seq_len": 32, "batch": 2, "rows": 4, "epochs": 3},
    },
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat, demo on 8 rows (development)")
    parser.add_argument("--only", nargs="+", choices=[*MODELS, "demo"], help="parts to run (default: all)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed rounds of the 4 arms (default: Llama 5, SmolLM2 3; quick 1)"
    )
    parser.add_argument("--drop", type=int, default=1, help="warm-up steps left out of the miss window (default 1)")
    parser.add_argument("--demo-rows", type=int, default=None, help="demo training chunks (default 24; quick 8)")
    parser.add_argument("--demo-arms", nargs="+", default=["false", "auto", "true"], help="cache.activations values")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; unset: torch's default")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results[/quick]/cache.json)")
    return parser


def machine() -> dict:
    import platform

    import datasets
    import torch
    import transformers

    import hf_stackwise

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "datasets": datasets.__version__,
            "hf_stackwise": getattr(hf_stackwise, "__version__", "?"),
        },
    }


# ---- models and data ---------------------------------------------------------------------------------------


def build_model(name: str, spec: dict, seq_len: int):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name == "smollm2":
        return AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=spec["hidden"],
        intermediate_size=4 * spec["hidden"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def token_rows(name: str, seq_len: int, count: int) -> list[list[int]]:
    if name == "llama":
        from overhead import pydoc_byte_chunks

        rows = pydoc_byte_chunks(seq_len)
        if len(rows) < count:
            raise RuntimeError(f"only {len(rows)} byte rows of {seq_len}; need {count}")
        return rows[:count]
    from transformers import AutoTokenizer
    from transition import token_rows as tokenized

    return tokenized(AutoTokenizer.from_pretrained(SMOLLM2), seq_len, count)


def schedules(spec: dict) -> dict[str, list[dict]]:
    top = {"name": "top", "until": 1.0, "train": ["top"]}
    if spec["head"]:
        top["head"] = spec["head"]
    return {"top": [top], "all": [{"name": "all", "until": 1.0, "train": "all"}]}


# ---- FLOP limits -------------------------------------------------------------------------------------------


def flop_limits(model, spec: dict, batch) -> dict:
    """FLOPs per block and head from real forward/backward passes; the cached step's limits from them."""
    from torch.utils.flop_counter import FlopCounterMode

    layers = model.model.layers
    n, per = len(layers), spec["blocks_per_stack"]
    stacks = n // per
    prefix = list(range(n - per))
    top = [p for i in range(n - per, n) for p in layers[i].parameters()]
    head = list(model.lm_head.parameters()) if spec["head"] == "train" else []
    cls = type(model).__name__
    model.set_attn_implementation("eager")  # the score matmuls count only outside the fused kernel

    def count(trainable, backward: bool) -> dict[str, int]:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        with FlopCounterMode(display=False) as counter:
            out = model(**batch)
            if backward:
                out.loss.backward()
        model.zero_grad(set_to_none=True)
        return {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}

    try:
        fwd = count([], backward=False)
        uncached = count(top + head, backward=True)
        everything = count(list(model.parameters()), backward=True)
    finally:
        model.set_attn_implementation("sdpa")
        for p in model.parameters():
            p.requires_grad_(True)
    block = [fwd[f"{cls}.model.layers.{i}"] for i in range(n)]
    head_fwd = fwd[f"{cls}.lm_head"]
    cached = uncached["Global"] - sum(uncached[f"{cls}.model.layers.{i}"] for i in prefix)
    stack_unit = sum(block) / stacks
    h = head_fwd / stack_unit
    c = 3 if spec["head"] == "train" else 2
    return {
        "stacks": stacks,
        "block_forward_gflop": sum(block) / n / 1e9,
        "head_forward_gflop": head_fwd / 1e9,
        "H": h,
        "step_gflop": {"off": uncached["Global"] / 1e9, "cached": cached / 1e9, "all": everything["Global"] / 1e9},
        "limit_cached": uncached["Global"] / cached,
        "limit_vs_all": everything["Global"] / cached,
        "formula_cached": (stacks + 2 + c * h) / (3 + c * h),
        "formula_vs_all": (3 * stacks + 3 * h) / (3 + c * h),  # every arm but the cached one trains the head
        "head_coefficient": c,
    }


def lazy_fill(epochs: float, speedup: float) -> float:
    """Phase speedup when each of E visits per row but the first is a hit worth ``speedup``."""
    return 1.0 / (1.0 / epochs + (1.0 - 1.0 / epochs) / speedup)


# ---- timed runs --------------------------------------------------------------------------------------------


def run_arm(name: str, spec: dict, size: dict, arm: str, rows: list, out_dir: str) -> dict:
    import datasets
    from transformers import PrinterCallback

    from hf_stackwise.trainer import StackwiseArguments, StackwiseTrainer

    steps = size["epochs"] * size["rows"] // size["batch"]
    data = rows[: size["rows"]] if arm != "auto-off" else rows[: size["rows"] * size["epochs"]]
    activations = {"off": False, "cached": True, "auto-off": "auto", "all": False}[arm]
    args = StackwiseArguments(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=size["batch"],
        learning_rate=1e-4,
        schedule=schedules(spec)["all" if arm == "all" else "top"],
        blocks_per_stack=spec["blocks_per_stack"],
        activation_cache={"activations": activations},
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    timer = cache_step_timer()
    model = build_model(name, spec, size["seq_len"])
    dataset = datasets.Dataset.from_dict({"input_ids": data, "labels": data})
    trainer = StackwiseTrainer(model=model, args=args, train_dataset=dataset, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    timer.trainer = trainer
    output = trainer.train()
    decision = (trainer.cache_decisions or [None])[0]
    if arm == "cached" and not (decision and decision.on):
        raise RuntimeError(f"{name}: the cache did not turn on ({decision.reason if decision else 'no decision'})")
    if arm == "auto-off" and decision is not None and decision.on:
        raise RuntimeError(f"{name}: auto turned the cache on with one visit per row")
    return {
        "arm": arm,
        "steps": timer.steps,
        "train_s": timer.train_s,
        "loss": output.training_loss,
        "decision": None if decision is None else {"on": decision.on, "cut": decision.cut, "reason": decision.reason},
    }


def window(run: dict, lo: int, hi: int) -> float:
    return statistics.median(s["s"] for s in run["steps"][lo:hi])


def summarize(name: str, spec: dict, size: dict, runs: list[dict], limits: dict, drop: int) -> dict:
    per_epoch = size["rows"] // size["batch"]
    total = per_epoch * size["epochs"]
    hit, miss, every = (per_epoch, total), (min(drop, per_epoch - 1), per_epoch), (min(drop, total - 1), total)
    by_repeat: dict[int, dict[str, dict]] = {}
    for r in runs:
        by_repeat.setdefault(r["repeat"], {})[r["arm"]] = r
    rounds = list(by_repeat.values())

    def paired(num: str, den: str, span) -> float:
        return statistics.median(window(r[num], *span) / window(r[den], *span) for r in rounds)

    def median_ms(arm: str, span) -> float:
        return 1000 * statistics.median(window(r[arm], *span) for r in rounds)

    hits = [s for r in rounds for s in r["cached"]["steps"][per_epoch:]]
    misses = [s for r in rounds for s in r["cached"]["steps"][:per_epoch]]
    speedup = paired("off", "cached", hit)
    vs_all = paired("all", "cached", hit)
    phase = statistics.median(r["off"]["train_s"] / r["cached"]["train_s"] for r in rounds)
    epochs = size["epochs"]
    lazy_measured, lazy_limit = lazy_fill(epochs, speedup), lazy_fill(epochs, limits["limit_cached"])
    result = {
        "label": spec["label"],
        "size": dict(size),
        "repeats": len(rounds),
        "flops": limits,
        "step_ms": {
            "off": median_ms("off", hit),
            "cached_hit": median_ms("cached", hit),
            "all": median_ms("all", hit),
            "off_epoch1": median_ms("off", miss),
            "cached_miss": median_ms("cached", miss),
            "auto_off": median_ms("auto-off", every),
            "off_all_steps": median_ms("off", every),
        },
        "phase_s": {arm: statistics.median(r[arm]["train_s"] for r in rounds) for arm in ARMS},
        "hit_steps_all_hits": all(s["rows"] and s["hits"] == s["rows"] for s in hits),
        "miss_steps_all_misses": all(s["hits"] == 0 for s in misses),
        "same_training_loss": all(r["off"]["loss"] == r["cached"]["loss"] for r in rounds),
        "ratio": {
            "uncached_over_cached": speedup,
            "all_over_cached": vs_all,
            "phase_uncached_over_cached": phase,
            "miss_over_uncached": paired("cached", "off", miss),
            "auto_off_over_uncached": paired("auto-off", "off", every),
        },
        "flop_limit_ratio": {
            "uncached_over_cached": limits["limit_cached"],
            "all_over_cached": limits["limit_vs_all"],
            "phase_uncached_over_cached": lazy_limit,
        },
        "lazy_fill": {"epochs": epochs, "with_measured_speedup": lazy_measured, "with_flop_limit": lazy_limit},
    }
    r = result["ratio"]
    targets = {
        "cached_vs_uncached": (speedup / limits["limit_cached"], f">= {TARGET_OF_LIMIT} x limit"),
        "phase_vs_lazy_fill": (phase / lazy_measured, f">= {TARGET_OF_LIMIT} x lazy-fill"),
        "miss_step_overhead": (r["miss_over_uncached"], f"<= {TARGET_OVERHEAD}"),
        "auto_off_overhead": (r["auto_off_over_uncached"], f"<= {TARGET_OVERHEAD}"),
    }
    if name == "llama":
        targets["vs_all_trainable"] = (vs_all, f">= {TARGET_VS_ALL}")
    result["targets"] = {
        k: {"value": v, "target": t, "pass": v >= float(t.split()[1]) if t[0] == ">" else v <= float(t.split()[1])}
        for k, (v, t) in targets.items()
    }
    return result


def bench_model(name: str, args, size: dict, repeats: int, tmp: str) -> dict:
    import gc

    import torch

    spec = MODELS[name]
    need = size["rows"] * size["epochs"]
    rows = token_rows(name, size["seq_len"], need)
    probe = build_model(name, spec, size["seq_len"])
    ids = torch.tensor(rows[: size["batch"]])
    limits = flop_limits(probe, spec, {"input_ids": ids, "labels": ids})
    del probe
    print(f"\n== {spec['label']}: batch {size['batch']} x {size['seq_len']} tokens, {size['rows']} rows, "
          f"{size['epochs']} epochs, {repeats} repeats", flush=True)  # fmt: skip
    print(
        f"   FLOPs: block fwd {limits['block_forward_gflop']:.3f} G, head fwd {limits['head_forward_gflop']:.3f} G "
        f"(H = {limits['H']:.3f} stacks); step off {limits['step_gflop']['off']:.2f} G, cached "
        f"{limits['step_gflop']['cached']:.2f} G, all {limits['step_gflop']['all']:.2f} G; limits: cached "
        f"{limits['limit_cached']:.2f}x (formula {limits['formula_cached']:.2f}x), vs all "
        f"{limits['limit_vs_all']:.2f}x",
        flush=True,
    )
    for arm in ARMS if not args.quick else ():  # untimed warm-up round
        run_arm(name, spec, {**size, "epochs": 2}, arm, rows, os.path.join(tmp, f"{name}-warm-{arm}"))
        gc.collect()
    runs = []
    print(f"   {'rep':>3}  {'arm':<8}  {'median step ms':>14}  {'phase s':>8}  {'hit rate':>8}  loss")
    for repeat in range(repeats):
        order = ARMS[repeat % len(ARMS) :] + ARMS[: repeat % len(ARMS)]
        for arm in order:
            run = run_arm(name, spec, size, arm, rows, os.path.join(tmp, f"{name}-{repeat}-{arm}"))
            run["repeat"] = repeat
            runs.append(run)
            looked = sum(s["rows"] for s in run["steps"])
            rate = f"{sum(s['hits'] for s in run['steps']) / looked:.3f}" if looked else "-"
            ms = 1000 * statistics.median(s["s"] for s in run["steps"][args.drop :])
            print(
                f"   {repeat:>3}  {arm:<8}  {ms:14.1f}  {run['train_s']:8.2f}  {rate:>8}  {run['loss']:.6f}",
                flush=True,
            )
            gc.collect()
    return summarize(name, spec, size, runs, limits, args.drop)


# ---- main --------------------------------------------------------------------------------------------------


def print_table(results: dict) -> None:
    print("\nSummary (median over repeats of per-repeat paired ratios; step ms are medians)")
    for r in results["models"].values():
        f, ms, ratio = r["flops"], r["step_ms"], r["ratio"]
        print(f"\n{r['label']}  (K = {f['stacks']}, H = {f['H']:.3f}, {r['repeats']} repeats)")
        print(f"  {'':<36} {'measured':>9} {'FLOP limit':>10} {'of limit':>8}")
        print(f"  {'uncached / cached step (all hits)':<36} {ratio['uncached_over_cached']:9.2f} "
              f"{f['limit_cached']:10.2f} {ratio['uncached_over_cached'] / f['limit_cached']:8.2f}")  # fmt: skip
        print(f"  {'all-trainable / cached step':<36} {ratio['all_over_cached']:9.2f} "
              f"{f['limit_vs_all']:10.2f} {ratio['all_over_cached'] / f['limit_vs_all']:8.2f}")  # fmt: skip
        lazy = r["lazy_fill"]
        print(f"  {'whole phase, ' + str(lazy['epochs']) + ' epochs, uncached / cached':<36} "
              f"{ratio['phase_uncached_over_cached']:9.2f} {lazy['with_measured_speedup']:10.2f} "
              f"{ratio['phase_uncached_over_cached'] / lazy['with_measured_speedup']:8.2f}"
              f"   (lazy fill; {lazy['with_flop_limit']:.2f} at the FLOP limit)")  # fmt: skip
        print(f"  {'miss step / uncached step':<36} {ratio['miss_over_uncached']:9.3f}")
        print(f"  {'auto-off step / uncached step':<36} {ratio['auto_off_over_uncached']:9.3f}")
        print(
            f"  step ms: off {ms['off']:.0f}, cached hit {ms['cached_hit']:.0f}, all {ms['all']:.0f}, cached miss "
            f"{ms['cached_miss']:.0f} (off {ms['off_epoch1']:.0f}), auto-off {ms['auto_off']:.0f} "
            f"(off {ms['off_all_steps']:.0f}); hits all hit: {r['hit_steps_all_hits']}, misses all miss: "
            f"{r['miss_steps_all_misses']}, cached loss == uncached loss: {r['same_training_loss']}"
        )
        for key, t in r["targets"].items():
            print(f"  target {key:<22} {t['value']:7.3f}  {t['target']:<22} {'pass' if t['pass'] else 'FAIL'}")
    demo = results.get("demo")
    if demo:
        print("\nDemo recipe, 3 epochs: wall time of trainer.train() and final eval loss")
        for a, run in demo["runs"].items():
            ratio = demo.get("ratio", {}).get(f"wall_uncached_over_{a}")
            extra = f"  uncached / this {ratio:.2f}x" if ratio else ""
            print(f"  activations {a:<5} {run['train_s']:8.1f} s  eval loss {run['eval_loss']:.6f}{extra}")
            for p in run["phases"]:
                state = (
                    f"cut {p['cut_blocks']} blocks, expected hits {p['hit_rate_expected']:.2f}, measured "
                    f"{p['hit_rate_measured']:.2f}"
                    if p["on"]
                    else f"off ({p['reason']})"
                )
                print(f"      {p['phase']:<12} {p['steps']:>3} steps, visits {p['visits']:.2f}: {state}")


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    import tempfile
    import warnings

    import datasets
    import torch
    import transformers

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    parts = args.only or [*MODELS, "demo"]
    if ("smollm2" in parts or "demo" in parts) and not os.path.isdir(SMOLLM2):
        raise SystemExit(f"{SMOLLM2} is missing; run `make assets` first")
    mode = "quick" if args.quick else "full"
    out = args.out or os.path.join(ROOT, "benchmarks", "results", *(["quick"] if args.quick else []), "cache.json")
    results = {"benchmark": "cache", "quick": args.quick, "machine": machine(), "load_average_start": load_average()}
    m = results["machine"]
    print("Frozen-prefix activation cache: step and phase time, cached vs uncached vs all-trainable")
    print(f"  {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}; {m['platform']}")
    print("  " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    print(f"  load average at start {results['load_average_start']} (1/5/15 min); mode {mode}")
    share = CpuShare()
    started = time.perf_counter()
    results["models"] = {}
    with tempfile.TemporaryDirectory(prefix="stackwise-cache-bench-") as tmp:
        for name in MODELS:
            if name in parts:
                size = MODELS[name][mode]
                repeats = args.repeats or size.get("repeats", 1)
                results["models"][name] = bench_model(name, args, size, repeats, tmp)
        if "demo" in parts:
            results["demo"] = bench_demo(args, args.demo_rows or (8 if args.quick else 24), tmp)
    results["load_average_end"] = load_average()
    results["other_cpu"] = share.other()
    results["wall_s"] = time.perf_counter() - started
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print_table(results)
    other = results["other_cpu"]
    print(
        f"\nload average {results['load_average_start']} at start, {results['load_average_end']} at end; other "
        f"processes used {'n/a' if other is None else f'{100 * other:.0f}%'} of the machine's CPU; "
        f"{results['wall_s'] / 60:.1f} min in all"
    )
    print(f"results: {os.path.relpath(out, ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
