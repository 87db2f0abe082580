"""Model card and `push_to_hub`: the export carries a card (base model, phase table, recipe, loss plot), and a
recipe with `training.push_to_hub: true` uploads exactly the export folder through the Trainer's own Hub calls.

The network is unavailable, so the test stops at the lowest boundary: `HfApi.create_repo` and `HfApi.upload_folder`
record their arguments and copy the folder they were given; the copy is then loaded in a clean process."""

from __future__ import annotations

import concurrent.futures
import fnmatch
import os
import shutil
import types

import torch
import yaml
from conftest import logits_in_clean_process
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModelForCausalLM

from hf_stackwise.cli.commands import main
from hf_stackwise.rack.rack import Rack


def files_under(folder) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names
    )


def recipe(tmp_path, model_dir, train_file, **training) -> str:
    raw = {
        "model": {"name_or_path": model_dir, "dtype": "float32"},
        "rack": {"blocks_per_stack": 2},
        "data": {"train": {"path": "text", "data_files": train_file}, "max_seq_length": 32},
        "schedule": [
            {"name": "full", "until": 0.5, "train": "all", "learning_rate": 1e-3},
            {"name": "shallow", "until": 1.0, "stacks": 1, "train": ["top"], "head": "train"},
        ],
        "training": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 4,
            "per_device_train_batch_size": 4,
            "learning_rate": 5e-4,
            "logging_steps": 1,
            "save_steps": 2,
            "report_to": "none",
            "use_cpu": True,
            **training,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_push_to_hub_uploads_exactly_the_export(tmp_path, tiny_llama_dir, pydoc_files, token_dataset, monkeypatch):
    repos, uploads = [], []

    def create_repo(self, repo_id, **kwargs):
        repos.append(repo_id)
        return types.SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        copy = tmp_path / "uploaded" / str(len(uploads))
        shutil.copytree(folder_path, copy, ignore=shutil.ignore_patterns(*kwargs.get("ignore_patterns") or []))
        uploads.append({"repo_id": repo_id, "folder_path": str(folder_path), "copy": copy, **kwargs})
        if kwargs.get("run_as_future"):
            future = concurrent.futures.Future()
            future.set_result(None)
            return future
        return "https://huggingface.co/someone/tiny-stackwise/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    path = recipe(
        tmp_path,
        tiny_llama_dir,
        pydoc_files[0],
        push_to_hub=True,
        hub_model_id="someone/tiny-stackwise",
        hub_strategy="checkpoint",
    )
    assert main(["train", path]) == 0
    run = tmp_path / "run"
    assert repos == ["someone/tiny-stackwise"]
    # the Trainer's own checkpoint pushes (hub_strategy: checkpoint) ran, then one final upload of the export
    assert any(u.get("path_in_repo") == "last-checkpoint" for u in uploads[:-1])
    final = uploads[-1]
    assert final["repo_id"] == "someone/tiny-stackwise" and final["folder_path"] == str(run / "_export")
    assert not final.get("run_as_future") and final["commit_message"] == "Model save"
    assert files_under(final["copy"]) == files_under(run / "_export")
    assert ModelCard.load(run / "_export" / "README.md").text.startswith("\n# tiny-stackwise\n")
    # the same folder `hf-stackwise export` writes
    assert main(["export", str(run), str(tmp_path / "exported")]) == 0
    assert files_under(final["copy"]) == files_under(tmp_path / "exported")
    assert {"config.json", "model.safetensors", "README.md", "loss.png", "tokenizer.json"} <= set(
        files_under(final["copy"])
    )
    # stale files of the checkpoint pushes go, checkpoints on the Hub stay
    deletes = final["delete_patterns"]
    assert "training_args.bin" in deletes and "stackwise_run.json" in deletes
    assert not any(fnmatch.fnmatchcase("last-checkpoint/config.json", p) for p in deletes)
    # the uploaded folder is a plain model: same logits as the trained model at its last phase's depth
    ids = torch.tensor(token_dataset[:2]["input_ids"])
    trained = AutoModelForCausalLM.from_pretrained(run)
    with Rack.from_model(trained, blocks_per_stack=2).active_depth(1), torch.no_grad():
        expected = trained(input_ids=ids).logits
    torch.testing.assert_close(logits_in_clean_process(final["copy"], ids, tmp_path), expected, rtol=0, atol=1e-4)


def test_export_carries_the_model_card(tmp_path, tiny_llama_dir, pydoc_files):
    path = recipe(tmp_path, tiny_llama_dir, pydoc_files[0], save_strategy="no")
    assert main(["train", path, "--training.max_steps", "6"]) == 0
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.library_name == "transformers" and "hf_stackwise" in card.data.tags
    text = card.text
    assert f"**Base model:** `{tiny_llama_dir}`" in text
    assert (
        "| full | 0–2 | 0.00–0.50 | 0–1 | stacks 0, 1, embeddings, head | full (trunk frozen) | 1.0e-03 constant |"
        in text
    )
    assert "| shallow | 3–5 | 0.50–1.00 | 0 | stacks 0, head | full (trunk frozen) | 5.0e-04 constant |" in text
    assert "![training loss by phase](loss.png)" in text and (tmp_path / "out" / "loss.png").stat().st_size > 10_000
    recipe_yaml = text.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(recipe_yaml)["training"]["max_steps"] == 6  # the recipe as run, overrides applied


def test_card_base_model_metadata_is_a_hub_id_only():
    from hf_stackwise.report.card import _looks_like_hub_id

    assert _looks_like_hub_id("HuggingFaceTB/SmolLM2-135M")
    assert not _looks_like_hub_id(".cache/models/SmolLM2-135M-Instruct")
    assert not _looks_like_hub_id("/abs/path/model")


def test_card_table_shows_the_resolved_boundaries():
    """`until: 0.4` of a 3-step run ends at step round(1.2) = 1: the card says t 0.33, where the run switched."""
    from hf_stackwise.persist.checkpoint import run_identity
    from hf_stackwise.report.card import phase_table
    from hf_stackwise.schedule.phases import Schedule

    schedule = Schedule.from_list(
        [{"name": "top", "until": 0.4, "train": ["top"]}, {"name": "all", "until": 1.0, "train": "all"}]
    )
    rack = {"layers": "model.layers", "num_blocks": 4, "boundaries": [0, 2, 4]}
    run = run_identity(schedule.to_list(), rack, 3, {"learning_rate": 1e-3})
    table = phase_table(run, 3).splitlines()
    assert table[2] == "| top | 0–0 | 0.00–0.33 | 0–1 | stacks 1 | full (trunk frozen) | 1.0e-03 constant |"
    assert table[3].startswith("| all | 1–2 | 0.33–1.00 | 0–1 | stacks 0, 1, embeddings, head |")
    assert "0.40" not in phase_table(run, 3)
    assert "| top | – | 0.00–0.40 |" in phase_table(run, None)  # no run length known: the recipe's `until`
