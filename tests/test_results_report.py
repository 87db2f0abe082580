"""benchmarks/report.py renders the results page from the JSON files of benchmarks/results.py alone."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASK = {"steps": 4, "batch_size": 2, "seq_len": 16, "eval_samples": 4, "evals": 2}
GROWTH = {"steps": 40, "depth": 4, "batch_size": 16, "seq_len": 64, "lr": 2e-3, "eval_every": 10, "target_at": 0.75}
SETTINGS = {"tasks": {"clm": TASK, "classify": TASK, "dpo": TASK}, "growth": GROWTH, "quick": True, "budget": 1.0}
MACHINE = {
    "python": "3.x",
    "platform": "Linux",
    "cpu": "test cpu",
    "cores": 2,
    "ram_bytes": 8 * 1024**3,
    "versions": {"torch": "t"},
    "commit": "abc",
}


def module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    found = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(found)
    return found


def report_module():
    return module("report")


def run(arm, rate, seed, steps, loss, flops, peak_mib=1000, task="clm", **extra) -> dict:
    """One run's JSON as benchmarks/results.py writes it (the keys the report reads)."""
    return {
        "task": task,
        "arm": arm,
        "rate": rate,
        "seed": seed,
        "steps": steps,
        "settings": TASK,
        "quick": True,
        "status": "ok",
        "val": {"loss": loss - 0.5},
        "test": {"loss": loss},
        "before": {"val": {"loss": 3.5}, "test": {"loss": 4.0}},
        "curve": [[0, 0, 0, {"test": {"loss": 4.0}}], [steps, flops, 10.0, {"test": {"loss": loss}}]],
        "flops": flops,
        "cpu_s": flops / 1e9,
        "peak_rss_kib": peak_mib * 1024,
        "optimizer_state_bytes_max": 1024 * 1024,
        "cache_hit_rate": None,
        "freezes": [],
        "wall_s": 60.0,
        "started": f"2026-01-01T00:0{seed}:00+00:00",
        "load_before": [0.5, 0.5, 0.5],
        "load_after": [1.0, 0.5, 0.5],
        "torch_threads": 1,
        **extra,
    }


def fixture_runs() -> tuple[dict, list[dict]]:
    third = 1 / 3
    choices = {
        "full": {"grid": [third, 1.0, 3.0], "rate": 1.0, "flop_steps": 4, "flop_budget": 4e9},
        "lora": {"grid": [third, 1.0, 3.0, 9.0], "rate": 3.0, "flop_steps": 8, "flop_budget": 4e9},
        "unfreeze": {"grid": [third, 1.0, 3.0], "rate": third, "flop_steps": 6, "flop_budget": 4e9},
    }
    runs = []
    for seed in range(3):
        runs.append(run("full", 1.0, seed, 4, 3.00 + 0.01 * seed, 4e9, peak_mib=3000))
        runs.append(run("lora", 3.0, seed, 4, 3.10 + 0.01 * seed, 2e9, peak_mib=1800))
        runs.append(run("lora", 3.0, seed, 8, (2.99, 3.05, 3.00)[seed], 4e9, peak_mib=1800))
        runs.append(run("unfreeze", third, seed, 4, 3.50 + 0.01 * seed, 3e9, peak_mib=2000))
        if seed < 2:  # one seed of the equal-FLOP run is missing
            runs.append(run("unfreeze", third, seed, 6, 3.40 + 0.01 * seed, 4.5e9, peak_mib=2000))
    runs.append(run("full", third, 0, 4, 3.2, 4e9))
    runs.append(run("full", 3.0, 0, 4, 3.3, 4e9))
    runs.append(run("lora", third, 0, 4, 3.6, 2e9))
    runs.append(run("lora", 1.0, 0, 4, 3.4, 2e9))
    runs.append(run("lora", 9.0, 0, 4, 3.9, 2e9))
    runs.append(run("unfreeze", 1.0, 0, 4, 3.8, 3e9))
    runs.append({**run("unfreeze", 3.0, 0, 4, 9.0, 3e9), "status": "failed", "reason": "diverged"})
    runs.append({**run("full", 1.0, 5, 4, 0.1, 4e9), "settings": {**TASK, "steps": 999}})  # other settings
    return {"clm": choices}, runs


