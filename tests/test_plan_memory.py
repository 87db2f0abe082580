"""`hf-stackwise plan --world-size N`: the memory per rank under DDP and FSDP2, printed under the one-process plan
(the numbers themselves are checked against real 2-rank runs in tests/test_ddp_memory.py)."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from hf_stackwise.cli.commands import main
from hf_stackwise.cli.plan import make_plan
from hf_stackwise.cli.plan_memory import per_rank
from hf_stackwise.recipe.loader import load_recipe


@pytest.fixture
def recipe_path(tmp_path, tiny_llama_dir, pydoc_files):
    recipe = {
        "model": {"name_or_path": tiny_llama_dir, "dtype": "float32"},
        "rack": {"blocks_per_stack": 2},
        "data": {"train": {"path": "text", "data_files": pydoc_files[0]}, "max_seq_length": 32},
        "schedule": [
            {"name": "top", "until": 0.5, "train": ["top"]},
            {"name": "all", "until": 1.0, "train": "all", "embeddings": "train", "head": "train"},
        ],
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 4, "per_device_train_batch_size": 2},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_world_size_prints_ddp_and_fsdp2_per_rank(recipe_path, capsys):
    assert main(["plan", recipe_path, "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "memory per rank on 8 ranks in MiB, DDP" in out and "memory per rank on 8 ranks in MiB, FSDP2" in out
    assert main(["plan", recipe_path]) == 0
    assert "per rank" not in capsys.readouterr().out  # one process: the plan as before


def test_sharded_parts_shrink_with_the_world_and_ddp_replicates(recipe_path):
    plan = make_plan(load_recipe(recipe_path))
    one, eight = per_rank(plan, 1), per_rank(plan, 8)
    for a, b, phase in zip(one, eight, plan.phases):
        assert a["ddp"] == b["ddp"]  # replicated: the same on any number of ranks
        assert b["ddp"]["buckets"] == b["ddp"]["gradients"] == phase.memory["gradients"]
        for part in ("gradients", "optimizer"):  # tiny tensors pad to whole rows: within a row per tensor
            assert a["fsdp2"][part] / 8 <= b["fsdp2"][part] <= a["fsdp2"][part] / 8 * 1.1
        assert b["fsdp2"]["activations"] == phase.memory["activations"]
    assert eight[1]["fsdp2"]["gathered"] > eight[0]["fsdp2"]["gathered"]  # the root's gradients before reduce


def test_world_size_must_be_a_count(recipe_path, capsys):
    assert main(["plan", recipe_path, "--world-size", "0"]) == 2
    assert "plan --world-size: '0'" in capsys.readouterr().err


ROOT = pathlib.Path(__file__).resolve().parents[1]
SCALING = (ROOT / "docs" / "scaling.md").read_text()


@pytest.mark.parametrize("recipe", ["smollm2-135m/block_coordinate.yaml", "llama3-8b/block_coordinate.yaml"])
def test_the_scaling_page_shows_what_plan_prints(recipe, monkeypatch):
    """docs/scaling.md's per-rank tables are `plan --world-size 8` of the real SmolLM2-135M folder and of
    Llama-3-8B's config (built without weights)."""
    monkeypatch.chdir(ROOT)  # the recipes' relative paths (.cache/...) resolve against the repository
    rows = {r["phase"]: r for r in per_rank(make_plan(load_recipe(f"recipes/{recipe}")), 8)}
    table = SCALING.split(f"recipes/{recipe} --world-size 8")[1].split("\n\n", 2)[1]
    columns = ("weights", "gathered", "gradients", "buckets", "optimizer", "activations", "total")
    checked = 0
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        phase, engine = cells[0].split()[0], {"DDP": "ddp", "FSDP2": "fsdp2"}[cells[1]]
        for column, text in zip(columns, cells[2:]):
            if text:
                assert text == f"{rows[phase][engine][column] / 2**20:,.1f}", (phase, engine, column)
                checked += 1
    assert checked == 24
