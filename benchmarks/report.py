"""Render ``docs/results.md`` and its plots from the JSON files of ``benchmarks/results.py`` (and nothing else).

    python benchmarks/report.py                                   # benchmarks/results -> docs/results.md
    python benchmarks/report.py --results benchmarks/results/quick --out /tmp/results.md --images /tmp/img

Only runs made with the settings of the results folder's ``manifest.json`` (the last invocation) are used; runs
missing from the folder show as "not run yet", refused or failed ones with their reason.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MIB = 1024 * 1024
BUSY = 0.25  # above this share of the CPU taken by other processes, step times are not compared
TIE = 0.02  # held-out loss differences below this (nats) count as a tie whatever the seed spread
ARMS = {  # the order and labels of benchmarks/results.py (kept here so the page renders without importing it)
    "full": "full fine-tuning",
    "lora": "LoRA (r 8, every stack)",
    "qlora-trunk": "QLoRA trunk (4-bit blocks, LoRA top r 16 + trunk r 4)",
    "unfreeze": "gradual unfreezing (the demo's schedule)",
    "badam": "BAdam (block-coordinate cycle)",
    "lisa": "LISA (sampled stacks)",
    "llama-pro": "LLaMA Pro expansion (4-bit trunk)",
}
RECIPES = {
    "full": "`recipes/demo.yaml`, one phase `train: all`, lr 5e-5",
    "lora": "`recipes/demo.yaml`, one phase `train: [0..4], adapter: lora`, lr 1e-3",
    "qlora-trunk": "`recipes/demo.yaml` + 4-bit nf4, `train: [top], adapter: lora, trunk: lora`, lr 1e-3",
    "unfreeze": "`recipes/demo.yaml` (its schedule)",
    "badam": "`recipes/smollm2-135m/badam.yaml`",
    "lisa": "`recipes/smollm2-135m/lisa.yaml`",
    "llama-pro": "`recipes/smollm2-135m/llama_pro.yaml`",
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "results.md"))
    parser.add_argument("--images", default=os.path.join(ROOT, "docs", "images", "results"))
    return parser


def load(folder: str) -> tuple[dict, dict]:
    """(manifest, {file name: result}) for the runs made with the manifest's settings."""
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        name = os.path.basename(path)
        if name == "manifest.json" or name.startswith("cache"):
            continue
        with open(path) as f:
            result = json.load(f)
        if result.get("settings") == manifest["settings"]:
            runs[name[: -len(".json")]] = result
    return manifest, runs


def mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def fmt(value, spec: str = ".3f", missing: str = "–") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


# ---- fine-tuning ---------------------------------------------------------------------------------------------


def finetune_rows(runs: dict, seeds: int) -> dict:
    """arm -> summary over its seeds (ok runs), with the reason of any run that is not ok."""
    full = {s: runs.get(f"finetune-full-seed{s}") for s in range(seeds)}
    rows = {}
    for arm in ARMS:
        done, problems = [], []
        for seed in range(seeds):
            run = runs.get(f"finetune-{arm}-seed{seed}")
            if run is None:
                problems.append("not run yet")
            elif run.get("status") == "not run":
                problems.append(str(run.get("reason")))
            elif run.get("status") != "ok":
                problems.append(f"{run.get('status')}: {run.get('reason')}")
            else:
                done.append(run)
        row = {"arm": arm, "runs": done, "problems": list(dict.fromkeys(problems))}
        if done:
            row["loss"] = mean_spread([r["eval_loss"] for r in done])
            row["losses"] = [r["eval_loss"] for r in done]
            row["peak_rss"] = statistics.median(r["peak_rss_kib"] * 1024 for r in done)
            row["net_peak"] = statistics.median((r["peak_rss_kib"] - r["base_rss_kib"]) * 1024 for r in done)
            row["optim"] = max(r["optimizer_state_bytes_max"] for r in done)
            counted = [r["requires_grad_params_end"] for r in done if "requires_grad_params_end" in r]
            row["trainable"] = max(counted or [r["trainable_params_end"] for r in done])
            row["step_s"] = statistics.median(r["step_s"] for r in done)
            row["other_cpu"] = statistics.median(r["other_cpu"] or 0.0 for r in done)
            ratios = [
                r["step_s"] / full[r["seed"]]["step_s"]
                for r in done
                if full.get(r["seed"]) and full[r["seed"]].get("status") == "ok"
            ]
            row["step_ratio"] = statistics.median(ratios) if ratios else None
        rows[arm] = row
    return rows