def test_interval_compare_and_pareto_by_hand():
    rt = module("report_tasks")
    mean, low, high = rt.interval([1.0, 2.0, 3.0])  # sd 1, t(0.975, 2) = 4.303: half-width 4.303 / sqrt(3)
    assert (mean, round(low, 3), round(high, 3)) == (2.0, -0.484, 4.484)
    assert rt.interval([1.0]) is None
    assert rt.compare([1.0, 1.1, 1.2], [2.0, 2.1, 2.2], lower_is_better=True) == "better"
    assert rt.compare([1.0, 1.1, 1.2], [2.0, 2.1, 2.2], lower_is_better=False) == "worse"
    assert rt.compare([1.0, 2.0, 3.0], [2.0, 2.1, 2.2], lower_is_better=True) == "tie"
    assert rt.compare([1.0], [2.0, 2.1], lower_is_better=True) == "tie"  # one seed: no interval, no verdict
    points = [("a", 1.0, 3.0), ("b", 2.0, 2.5), ("c", 2.0, 2.9), ("d", 3.0, 2.5), ("e", 4.0, 2.0)]
    assert [p[0] for p in rt.pareto(points, lower_is_better=True)] == ["a", "b", "e"]
    assert [p[0] for p in rt.pareto(points, lower_is_better=False)] == ["a"]


def test_busy_wall_time_is_the_union_of_the_runs_intervals():
    runs = [{"started": f"2026-01-01T00:00:{s:02d}+00:00", "wall_s": w} for s, w in ((0, 20), (10, 20), (50, 5))]
    runs.append({"started": "2026-01-01T00:00:40+00:00", "wall_s": 30})  # covers the 5 s run at 50 s
    assert report_module().busy_seconds(runs) == 30 + 30  # [0, 30] and [40, 70]
    assert report_module().busy_seconds(runs, 2) == 10 + 5  # [10, 20] and [50, 55]
    assert report_module().busy_seconds(runs, 3) == 0


def test_page_from_fixture_json(tmp_path):
    folder = tmp_path / "results" / "page"
    folder.mkdir(parents=True)
    choices, runs = fixture_runs()
    manifest = {"settings": SETTINGS, "seeds": 3, "machine": MACHINE, "choices": choices,
                "invocations": [{"argv": [], "seconds": 7200.0, "ended": "x"}]}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for i, data in enumerate(runs):
        (folder / f"run{i}.json").write_text(json.dumps(data))
    (tmp_path / "results" / "cache-steps.json").write_text(json.dumps({"cached_over_uncached_ratio": 0.25}))
    out, images = tmp_path / "results.md", tmp_path / "images"
    page = report_module().render(str(folder), str(out), str(images))

    assert out.read_text() == page
    assert page.index("## The protocol") < page.index("| arm |")  # the protocol comes before any number
    rows = [line for line in page.splitlines() if line.startswith("| ")]
    grid = next(r for r in rows if r.startswith("| LoRA") and "×1/3: " in r)
    assert "×3: **2.600**" in grid and "×9: 3.400" in grid and grid.endswith("| ×3 |")
    failed = next(r for r in rows if r.startswith("| gradual unfreezing") and "×1/3: " in r)
    assert "×3: failed" in failed and failed.endswith("| ×1/3 *edge* |")  # the best may lie below the grid
    full = next(r for r in rows if r.startswith("| full fine-tuning | 4 |"))
    assert "| 3.010 ± 0.010 | [2.985, 3.035] | 3 |" in full and "| 4 | 1.00 |" in full  # GFLOPs, FLOPs / full
    assert "| 3000 |" in full
    lora = next(r for r in rows if r.startswith("| LoRA (r 8, every stack) | 4 |"))
    assert "| 2 | 0.50 |" in lora
    assert "2 seed(s)" not in page and "1 seed(s) missing: not run yet" in page  # unfreeze's equal-FLOP seed 2
    assert "Equal steps: **LoRA (r 8, every stack)** against full fine-tuning is **worse** (+0.100" in page
    assert "Equal FLOPs: **LoRA (r 8, every stack)** against full fine-tuning ties with it (+0.003" in page
    assert "Equal steps: **gradual unfreezing (cache auto)** against full fine-tuning is **worse** (+0.500" in page
    front = next(line for line in page.splitlines() if line.startswith("- **FLOPs front**"))
    assert front == (
        "- **FLOPs front** (no other run is as cheap and as good): LoRA (r 8, every stack) at 2 GFLOPs (loss 3.110; "
        "equal steps); full fine-tuning at 4 GFLOPs (loss 3.010; equal FLOPs)."  # LoRA's 4 GFLOPs run: 3.013
    )
    assert "- **a quarter of full fine-tuning's budget** (1 GFLOPs)" not in page  # nothing ran that cheaply
    assert "- **half of it** (2 GFLOPs): best LoRA (r 8, every stack) (loss 3.110)." in page
    assert "**full fine-tuning's budget** (4 GFLOPs): best full fine-tuning (loss 3.010); tied within the 95% " \
        "intervals: LoRA (r 8, every stack)" in page  # fmt: skip
    assert "**No stack-wise schedule is on the FLOPs front here**" in page
    assert "## Classification: MiniLM on standard-library docstrings\n\nNot run yet." in page
    assert "| `cache-steps.json` | cached_over_uncached_ratio | 0.250 |" in page
    assert "0.1 hours of wall time with runs in progress (two at a time: what `make bench-report` takes" in page
    for name in ("clm-flops.png", "clm-memory.png"):
        assert (images / name).stat().st_size > 1000
        assert f"(images/{name})" in page


