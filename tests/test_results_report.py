"""benchmarks/report.py renders the results page from the JSON files of benchmarks/results.py alone."""

from __future__ import annotations

import importlib.util
import json
import pathlib

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
