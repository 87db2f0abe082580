"""The per-task part of ``docs/results.md``: tables, intervals, the Pareto fronts and the sentences written from them.
Pure functions of the run JSON files of ``benchmarks/results.py`` (no plotting, no file access)."""

from __future__ import annotations

import math
import statistics

MIB = 1024 * 1024
T975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


def interval(values: list[float]) -> tuple[float, float, float] | None:
    """(mean, low, high): the 95% Student-t interval of the mean over seeds; None below 2 values."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    half = T975.get(len(values), 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def compare(a: list[float], b: list[float], lower_is_better: bool) -> str:
    """'better', 'worse' or 'tie' for a against b: better only when the two 95% intervals do not overlap."""
    ia, ib = interval(a), interval(b)
    if ia is None or ib is None:
        return "tie"
    if ia[2] < ib[1]:
        return "better" if lower_is_better else "worse"
    if ia[1] > ib[2]:
        return "worse" if lower_is_better else "better"
    return "tie"


def fmt(value, spec: str = ".3f", missing: str = "–") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def metric_of(run: dict, task, split: str = "test", key: str | None = None):
    value = (run.get(split) or {}).get(key or task.metric)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


class Group:
    """The runs of one arm at one rate and one step count, over seeds."""

    def __init__(self, arm: str, rate: float, steps: int, runs: list[dict], problems: list[str]):
        self.arm, self.rate, self.steps, self.runs, self.problems = arm, rate, steps, runs, problems

    def values(self, task, key: str | None = None, split: str = "test") -> list[float]:
        return [v for r in self.runs if (v := metric_of(r, task, split, key)) is not None]

    def median(self, key: str):
        values = [r[key] for r in self.runs if r.get(key) is not None]
        return statistics.median(values) if values else None


def group(runs: dict, task_name: str, arm: str, rate, steps: int, seeds: int) -> Group:
    found, problems = [], []
    for seed in range(seeds):
        run = runs.get((task_name, arm, rate, seed, steps))
        if run is None:
            problems.append("not run yet")
        elif run.get("status") != "ok":
            problems.append(f"{run.get('status')}: {run.get('reason')}")
        else:
            found.append(run)
    return Group(arm, rate, steps, found, list(dict.fromkeys(problems)))


def rate_label(rate) -> str:
    if rate is None:
        return "–"
    for n in (1, 3, 9, 27, 81):
        if math.isclose(rate, n):
            return f"×{n}"
        if math.isclose(rate, 1 / n):
            return f"×1/{n}"
    return f"×{rate:.3g}"


def grid_table(task, task_name: str, runs: dict, choices: dict, steps: int) -> list[str]:
    lines = ["| arm | factor: validation " + task.metric + " | chosen |", "|---|---|---|"]
    for arm, spec in task.arms.items():
        choice = choices.get(arm)
        if not choice:
            lines.append(f"| {spec.label} | not run yet | |")
            continue
        cells = []
        for rate in choice["grid"]:
            run = runs.get((task_name, arm, rate, 0, steps))
            value = metric_of(run, task, "val") if run and run.get("status") == "ok" else None
            shown = fmt(value, ".3f") if run and run.get("status") == "ok" else (run or {}).get("status", "not run")
            cells.append(f"{rate_label(rate)}: {'**' + shown + '**' if rate == choice['rate'] else shown}")
        edge = " *edge*" if choice["rate"] in (min(choice["grid"]), max(choice["grid"])) else ""
        lines.append(f"| {spec.label} | {', '.join(cells)} | {rate_label(choice['rate'])}{edge} |")
    return lines


def summary_table(task, groups: dict, full: Group | None) -> list[str]:
    """One row per arm: the test metric (mean ± sd, 95% interval), the extra metrics and the costs."""
    extra = "".join(f" {k} |" for k in task.extra if k != "loss")
    lines = [
        f"| arm | steps | test {task.metric} (mean ± sd) | 95% interval | seeds |{extra} GFLOPs | FLOPs / full | "
        "CPU s | CPU / full | peak RSS MiB | optimizer MiB | cache hits | freezes (step: stacks) |",
        "|---|---|---|---|---|"
        + "---|" * (len(task.extra) - ("loss" in task.extra))
        + "---|---|---|---|---|---|---|---|",
    ]
    for arm, g in groups.items():
        label = task.arms[arm].label
        values = g.values(task)
        if not values:
            reason = "; ".join(p for p in g.problems if p != "not run yet") or "yet"
            lines.append(
                f"| {label} | {g.steps} | not run {'yet' if reason == 'yet' else '— ' + reason} |" + " |" * 12
            )
            continue
        mean = statistics.fmean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        ci = interval(values)
        extras = "".join(
            f" {fmt(statistics.fmean(v), '.3f') if (v := g.values(task, k)) else '–'} |"
            for k in task.extra
            if k != "loss"
        )
        flops, cpu = g.median("flops"), g.median("cpu_s")
        f_flops, f_cpu = (full.median("flops"), full.median("cpu_s")) if full else (None, None)
        hits = [r["cache_hit_rate"] for r in g.runs if r.get("cache_hit_rate") is not None]
        freezes = "; ".join(
            ", ".join(f"{d['step']}: {d['stacks']}" for d in r.get("freezes") or []) or "none"
            for r in g.runs
            if r.get("freezes") is not None and task.arms[arm].recipe.endswith("autofreeze.yaml")
        )
        lines.append(
            f"| {label} | {g.steps} | {mean:.3f} ± {sd:.3f} | "
            f"{'[' + fmt(ci[1]) + ', ' + fmt(ci[2]) + ']' if ci else '–'} | {len(values)} |{extras} "
            f"{fmt(flops / 1e9 if flops else None, '.0f')} | "
            f"{fmt(flops / f_flops if flops and f_flops else None, '.2f')} | "
            f"{fmt(cpu, '.0f')} | {fmt(cpu / f_cpu if cpu and f_cpu else None, '.2f')} | "
            f"{fmt(g.median('peak_rss_kib') / 1024 if g.median('peak_rss_kib') else None, '.0f')} | "
            f"{fmt(max(r['optimizer_state_bytes_max'] for r in g.runs) / MIB, '.1f')} | "
            f"{fmt(statistics.fmean(hits) if hits else None, '.2f')} | {freezes or '–'} |"
        )
    if any(g.problems and g.values(task) for g in groups.values()):
        lines.append("")
        lines += [f"- {task.arms[a].label}: {len(g.problems)} seed(s) missing: {'; '.join(g.problems)}"
                  for a, g in groups.items() if g.problems and g.values(task)]  # fmt: skip
    return lines


def verdicts(task, groups: dict, against: str, what: str) -> list[str]:
    """Sentences: each arm against ``against`` by the 95% intervals of the test metric."""
    base = groups.get(against)
    if base is None or len(base.values(task)) < 1:
        return [f"- {what}: {task.arms[against].label} did not run, so nothing is compared against it."]
    out, b_values = [], base.values(task)
    for arm, g in groups.items():
        values = g.values(task)
        if arm == against or not values:
            continue
        delta = statistics.fmean(values) - statistics.fmean(b_values)
        verdict = compare(values, b_values, task.lower_is_better)
        if min(len(values), len(b_values)) < 2:
            words = f"one seed only ({delta:+.3f}): no interval, so no verdict"
        elif verdict == "tie":
            words = f"ties with it ({delta:+.3f}; the 95% intervals overlap)"
        else:
            words = f"is **{verdict}** ({delta:+.3f}; the 95% intervals do not overlap)"
        out.append(f"- {what}: **{task.arms[arm].label}** against {task.arms[against].label} {words}.")
    return out


def pareto(points: list[tuple[str, float, float]], lower_is_better: bool) -> list[tuple[str, float, float]]:
    """The (name, cost, metric) points no other point beats: as cheap or cheaper and as good or better (one of the
    two strictly). Sorted by cost."""
    sign = 1 if lower_is_better else -1

    def beats(p, q):
        return p[1] <= q[1] and sign * p[2] <= sign * q[2] and (p[1] < q[1] or sign * p[2] < sign * q[2])

    front = [q for q in points if not any(beats(p, q) for p in points if p is not q)]
    return sorted(front, key=lambda p: p[1])


def end_points(task, stages: dict) -> list[tuple[str, float, float, str]]:
    """(arm, median FLOPs, mean test metric, stage) of every finished group of every stage."""
    points = []
    for stage, groups in stages.items():
        for arm, g in groups.items():
            values = g.values(task)
            if values and g.median("flops"):
                points.append((arm, g.median("flops"), statistics.fmean(values), stage))
    return points


def pareto_lines(task, stages: dict, memory_groups: dict) -> list[str]:
    """The arms on the FLOPs front (every finished run length) and on the memory front (equal FLOPs)."""
    points = end_points(task, stages)
    unique = {(a, round(f), round(m, 6)): (a, f, m, s) for a, f, m, s in points}  # a stage repeating another's runs
    front = pareto([((a, s), f, m) for a, f, m, s in unique.values()], task.lower_is_better)
    lines = []
    if front:
        names = [
            f"{task.arms[a].label} at {f / 1e9:.0f} GFLOPs ({task.metric} {m:.3f}; {s})" for (a, s), f, m in front
        ]
        lines.append("- **FLOPs front** (no other run is as cheap and as good): " + "; ".join(names) + ".")
    mem = [(a, g.median("peak_rss_kib") * 1024, statistics.fmean(g.values(task)))
           for a, g in memory_groups.items() if g.values(task) and g.median("peak_rss_kib")]  # fmt: skip
    front = pareto(mem, task.lower_is_better)
    if front:
        names = [f"{task.arms[a].label} at {b / MIB:.0f} MiB ({task.metric} {m:.3f})" for a, b, m in front]
        lines.append("- **Memory front** at equal FLOPs (peak RSS against the test metric): " + "; ".join(names) + ".")
    return lines


def budget_lines(task, stages: dict, budgets: list[tuple[str, float]]) -> list[str]:
    """At each named FLOP budget: the arms whose best finished run within it is best, ties by the 95% intervals."""
    lines = []
    for name, budget in budgets:
        best = {}
        for groups in stages.values():
            for arm, g in groups.items():
                values = g.values(task)
                flops = g.median("flops")
                if not values or not flops or flops > budget * 1.05:
                    continue
                sign = 1 if task.lower_is_better else -1
                if arm not in best or sign * statistics.fmean(values) < sign * statistics.fmean(best[arm]):
                    best[arm] = values
        if not best:
            continue
        sign = 1 if task.lower_is_better else -1
        top = min(best, key=lambda a: sign * statistics.fmean(best[a]))
        others = [a for a in best if a != top]
        tied = [a for a in others if compare(best[a], best[top], task.lower_is_better) == "tie"]
        if any(min(len(best[a]), len(best[top])) < 2 for a in others):
            tie_words = "; one seed only: no intervals, so no arm is called better than another"
        elif tied:
            tie_words = f"; tied within the 95% intervals: {', '.join(task.arms[a].label for a in tied)}"
        else:
            tie_words = ""
        lines.append(
            f"- **{name}** ({budget / 1e9:.0f} GFLOPs): best {task.arms[top].label} "
            f"({task.metric} {statistics.fmean(best[top]):.3f}){tie_words}."
        )
    return lines