def test_the_committed_results_page_is_the_render_of_the_committed_json(tmp_path):
    """docs/results.md is exactly what benchmarks/report.py renders from benchmarks/results/page/*.json (re-render
    with `python benchmarks/report.py` after a run); rendered with plots, the same text, and it draws what it links."""
    report = report_module()
    results, page = ROOT / "benchmarks" / "results" / "page", ROOT / "docs" / "results.md"
    text = report.render(str(results), str(page), str(ROOT / "docs" / "images" / "results"), write=False)
    assert text == page.read_text(), "docs/results.md is not the render of benchmarks/results/page/: run report.py"
    images = tmp_path / "docs" / "images" / "results"  # the same layout: the same relative links
    (tmp_path / "docs").mkdir()
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    assert report.render(str(results), str(tmp_path / "docs" / "results.md"), str(images)) == text
    linked = re.findall(r"!\[[^]]*\]\(images/results/([^)]+)\)", text)
    assert linked and sorted(linked) == sorted(p.name for p in images.iterdir())
    assert all((ROOT / "docs" / "images" / "results" / name).is_file() for name in linked)


def test_the_results_page_says_which_cache_targets_were_missed():
    """Every target benchmarks/cache.py recorded is on the page with its value, and a missed one says so."""
    page = (ROOT / "docs" / "results.md").read_text().splitlines()
    checked = 0
    for path in sorted((ROOT / "benchmarks" / "results").glob("cache*.json")):
        for model, result in json.loads(path.read_text()).get("models", {}).items():
            for key, target in result.get("targets", {}).items():
                rows = [line for line in page if f"| `{path.name}` | {model} |" in line and f"(`{key}`)" in line]
                assert len(rows) == 1, (model, key)
                assert f"| {target['value']:.3f} |" in rows[0]
                assert rows[0].endswith("| met |" if target["pass"] else "| **missed** |"), rows[0]
                checked += 1
    assert checked > 0


def test_the_activation_cache_page_quotes_the_auto_off_overhead_of_the_json():
    """docs/activation-cache.md states the `auto`-off overhead as cache.json has it: met or missed, the value, the
    machine's other CPU load."""
    data = json.loads((ROOT / "benchmarks" / "results" / "cache.json").read_text())
    text = " ".join((ROOT / "docs" / "activation-cache.md").read_text().split())
    llama, smollm2 = (data["models"][m]["targets"]["auto_off_overhead"] for m in ("llama", "smollm2"))
    assert f"on the Llama it cost {llama['value']:.2f}×" in text and llama["pass"]
    verdict = "the target was missed" if not smollm2["pass"] else "the target was met"
    assert f"on SmolLM2 **{smollm2['value']:.2f}× ({smollm2['value']:.3f}): {verdict}**" in text
    assert f"other processes used {100 * data['other_cpu']:.0f}% of its CPU" in text


def test_the_block_coordinate_page_quotes_the_ddp_json():
    """The DDP paragraph of docs/stories/block-coordinate.md is `benchmarks/ddp.py`'s summary of the committed
    benchmarks/results/ddp.json, word for word: its bucket sizes and step ratios have data behind them."""
    spec = importlib.util.spec_from_file_location("ddp_benchmark", ROOT / "benchmarks" / "ddp.py")
    ddp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ddp)
    data = json.loads((ROOT / "benchmarks" / "results" / "ddp.json").read_text())
    assert len(data["phases"]) == data["settings"]["layers"] // 2
    page = " ".join((ROOT / "docs" / "stories" / "block-coordinate.md").read_text().split())
    assert " ".join(ddp.summary(data).split()) in page
