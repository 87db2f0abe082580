"""`data.task: dpo` from a recipe: the shipped recipes run (on a tiny 30-block Llama) and export a plain model
folder of the policy; `plan` shows the reference's memory per phase for each way; bad input is refused with one
message naming the key, before any weight loads and before the output directory is touched."""

from __future__ import annotations

import json
import pathlib

import pytest
from conftest import brief_run_args, write_recipe

pytest.importorskip("trl")

from transformers import AutoModelForCausalLM  # noqa: E402

from hf_stackwise.cli import pipeline as run  # noqa: E402
from hf_stackwise.cli.commands import main  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    from demo_assets import preference_pairs

    rows = [{k: v[:120] for k, v in r.items()} for r in preference_pairs()[:40]]
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", rows)


def dpo_recipe(tmp_path, model_dir: str, train_file: str, **training) -> dict:
    return {
        "model": {"name_or_path": model_dir, "dtype": "float32"},
        "rack": {"blocks_per_stack": 1},
        "data": {"task": "dpo", "train": {"path": "json", "data_files": train_file}, "max_seq_length": 64},
        "schedule": [
            {"name": "top", "until": 0.5, "train": ["top"]},
            {"name": "upper", "until": 1.0, "train": [2, 3]},
        ],
        "training": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 4,
            "per_device_train_batch_size": 2,
            "learning_rate": 1e-3,
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
            "reference": "shared",
            **training,
        },
    }


@pytest.mark.parametrize("name", ["dpo_top", "dpo_unfreeze"])
def test_shipped_dpo_recipes_run_briefly_and_export_the_policy(tmp_path, tiny_30_block_dir, name, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipes name their data relative to the project root (made by `make assets`)
    argv = brief_run_args(
        f"recipes/smollm2-135m/{name}.yaml", tiny_30_block_dir, tmp_path, "--training.logging_steps", "1"
    )
    assert main(argv) == 0
    assert "trained 4 steps" in capsys.readouterr().out
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run")  # the run folder is the plain policy
    assert exported.config.num_hidden_layers == 30
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    logged = [h for h in history if "loss" in h]
    assert logged and all("rewards/margins" in h and "phase" in h for h in logged)


def test_plan_shows_the_reference_memory_of_each_way(tiny_30_block_dir, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = "recipes/smollm2-135m/dpo_unfreeze.yaml"
    assert main(["plan", path, "--model.name_or_path", tiny_30_block_dir]) == 0
    out = capsys.readouterr().out
    rows = out[out.index("DPO reference") :].splitlines()[2:]
    assert [r.split()[0] for r in rows] == ["top", "upper-half", "most"]
    copy, precompute, shared = (float(x) for x in rows[0].split()[1:4])
    assert precompute == 0.0 and 0 < shared < copy
    assert "blocks 24-29" in rows[0] and "blocks 18-29" in rows[1] and "blocks 6-29" in rows[2]  # the cut deepens


def bad_cases(tmp_path, pair_file, tiny_llama_dir):
    def data(name, rows):
        return {"data": {"train": {"path": "json", "data_files": write_jsonl(tmp_path / f"{name}.jsonl", rows)}}}

    pair = {"prompt": "What does `len` do?", "chosen": "Return the number of items.", "rejected": "It sorts."}
    quantized = {"model": {"quantization": {"bits": 4}}, "schedule": [{"until": 1.0, "train": [3], "adapter": "lora"}]}
    return [
        (data("nochosen", [{"prompt": "q", "rejected": "r"}]), "data.train: no `chosen` column"),
        (data("norejected", [{"prompt": "q", "chosen": "c"}]), "data.train: no `rejected` column"),
        (data("empty", [pair, {**pair, "prompt": "  "}]), "data.train row 1: prompt: empty"),
        (data("same", [{**pair, "rejected": pair["chosen"]}]), "data.train row 0: chosen == rejected"),
        (
            {"schedule": [{"until": 0.5, "train": ["top"]}, {"until": 1.0, "train": [0, 1, 2, 3]}]},
            "training.reference: `shared` reuses the policy's hidden state",
        ),
        ({**quantized, "training": {"reference": "copy"}}, "training.reference: `copy` of a 4-bit base"),
        ({"training": {"max_length": 32}}, "training.max_length: set by the recipe; use `data.max_seq_length`"),
        ({"training": {"reference": "mirror"}}, "training.reference: 'mirror' is not one of"),
        ({"training": {"beta": -0.1}}, "training.beta: -0.1 is not a positive number"),
        (  # the cache serves DPO (tests/test_dpo_cache.py) where it is exact; its hazard checks apply as elsewhere
            {"cache": {"activations": True}, "training": {"neftune_noise_alpha": 5.0}},
            "training.neftune_noise_alpha: the noise changes the embeddings on every step",
        ),
        ({"schedule": [{"until": 1.0, "train": [3], "max_seq_length": 32}]}, "schedule[0].max_seq_length: TRL cuts"),
    ]


def test_bad_dpo_input_is_refused_before_weights_load(tmp_path, tiny_llama_dir, pair_file, capsys, monkeypatch):
    monkeypatch.setattr(run, "load_model", lambda prepared: pytest.fail("weights loaded"))
    for index, (change, expected) in enumerate(bad_cases(tmp_path, pair_file, tiny_llama_dir)):
        raw = dpo_recipe(tmp_path, tiny_llama_dir, pair_file)
        raw["training"]["output_dir"] = str(tmp_path / f"run{index}")
        for section, values in change.items():
            if section == "schedule":
                raw["schedule"] = values
            else:
                raw.setdefault(section, {}).update(values)
        assert main(["train", write_recipe(tmp_path, raw)]) == 2, expected
        err = capsys.readouterr().err
        message = err[err.index("hf-stackwise: error: ") :]  # (after datasets' progress bars)
        assert expected in message and "Traceback" not in err, err
        assert not (tmp_path / f"run{index}").exists()


def test_early_stopping_on_the_held_out_reward_accuracy_is_accepted(tmp_path, tiny_llama_dir, pair_file):
    from hf_stackwise.recipe.loader import validate_recipe

    raw = dpo_recipe(tmp_path, tiny_llama_dir, pair_file, eval_strategy="steps", eval_steps=2, save_strategy="steps")
    raw["data"]["eval_fraction"] = 0.2
    raw["callbacks"] = {"early_stopping": {"patience": 2, "metric": "rewards/accuracies"}}
    args = run.build_arguments(validate_recipe(raw))
    assert (args.metric_for_best_model, args.greater_is_better) == ("rewards/accuracies", True)
    raw["callbacks"]["early_stopping"]["metric"] = "perplexity"
    with pytest.raises(run.RecipeError, match="not an eval metric of a `dpo` run"):
        validate_recipe(raw)
