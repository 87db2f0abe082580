"""Bad input through the real CLI: one paragraph naming the recipe key and the fix, exit 2, before any weight loads
and before the output directory is created."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import tiny_recipe, write_recipe
from test_ddp import CONNECTION_ERRORS
from transformers import AutoModelForCausalLM, PreTrainedModel

from hf_stackwise.cli import pipeline as run
from hf_stackwise.cli.commands import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULE = [
    {"name": "top", "until": 0.5, "train": ["top"], "learning_rate": 1e-3},
    {"name": "all", "until": 1.0, "train": "all", "learning_rate": 5e-4},
]


@pytest.fixture
def no_weights(monkeypatch):
    """Any weight load fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the recipe was refused")

    monkeypatch.setattr(run, "load_model", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))


def refused(argv: list[str], capsys, output_dir, *expected: str) -> str:
    """``main(argv)`` exits 2 with one paragraph holding every ``expected`` text; nothing is written."""
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("hf-stackwise: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    assert not os.path.exists(output_dir)
    return err


@pytest.fixture
def recipe_path(tmp_path, tiny_llama_dir, pydoc_files):
    return write_recipe(tmp_path, tiny_recipe(tmp_path, tiny_llama_dir, pydoc_files[0], SCHEDULE))


@pytest.mark.usefixtures("no_weights")
@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--training.eval_strategy", "steps"], ["training.eval_strategy: 'steps'", "data.eval", "eval_fraction"]),
        (["--training.eval_on_start", "true"], ["training.eval_on_start: true", "data.eval"]),
        (["--training.per_device_train_batch_size", "0"], ["training.per_device_train_batch_size: 0", "positive"]),
        (["--training.gradient_accumulation_steps", "0"], ["training.gradient_accumulation_steps: 0"]),
        (["--training.learning_rate", "-0.1"], ["training.learning_rate: -0.1", "non-negative"]),
        (["--training.seed", "-1"], ["training.seed: -1"]),
        (["--training.optim", "galore_adamw"], ["training.optim: 'galore_adamw'", "adamw_torch"]),
        (["--training.optim", "lomo"], ["training.optim: 'lomo'", "cannot drive"]),
        (["--training.optim", "not_an_optimizer"], ["training.optim: not_an_optimizer is not a valid"]),
        (["--training.lr_scheduler_kwargs", "{num_cycles: 2}"], ["training.lr_scheduler_kwargs", "`lr_schedule`"]),
        (
            ["--training.lr_scheduler_type", "cosine"],
            ["training.lr_scheduler_type", "`lr_schedule` (and `lr_schedule_kwargs`) on each phase"],
        ),
        (["--training.report_to", "no_such_tracker"], ["training.report_to: 'no_such_tracker'"]),
    ],
)
@pytest.mark.parametrize("command", ["train", "validate"])
def test_training_arguments_are_checked_before_weights(command, extra, expected, recipe_path, tmp_path, capsys):
    refused([command, recipe_path, *extra], capsys, tmp_path / "run", *expected)


@pytest.mark.usefixtures("no_weights")
def test_plan_refuses_optimizers_the_schedule_cannot_drive(recipe_path, tmp_path, capsys):
    refused(["plan", recipe_path, "--training.optim", "galore_adamw"], capsys, tmp_path / "run", "training.optim")


