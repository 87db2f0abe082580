"""Render ``docs/results.md`` and its plots from the JSON files of ``benchmarks/results.py`` (and nothing else).

    python benchmarks/report.py                                        # benchmarks/results/page -> docs/results.md
    python benchmarks/report.py --results benchmarks/results/quick --out /tmp/results.md --images /tmp/img

Only runs made with the settings of the results folder's ``manifest.json`` are used; runs missing from the folder
show as "not run yet", refused or failed ones with their reason. ``render(..., write=False)`` returns the page text
without drawing (``tests/test_results_report.py`` compares it with the committed page).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import report_tasks as rt  # noqa: E402
import results_arms as arms  # noqa: E402
from results import FLOP_CAP, LONG, MAX_EXTENSIONS  # noqa: E402

MIB = 1024 * 1024
BASELINES = {"clm": ("full", "lora", "qlora-trunk"), "classify": ("full", "head"), "dpo": ("full", "lora")}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=os.path.join(HERE, "results", "page"))
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "results.md"))
    parser.add_argument("--images", default=os.path.join(ROOT, "docs", "images", "results"))
    return parser


def load(folder: str) -> tuple[dict, dict, dict]:
    """(manifest, {(task, arm, rate, seed, steps): run}, {growth file name: run}) for the manifest's settings."""
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    settings = manifest["settings"]
    runs, growth = {}, {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        name = os.path.basename(path)[: -len(".json")]
        if name == "manifest":
            continue
        with open(path) as f:
            result = json.load(f)
        if name.startswith("growth-"):
            if result.get("settings") == settings["growth"]:
                growth[name] = result
        elif result.get("task") in settings["tasks"] and result.get("settings") == settings["tasks"][result["task"]]:
            if result.get("quick") == settings["quick"]:
                runs[(result["task"], result["arm"], result["rate"], result["seed"], result["steps"])] = result
    return manifest, runs, growth


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


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
        lines += [
            f"| `{name}` | {key} | {value:.3f} |"
            for key, value in flat_numbers(data)
            if "ratio" in key.lower() and "per_repeat" not in key
        ]
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


# ---- the tasks ---------------------------------------------------------------------------------------------


def stages(name: str, runs: dict, choices: dict, seeds: int, steps: int) -> dict:
    """{stage: {arm: Group}}: equal steps, equal FLOPs and (where run) the longer horizon."""
    task = arms.TASKS[name]
    chosen = {arm: c for arm, c in choices.items() if c.get("rate") is not None}
    out = {"equal steps": {a: rt.group(runs, name, a, c["rate"], steps, seeds) for a, c in chosen.items()}}
    flops = {a: rt.group(runs, name, a, c["rate"], c["flop_steps"], seeds) for a, c in chosen.items()
             if c.get("flop_steps")}  # fmt: skip
    if flops:
        out["equal FLOPs"] = flops
    long = {a: rt.group(runs, name, a, chosen[a]["rate"], LONG * steps, seeds) for a in task.long if a in chosen}
    if any(g.runs for g in long.values()):
        out["longer horizon"] = long
    return out


def title(stage: str) -> str:
    return stage[0].upper() + stage[1:]


def ordering(task, groups: dict) -> list[str]:
    sign = 1 if task.lower_is_better else -1
    means = {a: statistics.fmean(v) for a, g in groups.items() if (v := g.values(task))}
    return sorted(means, key=lambda a: sign * means[a])


def horizon_lines(task, by_stage: dict) -> list[str]:
    long = by_stage.get("longer horizon")
    if not long:
        return []
    short = {a: by_stage["equal steps"][a] for a in long if a in by_stage["equal steps"]}
    before, after = ordering(task, short), ordering(task, long)
    labels = [task.arms[a].label for a in after]
    words = "the same as" if before == after else "**not** the same as"
    lines = [f"- **Longer horizon**: at {LONG}× the steps the order by test {task.metric} is {', '.join(labels)} — "
             f"{words} at 1× ({', '.join(task.arms[a].label for a in before)})."]  # fmt: skip
    return lines + rt.verdicts(task, long, task.full, f"{LONG}× the steps")


def baseline_words(name: str, task, by_stage: dict) -> list[str]:
    """Where no stack-wise arm is on the FLOPs front: say so, and where their case would have to come from."""
    points = rt.end_points(task, by_stage)
    front = rt.pareto([(a, f, m) for a, f, m, _ in points], task.lower_is_better)
    on_front = {a for a, _, _ in front}
    if not front or on_front - set(BASELINES[name]):
        return []
    eq = by_stage.get("equal steps", {})
    full = eq.get(task.full)
    cheaper = []
    for arm, g in eq.items():
        if arm in BASELINES[name] or not g.runs or not full or not full.runs:
            continue
        mem = g.median("peak_rss_kib") / full.median("peak_rss_kib")
        cpu = g.median("cpu_s") / full.median("cpu_s") if full.median("cpu_s") else float("nan")
        cheaper.append(f"{task.arms[arm].label} (peak RSS {mem:.2f}×, CPU per run {cpu:.2f}× full's)")
    return [
        "- **No stack-wise schedule is on the FLOPs front here**: the best model at every budget measured comes from "
        f"{' or '.join(task.arms[a].label for a in sorted(on_front))}. The schedules' case has to come from what a "
        "step costs at larger "
        "scale — memory that decides whether a model fits, and steps that skip the frozen prefix: "
        + ("; ".join(cheaper) if cheaper else "no stack-wise arm finished")
        + "."
    ]


def task_section(name: str, runs: dict, manifest: dict, images: str, image_rel: str, write: bool) -> list[str]:
    task = arms.TASKS[name]
    s = manifest["settings"]["tasks"][name]
    seeds = manifest.get("seeds") or 3
    choices = (manifest.get("choices") or {}).get(name) or {}
    lines = [f"## {task.title}", ""]
    if not choices:
        return [*lines, "Not run yet.", ""]
    by_stage = stages(name, runs, choices, seeds, s["steps"])
    starts = {a: runs.get((name, a, arms.START_RATE, 0, s["steps"])) for a in task.arms}  # eval before training
    start = (starts.get(task.full) or {}).get("before") or {}
    before = [start["test"][task.metric]] if task.metric in start.get("test", {}) else []
    lines += [
        f"{task.arms[task.full].label[0].upper() + task.arms[task.full].label[1:]} and every other arm train "
        f"`{task.model}` for {s['steps']} steps of batch {s['batch_size']} × {s['seq_len']} tokens (equal steps), "
        "then for full fine-tuning's FLOPs (equal FLOPs). "
        + (
            "Before training a DPO policy equals its reference: every reward is 0, so accuracy and margin are 0."
            if name == "dpo"
            else f"The test {task.metric} before training is **{before[0]:.3f}**."
            if before
            else f"The test {task.metric} before training was not evaluated."
        ),
        "",
        f"**Rate grid** (seed 0, {s['steps']} steps; validation {task.metric}, the chosen factor in bold; the factor "
        "multiplies every learning rate of the arm's recipe):",
        "",
        *rt.grid_table(task, name, runs, choices, s["steps"]),
        "",
        "Where each arm's schedule comes from: "
        + "; ".join(f"{a.label}: `{a.recipe}`{' — ' + a.origin if a.origin else ''}" for a in task.arms.values())
        + ".",
        "",
    ]
    full = lambda stage: by_stage[stage].get(task.full)  # noqa: E731
    for stage, groups in by_stage.items():
        lines += [f"**{title(stage)}**:", "", *rt.summary_table(task, groups, full(stage)), ""]
    lines += ["**What it says** (written by the report from the numbers above; an arm is better or worse only when "
              "the 95% intervals of the two means do not overlap):", ""]  # fmt: skip
    for stage in ("equal steps", "equal FLOPs"):
        if stage in by_stage:
            lines += rt.verdicts(task, by_stage[stage], task.full, title(stage))
    if "lora" in task.arms and "equal FLOPs" in by_stage:
        lines += [v for v in rt.verdicts(task, by_stage["equal FLOPs"], "lora", "Equal FLOPs") if "against LoRA" in v
                  or "against DPO with LoRA" in v if "full" not in v.split("**")[1]]  # fmt: skip
    lines += horizon_lines(task, by_stage)
    budget = (by_stage.get("equal FLOPs") or {}).get(task.full)
    if budget and budget.median("flops"):
        b = budget.median("flops")
        named = [
            ("a quarter of full fine-tuning's budget", b / 4),
            ("half of it", b / 2),
            ("full fine-tuning's budget", b),
        ]
        if "longer horizon" in by_stage:
            named.append((f"{LONG}× that budget", LONG * b))
        lines += rt.budget_lines(task, by_stage, named)
    lines += rt.pareto_lines(task, by_stage, by_stage.get("equal FLOPs") or by_stage["equal steps"])
    lines += baseline_words(name, task, by_stage)
    if write:
        import report_plots

        report_plots.task_plots(name, task, by_stage, images, starts)
    lines += [
        "",
        f"![{task.title}: test {task.metric} against training FLOPs]({image_rel}/{name}-flops.png)",
        f"![{task.title}: test {task.metric} against peak memory]({image_rel}/{name}-memory.png)",
        "",
    ]
    return lines


# ---- the page ----------------------------------------------------------------------------------------------


def busy_seconds(runs, at_least: int = 1) -> float:
    """Wall seconds during which at least `at_least` runs were in progress (1: the union of their intervals)."""
    events = sorted(
        (t, step)
        for r in runs
        if "started" in r
        for start in [datetime.datetime.fromisoformat(r["started"]).timestamp()]
        for t, step in ((start, 1), (start + r["wall_s"], -1))
    )
    total, active, last = 0.0, 0, None
    for t, step in events:
        if last is not None and active >= at_least:
            total += t - last
        active, last = active + step, t
    return total


def header(manifest: dict, runs: dict, growth: dict) -> list[str]:
    m = manifest["machine"]
    done = [r for r in list(runs.values()) + list(growth.values()) if "wall_s" in r]
    dates = sorted(r["started"] for r in runs.values() if "started" in r)
    loads = [x for r in runs.values() if "load_before" in r for x in (r["load_before"][0], r["load_after"][0])]
    ram = f"{m['ram_bytes'] / 1024**3:.1f} GiB RAM" if m.get("ram_bytes") else "RAM unknown"
    threads = sorted({r["torch_threads"] for r in runs.values() if "torch_threads" in r})
    lines = [
        f"- **Runs made** {dates[0] if dates else '–'} to {dates[-1] if dates else '–'} (UTC); "
        f"{plural(len(done), 'run')}, {sum(r['wall_s'] for r in done) / 3600:.1f} hours of runs in all, "
        f"{busy_seconds(done) / 3600:.1f} hours of wall time with runs in progress (two at a time: what "
        f"`make bench-report` takes on this machine); commit `{m.get('commit')}`. Two runs were in progress for "
        f"{busy_seconds(done, 2) / 3600:.1f} of those hours; a run alone (the end of the queue, or next to a run "
        "killed by an interruption and made again) left a core idle.",
        f"- **Machine**: {m['cpu']}, {m['cores']} cores, {ram}; {m['platform']}, Python {m['python']}; torch "
        f"threads per run: {', '.join(map(str, threads)) or 'unknown'}.",
        "- **Versions**: " + ", ".join(f"{k.replace('-', '_')} {v}" for k, v in m["versions"].items()) + ".",
    ]
    if loads:
        lines.append(
            f"- **Load average** (1 min, at each run's start and end): median {statistics.median(loads):.1f}, max "
            f"{max(loads):.1f} on {m['cores']} cores. FLOPs, losses, accuracies and memory do not depend on it; CPU "
            "times do a little (two runs share the memory bus), wall times more: the page compares CPU times only."
        )
    return lines


def protocol(manifest: dict) -> list[str]:
    t = manifest["settings"]["tasks"]
    return [
        "## The protocol",
        "",
        "Fixed before any run and the same for every arm (`benchmarks/results.py`, `benchmarks/results_arms.py`):",
        "",
        "1. **Splits.** Each task has a training set, a validation split and a test split, disjoint: causal LM — "
        "train `pydoc_train.txt`, test the first chunks of `pydoc_eval.txt`, validation chunks from its second half; "
        "classification — train `stdlib_classify_train.jsonl` without every 6th row, validation those rows, test "
        "`stdlib_classify_eval.jsonl`; preference — train `pydoc_pref_train.jsonl`, test and validation the two "
        "halves of `pydoc_pref_eval.jsonl`.",
        "2. **Rate grid.** Each arm runs its recipe's learning rates × ⅓, 1 and 3 on seed 0 and is scored on the "
        "validation split; when the best factor is at an edge the grid grows by ×3 past it "
        + ("(once" if MAX_EXTENSIONS == 1 else f"(at most {MAX_EXTENSIONS} times")
        + "; a chosen factor still at an edge is marked *edge*). Rates are never chosen on the test split; the "
        "validation split is evaluated in the grid's runs only.",
        f"3. **Seeds.** The chosen factor runs {plural(manifest.get('seeds') or 3, 'seed')} (seed 0 is the grid's "
        "run); the page reports the test metric's mean, sd and 95% Student-t interval over them.",
        "4. **Equal steps and equal FLOPs.** Every arm runs the task's steps ("
        + ", ".join(f"{k} {v['steps']}" for k, v in t.items())
        + "); then the number of steps that spends full fine-tuning's training FLOPs (cheaper steps run more of "
        f"them, at most {FLOP_CAP}×). FLOPs are counted by PyTorch's FLOP counter (`torch.utils.flop_counter`) "
        "around every optimizer step — machine-independent; evals are not counted.",
        f"5. **Longer horizon.** The main causal-LM arms also run {LONG}× the steps at the factor chosen at 1×.",
        "6. **Words from numbers.** An arm is called better or worse than another only when the 95% intervals of "
        "their means do not overlap; otherwise it is a tie. Each run is its own process with 1 torch thread, two at "
        "a time from one queue: the grid's first round goes in first, factor by factor, then each arm queues its "
        "next runs as soon as their inputs exist, so the arms interleave. Every eval runs on a fork of torch's "
        "RNG, so the evals a run makes never change its training.",
        "7. **Costs in the tables.** GFLOPs and CPU seconds of training (medians over the seeds; evals excluded); the "
        "process's peak RSS; the optimizer state at its largest; *cache hits*, the share of rows whose frozen "
        "prefix the activation cache served (`cache: auto` stores only where rows are expected to repeat: 0 when "
        "the run sees each row about once); *freezes*, the steps at which adaptive freezing froze stacks.",
        "",
    ]


def render(folder: str, out: str, images: str, write: bool = True) -> str:
    """The page's text; with ``write``, also the page at ``out`` and its plots under ``images``."""
    manifest, runs, growth = load(folder)
    manifest.setdefault("seeds", 3)
    rel = os.path.relpath(images, os.path.dirname(os.path.abspath(out)))
    if write:
        os.makedirs(images, exist_ok=True)
    page = [
        "# Results: which schedule gives the best model for its compute and memory",
        "",
        "Every number on this page comes from `benchmarks/results.py` (one JSON file per run under "
        "`benchmarks/results/page/`) and was rendered by `benchmarks/report.py`; `make bench-report` runs both. "
        "Re-run it on your machine: the numbers are whatever the machine shows, whichever way they come out.",
        "",
        *header(manifest, runs, growth),
        "",
        *protocol(manifest),
    ]
    for name in arms.TASKS:
        page += task_section(name, runs, manifest, images, rel, write)
    g = manifest["settings"]["growth"]
    growth_lines, _ = growth_section(growth, manifest["seeds"], g)
    curves = [(a, s, r["curve"]) for a in ("full", "grow") for s in range(manifest["seeds"])
              if (r := growth.get(f"growth-{a}-seed{s}")) and r.get("status") == "ok"]  # fmt: skip
    if write and curves:
        import report_plots

        report_plots.growth_plot(curves, growth.get("growth-target"), images)
    page += ["## Progressive stacking from scratch against full depth", "", *growth_lines, ""]
    if curves:
        page += [f"![Progressive stacking against full depth, eval loss by compute]({rel}/growth.png)", ""]
    page += [
        "## The activation cache",
        "",
        "Step-cost ratios of the cached frozen trunk against recomputing it, from `benchmarks/results/cache*.json`:",
        "",
        *cache_section(os.path.dirname(os.path.abspath(folder))),
        "",
        "## Re-run it",
        "",
        "```bash",
        "make bench-report                                  # every stage, two runs at a time",
        "python benchmarks/results.py --only clm --arms full,lora   # one task, some arms",
        "python benchmarks/results.py --budget 4            # 4x the steps on a bigger machine",
        "python benchmarks/report.py                        # re-render this page from the JSON files",
        "```",
        "",
        "`benchmarks/results.py` skips runs whose JSON file exists with the same settings, recipe and splits, so a "
        "long job can be split or interrupted; delete `benchmarks/results/page/` to start over.",
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
