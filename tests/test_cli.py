"""The command line: help, a full run of a recipe, overrides, and errors as one readable paragraph."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import yaml
from transformers import AutoModelForCausalLM

from hf_stackwise.cli.commands import main


def script(name: str) -> str:
    """A console script installed beside this interpreter (PATH may not have it, e.g. pyenv before a rehash)."""
    return os.path.join(os.path.dirname(sys.executable), name)


def recipe(tmp_path, model_dir, train_file, eval_file, **training):
    raw = {
        "model": {"name_or_path": model_dir, "dtype": "float32"},
        "rack": {"blocks_per_stack": 2},
        "data": {
            "train": {"path": "text", "data_files": train_file},
            "eval": {"path": "text", "data_files": eval_file},
            "max_eval_samples": 16,
            "max_seq_length": 32,
        },
        "schedule": [
            {"name": "top", "until": 0.5, "train": ["top"], "learning_rate": 1e-3},
            {"name": "all", "until": 1.0, "train": "all", "learning_rate": 5e-4},
        ],
        "training": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 6,
            "per_device_train_batch_size": 4,
            "eval_strategy": "steps",
            "eval_steps": 3,
            "eval_on_start": True,
            "save_steps": 3,
            "report_to": "none",
            "use_cpu": True,
            **training,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_help_of_every_command():
    for args in (["--help"], *([cmd, "--help"] for cmd in ("train", "validate", "plan", "export", "plot"))):
        out = subprocess.run([script("hf-stackwise"), *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "usage: hf-stackwise" in out.stdout
    out = subprocess.run([sys.executable, "-m", "hf_stackwise", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and all(cmd in out.stdout for cmd in ("train", "validate", "plan", "export", "plot"))
    out = subprocess.run([sys.executable, "-m", "hf_stackwise"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "usage: hf-stackwise" in out.stderr and "plan" in out.stderr


def test_bad_inputs_are_one_paragraph_and_write_nothing(tmp_path, capsys):
    import json

    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a recipe\n")
    (tmp_path / "recipe.yaml").write_text("model: {name_or_path: x}\n")
    old = tmp_path / "old-run"  # a run written by another version of the format
    (old / "checkpoint-2").mkdir(parents=True)
    manifest = {"format_version": 0, "schedule": [{"until": 1.0}], "rack": {"boundaries": [0, 4]}}
    (old / "stackwise_run.json").write_text(json.dumps(manifest))
    (old / "trainer_state.json").write_text(json.dumps({"log_history": [{"loss": 1.0, "step": 1}]}))
    for name in ("stackwise_state.json", "config.json", "trainer_state.json"):
        (old / "checkpoint-2" / name).write_text(json.dumps({"format_version": 0, "run": manifest}))
    listing = sorted(str(p) for p in tmp_path.rglob("*"))
    cases = [
        (["plan", str(tmp_path / "empty")], "is not a file"),
        (["plan", str(tmp_path / "notes.txt")], "expected a YAML mapping"),
        (["plan", str(old)], "is a run folder, not a recipe"),
        (["plan", str(old / "stackwise_run.json")], "is an hf_stackwise run or checkpoint manifest, not a recipe"),
        (["plot", str(tmp_path / "empty")], "is not an hf_stackwise run"),
        (["plot", str(tmp_path / "recipe.yaml")], "`hf-stackwise plan RECIPE --plot OUT.png`"),
        (["plot", str(old)], "has format version 0, and this hf_stackwise reads version 1"),
        (["export", str(tmp_path / "recipe.yaml"), str(tmp_path / "out")], "it looks like a recipe: train it first"),
        (["export", str(tmp_path / "empty"), str(tmp_path / "out")], "is not an hf_stackwise run or checkpoint"),
        (["export", str(old), str(tmp_path / "out")], "has format version 0, and this hf_stackwise reads version 1"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and err.startswith("hf-stackwise: error: ") and err.count("\n") == 1, err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == listing  # nothing written or overwritten


def test_train_runs_the_recipe_and_saves_a_plain_model(tmp_path, tiny_llama_dir, pydoc_files, capsys):
    path = recipe(tmp_path, tiny_llama_dir, *pydoc_files)
    assert main(["train", path]) == 0
    out = capsys.readouterr().out
    assert "trained 6 steps" in out
    assert "top              steps      0-2" in out and "all              steps      3-5" in out
    words = out.split("eval loss: first ")[1].split()  # "<first> -> last <last>"
    first, last = float(words[0]), float(words[3])
    assert last < first  # real text, a real (tiny) model: training helps
    run = tmp_path / "run"
    last = out.strip().splitlines()[-1]  # the last line names the folder that loads as the trained model
    assert last == f'hf-stackwise: trained 6 steps; load the model with AutoModelForCausalLM.from_pretrained("{run}")'
    assert {"checkpoint-3", "checkpoint-6", "stackwise_run.json", "model.safetensors"} <= set(os.listdir(run))
    model = AutoModelForCausalLM.from_pretrained(run)
    start = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, start.model.layers[0].mlp.up_proj.weight)


def test_overrides_and_resume_from_the_cli(tmp_path, tiny_llama_dir, pydoc_files, capsys):
    path = recipe(tmp_path, tiny_llama_dir, *pydoc_files)
    assert main(["train", path, "--training.max_steps", "4", "--schedule.0.until=0.25"]) == 0
    assert "trained 4 steps" in capsys.readouterr().out
    # same run again without resume: refused, nothing touched
    listing = sorted(os.listdir(tmp_path / "run"))
    assert main(["train", path, "--training.max_steps", "4", "--schedule.0.until=0.25"]) == 2
    assert "already holds checkpoints of this run" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "run")) == listing
    code = main(
        [
            "train",
            path,
            "--training.max_steps",
            "4",
            "--schedule.0.until=0.25",
            "--training.resume_from_checkpoint",
            "true",
        ]
    )
    assert code == 0


def test_errors_are_one_paragraph_with_exit_code_2(tmp_path, tiny_llama_dir, pydoc_files):
    path = recipe(tmp_path, tiny_llama_dir, *pydoc_files)
    cases = [
        (["--schedule.1.until", "0.9"], "schedule[1].until: 0.9 but the last phase must end at 1.0"),
        (["--schedule.0.train", "[9]"], "schedule[0].train: stack [9] does not exist"),
        (["--model.name_or_path", str(tmp_path / "missing")], "model.name_or_path:"),
        (["--training.max_stepz", "3"], "training.max_stepz: not a TrainingArguments field"),
    ]
    for overrides, expected in cases:
        out = subprocess.run(
            [sys.executable, "-m", "hf_stackwise", "train", path, *overrides],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert out.returncode == 2, out.stderr[-2000:]
        assert expected in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert not (tmp_path / "run").exists()
    out = subprocess.run(
        [sys.executable, "-m", "hf_stackwise", "validate", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "is not a file" in out.stderr


def test_validate_prints_the_phases_without_writing(tmp_path, tiny_llama_dir, pydoc_files, capsys):
    path = recipe(tmp_path, tiny_llama_dir, *pydoc_files)
    assert main(["validate", path]) == 0
    out = capsys.readouterr().out
    assert "valid. 2 stacks over 4 blocks (model.layers), 6 steps" in out
    assert not (tmp_path / "run").exists()