@pytest.mark.usefixtures("no_weights")
def test_output_dir_naming_a_file(recipe_path, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file\n")
    for target in (tmp_path / "taken", tmp_path / "taken" / "run"):
        argv = ["train", recipe_path, "--training.output_dir", str(target)]
        err = refused(argv, capsys, tmp_path / "taken" / "run", "training.output_dir")
        assert "a file, not a folder" in err
    assert (tmp_path / "taken").read_text() == "a file\n"


@pytest.mark.usefixtures("no_weights")
def test_model_folder_with_a_config_but_no_weights(recipe_path, tiny_llama_dir, tmp_path, capsys):
    folder = tmp_path / "config-only"
    folder.mkdir()
    for name in os.listdir(tiny_llama_dir):
        if name.endswith(".json") and name != "model.safetensors.index.json":
            shutil.copy(os.path.join(tiny_llama_dir, name), folder)
    err = refused(
        ["train", recipe_path, "--model.name_or_path", str(folder)], capsys, tmp_path / "run", "model.name_or_path"
    )
    assert "has a config but no weights" in err and "model.safetensors" in err and "from_scratch" in err
    err = refused(
        ["train", recipe_path, "--model.name_or_path", str(folder), "--model.gguf_file", "model.gguf"],
        capsys,
        tmp_path / "run",
        "model.gguf_file: 'model.gguf' is not a file",
    )


@pytest.mark.usefixtures("no_weights")
def test_model_folder_without_a_usable_tokenizer(recipe_path, tiny_llama_dir, tmp_path, capsys):
    bare = tmp_path / "no-tokenizer"
    broken = tmp_path / "broken-tokenizer"
    for folder in (bare, broken):
        folder.mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(tiny_llama_dir, name), folder)
    shutil.copy(os.path.join(tiny_llama_dir, "tokenizer_config.json"), broken)
    (broken / "tokenizer.json").write_text("{not json")
    for folder in (bare, broken):
        err = refused(
            ["train", recipe_path, "--model.name_or_path", str(folder)], capsys, tmp_path / "run", "model.name_or_path"
        )
        assert "has no usable tokenizer" in err and "tokenizer.save_pretrained" in err
    (bare / "w").mkdir()  # the model in a subfolder, without its tokenizer
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_llama_dir, name), bare / "w")
    err = refused(
        ["train", recipe_path, "--model.name_or_path", str(bare), "--model.subfolder", "w"],
        capsys,
        tmp_path / "run",
        "model.name_or_path",
    )
    assert "model.subfolder" in err


@pytest.mark.usefixtures("no_weights")
def test_a_tokenizer_larger_than_the_vocabulary(recipe_path, tmp_path, capsys):
    err = refused(
        ["train", recipe_path, "--model.from_scratch", "true", "--model.config", "{vocab_size: 100}"],
        capsys,
        tmp_path / "run",
        "model.name_or_path",
        "vocab_size is 100",
    )
    assert "model.config.vocab_size" in err


@pytest.mark.usefixtures("no_weights")
def test_missing_demo_model_says_make_assets(tmp_path, capsys):
    demo = os.path.join(ROOT, "recipes", "demo.yaml")
    missing = ".cache/models/not-made-yet"
    refused(
        ["validate", demo, "--model.name_or_path", missing, "--training.output_dir", str(tmp_path / "run")],
        capsys,
        tmp_path / "run",
        f"model.name_or_path: {missing!r} does not exist",
        "run `make assets`",
    )


def test_bad_input_in_a_fresh_process_has_no_traceback(recipe_path, tiny_llama_dir, tmp_path):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_llama_dir, name), folder)
    out = subprocess.run(
        [sys.executable, "-m", "hf_stackwise", "train", recipe_path, "--model.name_or_path", str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TRANSFORMERS_VERBOSITY="error"),
        cwd=ROOT,  # this checkout's hf_stackwise, not an installed copy
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "hf-stackwise: error: model.name_or_path:" in out.stderr
    assert not (tmp_path / "run").exists()


def test_a_different_run_shows_the_changed_keys_and_a_working_fix(tmp_path, tiny_llama_dir, pydoc_files, capsys):
    raw = tiny_recipe(tmp_path, tiny_llama_dir, pydoc_files[0], SCHEDULE, save_strategy="steps", save_steps=2)
    raw["rack"] = {"blocks_per_stack": 2}
    path = write_recipe(tmp_path, raw)
    assert main(["train", path]) == 0
    capsys.readouterr()
    listing = sorted(str(p) for p in (tmp_path / "run").rglob("*"))
    changed = ["--schedule.0.learning_rate", "0.002", "--rack.blocks_per_stack", "1"]
    assert main(["train", path, *changed]) == 2
    err = capsys.readouterr().err
    assert "holds a different run" in err and err.count("\n") == 1
    assert sorted(str(p) for p in (tmp_path / "run").rglob("*")) == listing
    assert "schedule[0].learning_rate: 0.001 in that run, 0.002 now" in err
    assert "rack.boundaries: [0, 2, 4] in that run, [0, 1, 2, 3, 4] now" in err
    assert "schedule[1]" not in err and "'layers'" not in err  # only the keys that differ, not whole sections
    assert "overwrite_output_dir: true" in err and "restore those keys" in err
    # with the keys restored, the suggested resume is accepted (the run is complete: nothing left to train)
    assert main(["validate", path, "--training.resume_from_checkpoint", "true"]) == 0
    assert main(["train", path, *changed, "--training.overwrite_output_dir", "true"]) == 0
    assert json.loads((tmp_path / "run" / "stackwise_run.json").read_text())["rack"]["boundaries"] == [0, 1, 2, 3, 4]


def test_a_different_run_without_checkpoints_does_not_suggest_resuming(tmp_path, tiny_llama_dir, pydoc_files, capsys):
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, tiny_llama_dir, pydoc_files[0], SCHEDULE))
    assert main(["train", path]) == 0
    capsys.readouterr()
    assert main(["validate", path, "--schedule.0.until", "0.25"]) == 2
    err = capsys.readouterr().err
    assert "schedule[0].until: 0.5 in that run, 0.25 now" in err
    assert "resume_from_checkpoint" not in err and "overwrite_output_dir: true" in err


