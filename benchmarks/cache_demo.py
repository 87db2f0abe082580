"""The demo-recipe part of ``benchmarks/cache.py``: ``recipes/demo.yaml`` trained 3 epochs over a short corpus with
each ``cache.activations`` value, timed per phase, with the cache's decisions and measured hit rates."""

from __future__ import annotations

import os
import statistics
import time

from common import cache_step_timer, pydoc_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2 = os.path.join(ROOT, ".cache", "models", "SmolLM2-135M-Instruct")
DEMO = os.path.join(ROOT, "recipes", "demo.yaml")


def demo_arm(activations: str, corpus: str, folder: str) -> dict:
    from transformers import PrinterCallback

    from hf_stackwise.cli.pipeline import build_trainer, prepare
    from hf_stackwise.recipe.loader import load_recipe

    overrides = {
        "data.train.data_files": corpus,
        "training.max_steps": "-1",
        "training.num_train_epochs": "3",
        "training.eval_strategy": "no",
        "training.eval_on_start": "false",
        "training.save_strategy": "no",
        "training.logging_steps": "1000",
        "training.disable_tqdm": "true",
        "training.output_dir": os.path.join(folder, f"demo-{activations}"),
        "cache.activations": activations,
    }
    recipe = load_recipe(DEMO, [f"--{k}={v}" for k, v in overrides.items()])
    prepared = prepare(recipe)
    trainer = build_trainer(prepared)
    trainer.remove_callback(PrinterCallback)  # it prints the final train metrics
    timer = cache_step_timer()
    trainer.add_callback(timer)
    timer.trainer = trainer
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    loss = trainer.evaluate()["eval_loss"]
    phases = []
    for d in trainer.cache_decisions or []:
        steps = [s for s in timer.steps if s["phase"] == d.index]
        looked = sum(s["rows"] for s in steps)
        phases.append(
            {
                "phase": trainer.schedule.phases[d.index].name,
                "on": d.on,
                "cut_blocks": d.cut,
                "reason": d.reason,
                "visits": round(d.visits, 3),
                "hit_rate_expected": round(d.hit_rate, 3) if d.on else 0.0,
                "hit_rate_measured": round(sum(s["hits"] for s in steps) / looked, 3) if looked else 0.0,
                "steps": len(steps),
                "step_s": statistics.median(s["s"] for s in steps) if steps else None,
            }
        )
    return {
        "activations": activations,
        "rows": len(prepared.train_dataset),
        "steps": trainer.state.global_step,
        "train_s": train_s,
        "eval_s": time.perf_counter() - start,
        "eval_loss": loss,
        "phases": phases,
    }


def bench_demo(args, rows: int, tmp: str) -> dict:
    import gc

    corpus = pydoc_corpus(rows, 128, tmp)
    print(f"\n== demo recipe (recipes/demo.yaml), 3 epochs over {rows} chunks of 128 tokens", flush=True)
    runs = {}
    for activations in args.demo_arms:
        run = runs[activations] = demo_arm(activations, corpus, tmp)
        cached = ", ".join(
            f"{p['phase']}: " + (f"cut {p['cut_blocks']}, hits {p['hit_rate_measured']:.2f}" if p["on"] else "off")
            for p in run["phases"]
        )
        print(
            f"   activations {activations:<5}  {run['steps']} steps  train {run['train_s']:7.1f} s  eval loss "
            f"{run['eval_loss']:.6f}  [{cached or 'no cache'}]",
            flush=True,
        )
        gc.collect()
    base = runs.get("false")
    summary = {"runs": runs}
    if base:
        summary["ratio"] = {
            f"wall_uncached_over_{a}": base["train_s"] / r["train_s"] for a, r in runs.items() if a != "false"
        }
        summary["eval_loss_delta"] = {a: r["eval_loss"] - base["eval_loss"] for a, r in runs.items() if a != "false"}
    return summary