def finetune_table(rows: dict, baseline: float | None) -> list[str]:
    lines = [
        "| arm | held-out loss (mean ± sd) | seeds | vs before | peak RSS MiB | net peak MiB | optimizer state MiB "
        "| trainable values (last phase) | step s | step / full | other CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, row in rows.items():
        if not row["runs"]:
            reason = "; ".join(p for p in row["problems"] if p != "not run yet") or "yet"
            lines.append(
                f"| {ARMS[arm]} | not run {'yet' if reason == 'yet' else '— ' + reason} | 0 | | | | | | | | |"
            )
            continue
        mean, sd = row["loss"]
        note = f" ({len(row['problems'])} missing: {'; '.join(row['problems'])})" if row["problems"] else ""
        change = fmt(mean - baseline, "+.3f") if baseline is not None else "–"
        lines.append(
            f"| {ARMS[arm]} | {mean:.3f} ± {sd:.3f}{note} | {len(row['runs'])} | {change} | "
            f"{row['peak_rss'] / MIB:.0f} | {row['net_peak'] / MIB:.0f} | {row['optim'] / MIB:.1f} | "
            f"{row['trainable']:,} | {row['step_s']:.2f} | {fmt(row['step_ratio'], '.2f')} | "
            f"{100 * row['other_cpu']:.0f}% |"
        )
    return lines


def findings(rows: dict, baseline: float | None) -> list[str]:
    """Plain sentences: where a schedule helped and where it did not, against full fine-tuning and LoRA."""
    out = []
    full = rows.get("full")
    if not full or not full["runs"]:
        return ["- Full fine-tuning did not run, so nothing is compared against it."]
    f_mean, f_sd = full["loss"]
    for arm, row in rows.items():
        if arm == "full" or not row["runs"]:
            continue
        mean, sd = row["loss"]
        noise = max(sd, f_sd, TIE)
        delta = mean - f_mean
        several = min(len(row["runs"]), len(full["runs"])) > 1
        spread = f"seed sd ≤ {max(sd, f_sd):.3f}" if several else "one seed: no spread measured"
        if delta > noise:
            verdict = f"ends **above** full fine-tuning's held-out loss by {delta:.3f} ({spread}): "
            verdict += "at this budget it did not match full fine-tuning"
        elif delta < -noise:
            verdict = f"ends **below** full fine-tuning's held-out loss by {-delta:.3f} ({spread})"
        else:
            verdict = f"ends level with full fine-tuning ({delta:+.3f}, {spread}; ties below {TIE} or the sd)"
        memory = row["peak_rss"] / full["peak_rss"]
        mem = f"peak RSS {memory:.2f}× full's" + (" (no saving)" if memory >= 0.95 else "")
        optim = row["optim"] / full["optim"] if full["optim"] else float("nan")
        speed, busy = row["step_ratio"], max(row["other_cpu"], full["other_cpu"])
        pace = "" if speed is None else f", a step {speed:.2f}× full's" + (" (slower)" if speed > 1.05 else "")
        if speed is not None and busy > BUSY:
            pace = f", step times not comparable (other processes took up to {100 * busy:.0f}% of the CPU)"
        worse = ""
        if baseline is not None and mean > baseline:
            worse = f"; its held-out loss is **worse than before training** ({baseline:.3f})"
        out.append(f"- **{ARMS[arm]}** {verdict}; {mem}, optimizer state {optim:.2f}× full's{pace}{worse}.")
    return out


# ---- progressive stacking ----------------------------------------------------------------------------------


def first_below(curve, target):
    return next(((step, tokens, flops) for step, tokens, flops, loss in curve if loss <= target), None)


def growth_section(runs: dict, seeds: int, g: dict) -> tuple[list[str], dict]:
    target = runs.get("growth-target")
    pairs = {}
    for seed in range(seeds):
        pairs[seed] = {arm: runs.get(f"growth-{arm}-seed{seed}") for arm in ("full", "grow")}
    lines = [
        f"A byte-level Llama from a config (hidden 128, 4 heads, vocabulary 256) on `pydoc_data.topics`, "
        f"{g['steps']} steps of {g['batch_size']} × {g['seq_len']} tokens, AdamW lr {g['lr']}, eval every "
        f"{g['eval_every']} steps: `full` trains {g['depth']} blocks from step 0; `grow` starts from 1 block and "
        f"copies the rack on top of itself (`grow: {{op: copy}}`, fresh optimizer state, re-warmed rate) up to "
        f"{g['depth']} blocks. FLOPs = 6 × tokens × the parameters a token passes through (active blocks + head).",
        "",
    ]
    if target is None:
        lines.append("Not run yet (no full-depth runs, so no target).")
        return lines, {}
    lines += [
        f"Target eval loss **{target['target']:.4f}**, fixed before any growth run from the full-depth runs "
        f"(median over {plural(target['from_seeds'], 'seed')} of their eval loss at step {target['at_step']}, "
        f"{g['target_at']:.0%} of the budget).",
        "",
        "| seed | arm | step at target | tokens | GFLOPs | final eval loss | tokens grow/full | FLOPs grow/full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    token_ratios, flop_ratios, missed = [], [], 0
    for seed, pair in pairs.items():
        hits = {}
        for arm, run in pair.items():
            if run is None or run.get("status") != "ok":
                reason = "not run yet" if run is None else f"{run.get('status')}: {run.get('reason')}"
                lines.append(f"| {seed} | {arm} | {reason} | | | | | |")
                continue
            hit = hits[arm] = first_below(run["curve"], target["target"])
            final = run["curve"][-1][3]
            ratios = ""
            if arm == "grow" and hits.get("full") and hit:
                token_ratios.append(hit[1] / hits["full"][1])
                flop_ratios.append(hit[2] / hits["full"][2])
                ratios = f" {token_ratios[-1]:.2f} | {flop_ratios[-1]:.2f}"
            elif arm == "grow":
                missed += 1
                ratios = " never reached | –"
            else:
                ratios = " | "
            shown = f"{hit[0]} | {hit[1]:,} | {hit[2] / 1e9:.1f}" if hit else "never | – | –"
            lines.append(f"| {seed} | {arm} | {shown} | {final:.4f} |{ratios} |")
    summary = {"token": token_ratios, "flop": flop_ratios, "missed": missed}
    lines.append("")
    if flop_ratios:
        t, f = statistics.median(token_ratios), statistics.median(flop_ratios)
        verdict = "saved compute" if f < 0.95 else "did **not** save compute"
        lines.append(
            f"Median grow / full to the target: tokens **{t:.2f}**, FLOPs **{f:.2f}** "
            f"({plural(len(flop_ratios), 'seed')} reached it in both arms): at this scale progressive stacking "
            f"{verdict}" + (" and needed more tokens than full depth." if t > 1.05 else ".")
        )
    else:
        lines.append("No seed reached the target in both arms: progressive stacking did **not** help here.")
    return lines, summary


# ---- the cache ---------------------------------------------------------------------------------------------


def flat_numbers(node, prefix="") -> list[tuple[str, float]]:
    if isinstance(node, dict):
        return [x for k, v in node.items() for x in flat_numbers(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(node, list):
        return [x for i, v in enumerate(node) for x in flat_numbers(v, f"{prefix}[{i}]")]
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return [(prefix, float(node))]
    return []


CACHE_TARGETS = {  # the targets benchmarks/cache.py checks, in words
    "cached_vs_uncached": "cached step's speedup, against its FLOP limit",
    "phase_vs_lazy_fill": "whole phase's speedup, against the lazy-fill limit",
    "miss_step_overhead": "a step that misses, against the uncached step",
    "auto_off_overhead": "a step with `auto` deciding off, against the uncached step",
    "vs_all_trainable": "all-trainable step, against the cached step",
}


def cache_files(folder: str) -> list[tuple[str, dict]]:
    found = []
    for path in sorted(glob.glob(os.path.join(folder, "cache*.json"))):
        try:
            with open(path) as f:
                found.append((os.path.basename(path), json.load(f)))
        except (OSError, ValueError):
            continue
    return found


def cache_section(folder: str) -> list[str]:
    lines = ["| source | measurement | value |", "|---|---|---|"]
    files = cache_files(folder)
    for name, data in files:
        lines += [f"| `{name}` | {key} | {value:.3f} |" for key, value in flat_numbers(data) if "ratio" in key.lower()]
    if len(lines) == 2:
        return [*lines[:2], "| activation cache | step-cost ratio, cached / uncached | not measured yet |"]
    targets = [
        (name, model, key, t)
        for name, data in files
        for model, result in (data.get("models") or {}).items()
        for key, t in (result.get("targets") or {}).items()
    ]
    if targets:
        lines += [
            "",
            "The targets `benchmarks/cache.py` checks, from the same files:",
            "",
            "| source | model | measurement | target | measured | |",
            "|---|---|---|---|---|---|",
        ]
        for name, model, key, t in targets:
            verdict = "met" if t.get("pass") else "**missed**"
            label = CACHE_TARGETS.get(key, key)
            lines.append(f"| `{name}` | {model} | {label} (`{key}`) | {t['target']} | {t['value']:.3f} | {verdict} |")
        missed = [f"{model} `{key}` {t['value']:.3f} (target {t['target']})" for _, model, key, t in targets
                  if not t.get("pass")]  # fmt: skip
        lines += ["", f"**Missed:** {'; '.join(missed)}." if missed else "Every target was met."]
    for name, data in files:
        if data.get("other_cpu") is not None:
            lines.append(
                f"`{name}` was measured while other processes used {100 * data['other_cpu']:.0f}% of the machine's "
                "CPU: its step times, and so its ratios, carry that noise."
            )
    return lines


# ---- plots -------------------------------------------------------------------------------------------------


def growth_curves(runs: dict, seeds: int) -> list[tuple[str, int, list]]:
    curves = [(arm, s, runs.get(f"growth-{arm}-seed{s}")) for arm in ("full", "grow") for s in range(seeds)]
    return [(a, s, r["curve"]) for a, s, r in curves if r and r.get("status") == "ok"]


def plot_names(rows: dict, runs: dict, seeds: int) -> list[tuple[str, str]]:
    """(file, alt text) of the plots the results call for; :func:`plots` draws exactly these."""
    made = []
    if any(r["runs"] for r in rows.values()):
        made += [
            ("finetune-loss.png", "Held-out loss per arm"),
            ("finetune-cost.png", "Peak memory, optimizer state and step time per arm"),
            ("finetune-curves.png", "Training loss per arm"),
        ]
    if growth_curves(runs, seeds):
        made.append(("growth.png", "Progressive stacking against full depth, eval loss by compute"))
    return made


def plots(rows: dict, baseline, runs: dict, seeds: int, target, images: str) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(images, exist_ok=True)
    made = plot_names(rows, runs, seeds)
    names = {name for name, _ in made}
    done = [a for a, r in rows.items() if r["runs"]]
    if "finetune-loss.png" in names:
        fig, ax = plt.subplots(figsize=(8, 3.6))
        means = [rows[a]["loss"][0] for a in done]
        sds = [rows[a]["loss"][1] for a in done]
        ax.barh(done, means, xerr=sds, color="#8fb3d9", capsize=3)
        for i, a in enumerate(done):
            ax.plot(rows[a]["losses"], [i] * len(rows[a]["losses"]), "k.", ms=4)
        if baseline is not None:
            ax.axvline(baseline, color="grey", ls="--", label=f"before training {baseline:.3f}")
            ax.legend(loc="lower right", fontsize=8)
        low = min(min(rows[a]["losses"]) for a in done)
        high = max(max(rows[a]["losses"]) for a in done + ([] if baseline is None else []))
        high = max(high, baseline or high)
        ax.set_xlim(low - 0.1 * (high - low + 0.05), high + 0.1 * (high - low + 0.05))
        ax.invert_yaxis()
        ax.set_xlabel("held-out loss after training (bars: mean ± sd, dots: seeds; lower is better)")
        fig.tight_layout()
        fig.savefig(os.path.join(images, "finetune-loss.png"), dpi=110)
        plt.close(fig)

        fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), sharey=True)
        axes[0].barh(done, [rows[a]["peak_rss"] / MIB for a in done], color="#d9a98f")
        axes[0].set_xlabel("peak RSS, MiB")
        axes[1].barh(done, [rows[a]["optim"] / MIB for a in done], color="#a9d98f")
        axes[1].set_xlabel("optimizer state, MiB (largest)")
        axes[2].barh(done, [rows[a]["step_ratio"] or 0 for a in done], color="#c7a9e0")
        axes[2].axvline(1.0, color="grey", ls="--")
        axes[2].set_xlabel("step time / full fine-tuning's")
        axes[0].invert_yaxis()
        fig.tight_layout()
        fig.savefig(os.path.join(images, "finetune-cost.png"), dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(8, 3.8))
        for a in done:
            by_step: dict[int, list[float]] = {}
            for r in rows[a]["runs"]:
                for step, loss in r["loss_curve"]:
                    by_step.setdefault(step, []).append(loss)
            steps = sorted(by_step)
            mean = [statistics.fmean(by_step[s]) for s in steps]
            width = max(1, len(steps) // 10)
            smooth = [statistics.fmean(mean[max(0, i - width + 1) : i + 1]) for i in range(len(mean))]
            ax.plot(steps, smooth, label=a)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (mean over seeds, smoothed)")
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        fig.savefig(os.path.join(images, "finetune-curves.png"), dpi=110)
        plt.close(fig)

    curves = growth_curves(runs, seeds)
    if "growth.png" in names:
        fig, ax = plt.subplots(figsize=(8, 3.8))
        colors = {"full": "#1f77b4", "grow": "#d62728"}
        for arm, seed, curve in curves:
            ax.plot([c[2] / 1e9 for c in curve], [c[3] for c in curve], color=colors[arm], alpha=0.7,
                    label=arm if seed == 0 else None)  # fmt: skip
        if target:
            ax.axhline(target["target"], color="grey", ls="--", label=f"target {target['target']:.3f}")
        ax.set_xlabel("training GFLOPs")
        ax.set_ylabel("eval loss")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(images, "growth.png"), dpi=110)
        plt.close(fig)
    return made


# ---- the page ----------------------------------------------------------------------------------------------


def header(manifest: dict, runs: dict) -> list[str]:
    m, s = manifest["machine"], manifest["settings"]
    done = [r for r in runs.values() if "started" in r]
    loads = [r["load_before"][0] for r in done] + [r["load_after"][0] for r in done]
    other = [r["other_cpu"] for r in done if r.get("other_cpu") is not None]
    dates = sorted(r["started"] for r in done)
    total = sum(r.get("wall_s", 0) for r in done)
    threads = sorted({r["torch_threads"] for r in done if "torch_threads" in r})
    ram = f"{m['ram_bytes'] / 1024**3:.1f} GiB RAM" if m.get("ram_bytes") else "RAM unknown"
    lines = [
        f"- **Runs made** {dates[0] if dates else '–'} to {dates[-1] if dates else '–'} (UTC), "
        f"{total / 60:.0f} minutes of runs in all; commit `{m.get('commit')}`.",
        f"- **Budget**: {'`--quick` (development) — ' if s['quick'] else ''}`--budget {s['budget']}`: fine-tuning "
        f"{s['steps']} steps × batch {s['batch_size']} × {s['seq_len']} tokens, {plural(manifest['seeds'], 'seed')}, "
        f"held-out eval on {s['eval_samples']} chunks of {s['seq_len']} tokens; growth {s['growth']['steps']} steps.",
        f"- **Machine**: {m['cpu']}, {m['cores']} cores, {ram}; {m['platform']}, Python {m['python']}; torch "
        f"threads per run: {', '.join(map(str, threads)) or 'unknown'}.",
        "- **Versions**: " + ", ".join(f"{k.replace('-', '_')} {v}" for k, v in m["versions"].items()) + ".",
    ]
    if loads:
        lines.append(
            f"- **Load average** (1 min, at the start and end of each run): min {min(loads):.1f}, median "
            f"{statistics.median(loads):.1f}, max {max(loads):.1f}; other processes used a median "
            f"{100 * statistics.median(other or [0]):.0f}% of the machine's CPU during the runs. "
            + (
                "**The machine was busy: the wall times below are distorted** (losses, memory and state bytes are "
                "not)."
                if statistics.median(other or [0]) > 0.1
                else "The machine was quiet enough for the wall times to mean something."
            )
        )
    return lines


def render(folder: str, out: str, images: str, write: bool = True) -> str:
    """The page's text; with ``write``, also the page at ``out`` and its plots under ``images``."""
    manifest, runs = load(folder)
    s = manifest["settings"]
    seeds = manifest.get("seeds") or 1 + max([r.get("seed", 0) for r in runs.values()] or [0])
    manifest["seeds"] = seeds
    base = runs.get("finetune-baseline")
    baseline = base["eval_loss"] if base and base.get("status") == "ok" else None
    rows = finetune_rows(runs, seeds)
    growth_lines, _ = growth_section(runs, seeds, s["growth"])
    target = runs.get("growth-target")
    made = plots(rows, baseline, runs, seeds, target, images) if write else plot_names(rows, runs, seeds)
    rel = os.path.relpath(images, os.path.dirname(os.path.abspath(out)))
    image = {name: f"![{alt}]({rel}/{name})" for name, alt in made}
    page = [
        "# Results: what each schedule buys",
        "",
        "Every number on this page comes from `benchmarks/results.py` (one JSON file per run under "
        "`benchmarks/results/`) and was rendered by `benchmarks/report.py`; `make bench-report` runs both. "
        "Re-run it on your machine: the numbers are whatever the machine shows, whichever way they come out.",
        "",
        *header(manifest, runs),
        "",
        "## Fine-tuning SmolLM2-135M on Python's documentation",
        "",
        f"Every arm trains SmolLM2-135M-Instruct (float32; 4-bit nf4 blocks where the recipe quantizes) for "
        f"{s['steps']} steps of {s['batch_size']} × {s['seq_len']} tokens of CPython's documentation (the corpus "
        f"of `make demo`), with the data order of its seed, and is scored on the same held-out text: the mean "
        f"cross-entropy on the first {s['eval_samples']} chunks of `.cache/data/pydoc_eval.txt`. "
        + (f"Before training that loss is **{baseline:.3f}**. " if baseline is not None else "")
        + "Each run is its own process (its peak RSS is its own). The step-time ratio divides by the full "
        "fine-tuning run of the same seed, run back to back with it.",
        "",
        *finetune_table(rows, baseline),
        "",
        "Columns: *vs before* = change from the float32 model's held-out loss before training (the 4-bit arms "
        "start a little off it: quantizing moves it), *peak RSS* = `ru_maxrss` of the run's process (median over "
        "seeds; includes Python, torch and the tokenizer), *net peak* = peak RSS minus the RSS before the weights "
        "load, *optimizer state* = bytes of every tensor in the optimizer's state, the largest after any step "
        "(BAdam-style `release_idle`/`reset` phases keep it small), *trainable values* = parameter values that "
        "train in the last phase, *step s* = median wall time of a step, *step / full* = median over seeds of that "
        "ratio, *other CPU* = the share of the machine's CPU other processes used during the run. sd = sample "
        "standard deviation over seeds.",
        "",
        "Where each arm's schedule comes from:",
        "",
        *[f"- {ARMS[a]}: {RECIPES[a]}" for a in ARMS],
        "",
        "**What it says** (written by the report from the numbers above):",
        "",
        *findings(rows, baseline),
        "",
        *[image[n] for n in ("finetune-loss.png", "finetune-cost.png", "finetune-curves.png") if n in image],
        "",
        "## Progressive stacking from scratch against full depth",
        "",
        *growth_lines,
        "",
        *([image["growth.png"]] if "growth.png" in image else []),
        "",
        "## The activation cache",
        "",
        "Step-cost ratios of the cached frozen trunk against recomputing it, from `benchmarks/results/cache*.json`:",
        "",
        *cache_section(folder),
        "",
        "## Re-run it",
        "",
        "```bash",
        "make bench-report                                  # the default budget (about an hour on 2 idle cores)",
        "python benchmarks/results.py --budget 4            # 4x the steps on a bigger machine",
        "python benchmarks/results.py --seeds 5 --steps 200 --seq-len 256",
        "python benchmarks/report.py                        # re-render this page from the JSON files",
        "```",
        "",
        "`benchmarks/results.py` skips runs whose JSON file exists with the same settings and recipe text, so a long "
        "job can be split; delete `benchmarks/results/` to start over. The wall times need a quiet machine; the "
        "losses, optimizer-state bytes and (to tens of MiB) peak RSS do not.",
        "",
    ]
    text = "\n".join(page).replace("\n\n\n", "\n\n")
    if write:
        with open(out, "w") as f:
            f.write(text)
    return text


def main(argv=None) -> None:
    opts = make_parser().parse_args(argv)
    render(opts.results, opts.out, opts.images)
    print(f"wrote {opts.out} and {opts.images}/")


if __name__ == "__main__":
    main()