def test_recipes_with_eval_data_still_evaluate(tmp_path, tiny_llama_dir, pydoc_files, capsys):
    raw = tiny_recipe(tmp_path, tiny_llama_dir, pydoc_files[0], SCHEDULE, eval_strategy="steps", eval_steps=2)
    raw["data"]["eval_fraction"] = 0.05
    assert main(["validate", write_recipe(tmp_path, raw)]) == 0
    assert "valid" in capsys.readouterr().out
    raw["data"].pop("eval_fraction")
    raw["data"]["eval"] = {"path": "text", "data_files": pydoc_files[1]}
    (tmp_path / "b").mkdir()
    assert main(["validate", write_recipe(tmp_path / "b", yaml.safe_load(yaml.safe_dump(raw)))]) == 0


def launch_two(tmp_path, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error", PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for attempt in (1, 2):  # retried once, only when gloo could not connect at start-up
        result = subprocess.run(
            [*cmd, "-m", "hf_stackwise", "train", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode == 0 or attempt == 2 or not any(e in result.stderr for e in CONNECTION_ERRORS):
            return result
        if "--training.output_dir" in args:  # a failed start-up may have created the output folder: start clean
            shutil.rmtree(args[args.index("--training.output_dir") + 1], ignore_errors=True)


@pytest.mark.slow
def test_torchrun_on_cpu_without_use_cpu_trains_one_ddp_run(tmp_path, tiny_llama_dir, pydoc_files, capsys):
    """Without `use_cpu`, the Trainer would leave 2 torchrun processes as 2 independent trainings into one folder;
    on a machine without an accelerator the launch becomes CPU DDP, equal to one process with the doubled batch."""
    from safetensors.torch import load_file

    raw = tiny_recipe(tmp_path, tiny_llama_dir, pydoc_files[0], SCHEDULE, per_device_train_batch_size=2, seed=0)
    raw["training"].pop("use_cpu")
    raw["training"]["dataloader_drop_last"] = True
    path = write_recipe(tmp_path, raw)
    ddp = launch_two(tmp_path, path, "--training.output_dir", str(tmp_path / "ddp"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 processes and no accelerator: training with CPU DDP" in ddp.stderr
    assert (
        main(
            [
                "train",
                path,
                "--training.output_dir",
                str(tmp_path / "one"),
                "--training.per_device_train_batch_size",
                "4",
            ]
        )
        == 0
    )
    two, one = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    start = load_file(os.path.join(tiny_llama_dir, "model.safetensors"))
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5)
    assert not torch.equal(one["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])
    # one process alone (batch 2) differs: the two ranks really trained together
    assert main(["train", path, "--training.output_dir", str(tmp_path / "alone")]) == 0
    alone = load_file(tmp_path / "alone" / "model.safetensors")
    assert not torch.allclose(alone["model.layers.0.mlp.up_proj.weight"], one["model.layers.0.mlp.up_proj.weight"])

    refused = launch_two(tmp_path, path, "--training.output_dir", str(tmp_path / "no"), "--training.use_cpu", "false")
    assert refused.returncode != 0
    assert "hf-stackwise: error: training.use_cpu: launched as 2 processes" in refused.stderr
    assert "--training.use_cpu true" in refused.stderr
    assert 'hf_stackwise/run.py", line' not in refused.stderr  # no traceback from hf_stackwise (torchrun adds its own)
    assert not (tmp_path / "no").exists()
