"""The plots of ``docs/results.md`` (matplotlib, written under ``docs/images/results/``); the page text never depends
on them, so a test can compare the committed page with its render without drawing."""

from __future__ import annotations

import os
import statistics

MIB = 1024 * 1024
STYLES = {"equal FLOPs": "-", "longer horizon": "--", "equal steps": ":"}
MARKERS = {"equal FLOPs": "o", "longer horizon": "s", "equal steps": "x"}  # runs with a single eval


def mean_curve(runs: list[dict], task, split: str = "test") -> list[tuple[float, float]]:
    """(GFLOPs, metric) averaged over the seeds that evaluated at each step."""
    by_step: dict[int, list[tuple[float, float]]] = {}
    for run in runs:
        for step, flops, _, values in run.get("curve") or []:
            value = values.get(split, {}).get(task.metric)
            if value is not None:
                by_step.setdefault(step, []).append((flops / 1e9, value))
    return [
        (statistics.fmean(f for f, _ in by_step[s]), statistics.fmean(v for _, v in by_step[s]))
        for s in sorted(by_step)
    ]


def task_plots(name: str, task, stages: dict, images: str, starts: dict) -> None:
    """``starts``: {arm: its ×1 grid run}, whose eval before training starts every curve of the arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {arm: plt.cm.tab10(i % 10) for i, arm in enumerate(task.arms)}
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    labelled = set()  # each arm named once in the legend, on its first curve
    for stage, groups in stages.items():
        for arm, g in groups.items():
            start = [{"curve": [p for p in (starts.get(arm) or {}).get("curve") or [] if p[0] == 0]}]
            curve = mean_curve(g.runs + start, task)
            if curve:  # one eval (DPO: at the end only) is a point
                label = None if arm in labelled else task.arms[arm].label
                labelled.add(arm)
                style = STYLES.get(stage, "-") if len(curve) > 1 else MARKERS.get(stage, "o")
                ax.plot(*zip(*curve), style, color=colors[arm], label=label, alpha=0.85)
    ax.set_xlabel("training GFLOPs (PyTorch's FLOP counter)")
    ax.set_ylabel(f"test {task.metric} (mean over seeds)")
    ax.set_title("solid / o: equal FLOPs · dotted / x: equal steps · dashed / square: longer horizon", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(images, f"{name}-flops.png"), dpi=110)
    plt.close(fig)

    groups = stages.get("equal FLOPs") or {}
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for arm, g in groups.items():
        values = g.values(task)
        peak = g.median("peak_rss_kib")
        if values and peak:
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            ax.errorbar(peak / 1024, statistics.fmean(values), yerr=sd, fmt="o", color=colors[arm],
                        label=task.arms[arm].label, capsize=3)  # fmt: skip
    ax.set_xlabel("peak RSS of the run's process, MiB")
    ax.set_ylabel(f"test {task.metric} at equal FLOPs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(images, f"{name}-memory.png"), dpi=110)
    plt.close(fig)


def growth_plot(curves: list, target: dict | None, images: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
