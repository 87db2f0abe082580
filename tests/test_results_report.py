"""benchmarks/report.py renders the results page from the JSON files of benchmarks/results.py alone."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETTINGS = {
    "steps": 4,
    "batch_size": 2,
    "seq_len": 16,
    "eval_samples": 4,
    "growth": {
        "steps": 40,
        "depth": 4,
        "batch_size": 16,
        "seq_len": 64,
        "lr": 2e-3,
        "eval_every": 10,
        "target_at": 0.75,
    },
    "quick": True,
    "budget": 1.0,
}
MACHINE = {
    "python": "3.x",
    "platform": "Linux",
    "cpu": "test cpu",
    "cores": 2,
    "ram_bytes": 8 * 1024**3,
    "versions": {"torch": "t"},
    "commit": "abc",
}


def report_module():
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finetune(arm: str, seed: int, loss: float, step_s: float, peak_mib: int, optim: int) -> dict:
    return {
        "kind": "finetune",
        "arm": arm,
        "seed": seed,
        "status": "ok",
        "settings": SETTINGS,
        "eval_loss": loss,
        "loss_curve": [[1, loss + 1], [2, loss + 0.5]],
        "base_rss_kib": 500 * 1024,
        "peak_rss_kib": peak_mib * 1024,
        "optimizer_state_bytes_max": optim,
        "trainable_params_end": optim // 8,
        "step_s": step_s,
        "other_cpu": 0.0,
        "started": f"2026-01-01T00:0{seed}:00+00:00",
        "wall_s": 60.0,
        "load_before": [0.5, 0.5, 0.5],
        "load_after": [1.0, 0.5, 0.5],
    }


def growth(arm: str, seed: int, losses: list[float]) -> dict:
    flops = 2.0e9 if arm == "full" else 1.0e9
    curve = [[10 * (i + 1), 1000 * (i + 1), flops * (i + 1), loss] for i, loss in enumerate(losses)]
    return {"kind": "growth", "arm": arm, "seed": seed, "status": "ok", "settings": SETTINGS, "curve": curve}


def test_page_from_fixture_json(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    files = {
        "manifest": {"settings": SETTINGS, "seeds": 2, "machine": MACHINE},
        "finetune-baseline": {"status": "ok", "settings": SETTINGS, "eval_loss": 4.0},
        "finetune-lisa-seed0": {"status": "not run", "reason": "lisa.yaml does not exist (yet)", "settings": SETTINGS},
        "finetune-lora-seed0": {**finetune("lora", 0, 9.0, 1.0, 900, 100), "settings": {"steps": 999}},  # other run
        "growth-target": {"status": "ok", "settings": SETTINGS, "target": 2.0, "at_step": 30, "from_seeds": 2},
        "cache-steps": {"cached_over_uncached_ratio": 0.25},
    }
    for seed in range(2):
        files[f"finetune-full-seed{seed}"] = finetune("full", seed, 3.0 + 0.1 * seed, 2.0, 3000, 1_000_000)
        files[f"finetune-unfreeze-seed{seed}"] = finetune("unfreeze", seed, 3.5 + 0.1 * seed, 1.0, 2000, 400_000)
        files[f"growth-full-seed{seed}"] = growth("full", seed, [3.0, 2.5, 2.0, 1.9])
        files[f"growth-grow-seed{seed}"] = growth("grow", seed, [3.0, 2.6, 2.4, 2.1])
    for name, data in files.items():
        (folder / f"{name}.json").write_text(json.dumps(data))
    out, images = tmp_path / "results.md", tmp_path / "images"
    page = report_module().render(str(folder), str(out), str(images))

    assert out.read_text() == page
    rows = {line.split(" | ")[0].lstrip("| "): line for line in page.splitlines() if line.startswith("| ")}
    full = "| 3.050 ± 0.071 | 2 | -0.950 | 3000 | 2500 | 1.0 | 125,000 | 2.00 | 1.00 | 0% |"
    assert full in rows["full fine-tuning"]
    assert "| 3.550 ± 0.071 | 2 |" in rows["gradual unfreezing (the demo's schedule)"]
    assert "| 0.50 |" in rows["gradual unfreezing (the demo's schedule)"]  # step ratio against the same seed's full
    assert "not run — lisa.yaml does not exist (yet) |" in rows["LISA (sampled stacks)"]
    assert "| not run yet |" in rows["LoRA (r 8, every stack)"]  # the other settings' run is left out
    assert "ends **above** full fine-tuning's held-out loss by 0.500" in page
    assert "Target eval loss **2.0000**" in page
    assert "never reached" in page and "did **not** help" in page  # grow never reaches 2.0
    assert "| `cache-steps.json` | cached_over_uncached_ratio | 0.250 |" in page
    assert "2026-01-01T00:00:00+00:00 to 2026-01-01T00:01:00+00:00" in page
    for name in ("finetune-loss.png", "finetune-cost.png", "finetune-curves.png", "growth.png"):
        assert (images / name).stat().st_size > 1000
        assert f"(images/{name})" in page


def test_the_committed_results_page_is_the_render_of_the_committed_json(tmp_path):
    """docs/results.md is exactly what benchmarks/report.py renders from benchmarks/results/*.json (re-render with
    `python benchmarks/report.py` after a run); rendering with plots gives the same text and draws what it links."""
    report = report_module()
    results, page = ROOT / "benchmarks" / "results", ROOT / "docs" / "results.md"
    text = report.render(str(results), str(page), str(ROOT / "docs" / "images" / "results"), write=False)
    assert text == page.read_text(), "docs/results.md is not the render of benchmarks/results/: run report.py"
    images = tmp_path / "docs" / "images" / "results"  # the same layout: the same relative links
    (tmp_path / "docs").mkdir()
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
