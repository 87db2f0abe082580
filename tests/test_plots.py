"""`hf-stackwise plot`: the schedule timeline and the loss by phase, as non-empty PNGs of the expected size."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np
import yaml

from hf_stackwise.cli import main
from hf_stackwise.plots import plot_timeline
from hf_stackwise.schedule import Schedule


def check_png(path):
    image = mpimg.imread(path)
    assert image.shape[:2] == (400, 1000)  # 10 x 4 inches at 100 dpi
    assert np.unique(image.reshape(-1, image.shape[-1]), axis=0).shape[0] > 20  # drawn on, not blank


def test_plot_a_run(tmp_path, tiny_llama_dir, pydoc_files, capsys):
    raw = {
        "model": {"name_or_path": tiny_llama_dir, "dtype": "float32"},
        "rack": {"blocks_per_stack": 1},
        "adapters": {"r": 2, "alpha": 4},
        "data": {
            "train": {"path": "text", "data_files": pydoc_files[0]},
            "eval": {"path": "text", "data_files": pydoc_files[1]},
            "max_eval_samples": 8,
            "max_seq_length": 32,
        },
        "schedule": [
            {"name": "shallow", "until": 0.5, "stacks": 2, "train": ["top"], "head": "train"},
            {"name": "deep", "until": 1.0, "train": [3], "adapter": "lora", "trunk": "lora", "learning_rate": 5e-4},
        ],
        "training": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 6,
            "per_device_train_batch_size": 4,
            "logging_steps": 1,
            "eval_strategy": "steps",
            "eval_steps": 3,
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
        },
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(tmp_path / "recipe.yaml")]) == 0
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "plots")]) == 0
    for name in ("schedule.png", "loss.png"):
        check_png(tmp_path / "plots" / name)
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    assert {h["phase"] for h in history if "loss" in h} == {"shallow", "deep"}


def test_timeline_before_training(tmp_path):
    schedule = Schedule.from_list([{"until": 0.3, "train": [3]}, {"until": 1.0, "train": "all"}])
    check_png(plot_timeline(schedule, 4, str(tmp_path / "t.png")))


def test_timeline_of_a_growing_rack(tmp_path):
    from hf_stackwise.plots import stack_mode

    schedule = Schedule.from_list(
        [
            {"name": "base", "until": 0.5, "train": "top"},
            {"name": "grow", "until": 1.0, "grow": {"op": "identity", "stacks": 1, "at": "bottom"}, "train": "new"},
        ]
    )
    assert [stack_mode(schedule, 0, s, 2) for s in range(3)] == ["frozen", "full", "inactive"]  # not grown yet
    assert [stack_mode(schedule, 1, s, 2) for s in range(3)] == ["frozen", "frozen", "full"]
    check_png(plot_timeline(schedule, 2, str(tmp_path / "t.png")))


def test_plot_refuses_non_runs_and_runs_without_logs(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "is not an hf_stackwise run" in capsys.readouterr().err
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "stackwise_run.json").write_text(
        json.dumps({"format_version": 1, "schedule": [{"until": 1.0}], "rack": {"boundaries": [0, 4]}})
    )
    assert main(["plot", str(run)]) == 2
    assert "no trainer_state.json yet" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["stackwise_run.json"]  # nothing written
