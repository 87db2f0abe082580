"""Recipe validation (static and against the model's config and data), overrides, and every shipped recipe."""

from __future__ import annotations

import copy
import pathlib

import pytest
import yaml

from hf_stackwise.cli import pipeline as run
from hf_stackwise.recipe.loader import apply_overrides, load_recipe, parse_overrides, validate_recipe
from hf_stackwise.schedule.phases import RecipeError

ROOT = pathlib.Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = ROOT / "recipes" / "accelerate"  # launch configs, tested below; every other YAML is a recipe
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if ACCELERATE_CONFIGS not in p.parents)


def base_recipe(model_dir="some/model", train_file="train.txt"):
    return {
        "model": {"name_or_path": model_dir, "dtype": "float32"},
        "rack": {"blocks_per_stack": 1},
        "data": {"train": {"path": "text", "data_files": train_file}, "max_seq_length": 32},
        "schedule": [
            {"name": "top", "until": 0.5, "train": ["top"]},
            {"name": "all", "until": 1.0, "train": "all"},
        ],
        "training": {"output_dir": "out", "max_steps": 4, "use_cpu": True, "report_to": "none"},
    }


def errors_of(raw) -> list[str]:
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw)
    return info.value.problems


def with_change(path: str, value):
    raw = base_recipe()
    return apply_overrides(raw, [(path, value)])


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("schedule.1.until", 0.9, "schedule[1].until: 0.9 but the last phase must end at 1.0"),
        ("schedule.1.until", 0.5, "schedule[1].until: 0.5 does not come after the previous phase's end"),
        ("schedule.0.until", 1.3, "schedule[0].until: 1.3 is not in (0, 1]"),
        ("schedule.0.until", "half", "schedule[0].until: 'half' is not a number"),
        ("schedule.0.trian", [1], "schedule[0].trian: unknown phase field"),
        ("schedule.0.train", "bottom", "schedule[0].train: 'bottom' is not a list of stack indices"),
        ("schedule.0.learning_rate", "fast", "schedule[0].learning_rate: 'fast' is not a non-negative number"),
        ("schedule.0.stacks", 0, "schedule[0].stacks: 0 is not a positive integer"),
        ("schedule.0.warmup", 1.5, "schedule[0].warmup: 1.5 is not a fraction"),
        ("schedule.0.lr_schedule", "steps", "schedule[0].lr_schedule: 'steps' is not one of"),
        ("schedule.0.head", "yes", "schedule[0].head: 'yes' is not one of"),
        ("model.dtype", "float8", "model.dtype: 'float8' is not one of"),
        ("model.quantisation", {"bits": 4}, "model.quantisation: unknown key"),
        ("rack.blocks_per_stack", -2, "rack.blocks_per_stack: -2 is not a positive integer"),
        ("rack.size", 3, "rack.size: unknown key"),
        ("data.eval_fraction", 2, "data.eval_fraction: 2 is not a fraction in [0, 1)"),
        ("data.max_seq_length", "long", "data.max_seq_length: 'long' is not a positive integer"),
        ("data.task", "seq2seq", "data.task: 'seq2seq' is not one of"),
        ("data.train", "corpus.txt", "data.train: expected `datasets.load_dataset` arguments"),
        ("training.lr_scheduler_type", "cosine", "training.lr_scheduler_type: set by the schedule; use `lr_schedule`"),
        ("training.warmup_ratio", 0.1, "training.warmup_ratio: set by the schedule; use `warmup`"),
        ("extras", {}, "extras: unknown section"),
    ],
)
def test_static_errors_name_the_key(path, value, expected):
    problems = errors_of(with_change(path, value))
    assert any(expected in p for p in problems), problems


def test_all_problems_are_reported_together():
    raw = base_recipe()
    raw["schedule"][0]["until"] = 1.3
    raw["data"]["eval_fraction"] = -1
    raw["model"]["dtype"] = "int3"
    del raw["training"]["output_dir"]
    problems = errors_of(raw)
    assert len(problems) >= 4
    assert any(p.startswith("training.output_dir: missing") for p in problems)


def test_missing_sections():
    problems = errors_of({"model": {"name_or_path": "x"}})
    assert {"data: missing section", "schedule: missing section", "training: missing section"} <= set(problems)


def test_overrides_are_typed_and_dotted():
    pairs = parse_overrides(["--training.max_steps", "12", "--schedule.0.until=0.25", "--schedule.0.train", "[1, 2]"])
    assert pairs == [("training.max_steps", 12), ("schedule.0.until", 0.25), ("schedule.0.train", [1, 2])]
    raw = base_recipe()
    changed = apply_overrides(raw, pairs)
    assert changed["training"]["max_steps"] == 12 and changed["schedule"][0]["train"] == [1, 2]
    assert raw == base_recipe()  # the original is untouched
    with pytest.raises(RecipeError, match="schedule.5 is not an index"):
        apply_overrides(raw, [("schedule.5.until", 1.0)])
    with pytest.raises(RecipeError, match="expected `--section.key value`"):
        parse_overrides(["training.max_steps", "3"])


def test_exponent_floats_are_numbers_in_files_and_overrides(tmp_path):
    """`1e-5` is a float (YAML 1.2, as TrainingArguments users write it), not the string YAML 1.1 makes of it."""
    text = yaml.safe_dump(base_recipe()).replace("until: 0.5", "until: 0.5\n  learning_rate: 1e-5")
    assert "learning_rate: 1e-5" in text
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    recipe = load_recipe(str(path), ["--training.learning_rate", "3E-4", "--schedule.1.learning_rate=2e-6"])
    assert recipe.schedule.phases[0].learning_rate == 1e-5
    assert recipe.schedule.phases[1].learning_rate == 2e-6
    assert recipe.training["learning_rate"] == 3e-4
    assert parse_overrides(["--a.b", "1e5x", "--a.c", "7"]) == [("a.b", "1e5x"), ("a.c", 7)]


def write(tmp_path, raw) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture
def good(tmp_path, tiny_llama_dir, pydoc_files):
    raw = base_recipe(tiny_llama_dir, pydoc_files[0])
    raw["training"]["output_dir"] = str(tmp_path / "out")
    return raw


def prepare_error(tmp_path, raw, monkeypatch) -> str:
    """Run every pre-compute check; the model's weights must never be loaded."""

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before validation finished")

    monkeypatch.setattr(run, "load_model", no_weights)
    with pytest.raises(RecipeError) as info:
        run.prepare(load_recipe(write(tmp_path, raw)))
    return str(info.value)


def test_config_level_errors_before_weights(tmp_path, good, monkeypatch):
    cases = [
        (("schedule.0.train", [7]), "schedule[0].train: stack [7] does not exist; the rack has 4 stacks"),
        (("schedule.0.stacks", 5), "schedule[0].stacks: 5 but the rack has only 4 stacks"),
        (("rack.blocks_per_stack", 3), "rack.blocks_per_stack: 3 does not divide the model's 4 blocks"),
        (("rack.layers", "model.norm"), "rack.layers: 'model.norm' does not name a torch.nn.ModuleList"),
        (("data.max_seq_length", 4096), "data.max_seq_length: 4096 exceeds the model's 256 positions"),
        (("data.text_column", "body"), "data.text_column: 'body' is not a column of data.train"),
        (("model.name_or_path", str(tmp_path / "nowhere")), "model.name_or_path: "),
        (("training.max_steps", 1), "schedule[0].until: phase 'top' gets no optimizer step at 1 total steps"),
        (("training.num_train_epochs", "many"), "training.num_train_epochs: 'many' is not of type float"),
        (("training.optimiser", "sgd"), "training.optimiser: not a TrainingArguments field"),
    ]
    for (path, value), expected in cases:
        message = prepare_error(tmp_path, apply_overrides(good, [(path, value)]), monkeypatch)
        assert expected in message, (path, message)
    assert not (tmp_path / "out").exists()


def test_growth_errors_before_weights(tmp_path, good, monkeypatch):
    def grow(**fields):
        raw = copy.deepcopy(good)
        raw["schedule"][-1] = {"name": "grow", "until": 1.0, "train": "new", **fields}
        return raw

    cases = [
        (grow(grow={"op": "copy", "at": [7]}), "schedule[1].grow.at: position [7] is outside this phase's rack of 4"),
        (grow(grow={"op": "copy", "stacks": 5}), "schedule[1].grow.stacks: 5 copies, but the rack has 4 stacks"),
        (grow(), "schedule[1].train: `new` names the stacks this phase grows, but it has no `grow`"),
        (grow(grow={"op": "identity", "stacks": 1}, **{"train": [9]}), "schedule[1].train: stack [9] does not exist"),
    ]
    for raw, expected in cases:
        message = prepare_error(tmp_path, raw, monkeypatch)
        assert expected in message, message
    raw = grow(grow={"op": "identity", "stacks": 1})
    raw["rack"] = {"layers": "model.layers"}
    monkeypatch.setattr("hf_stackwise.rack.growth.MLP_OUTPUTS", ("mlp.fc_out",))  # as if the architecture were unknown
    assert (
        "schedule[1].grow.op: `identity` zeroes each new block's output projections, but LlamaDecoderLayer has no "
        "an MLP down projection" in prepare_error(tmp_path, raw, monkeypatch)
    )
    assert not (tmp_path / "out").exists()


def test_train_naming_an_inactive_stack(tmp_path, good, monkeypatch):
    raw = copy.deepcopy(good)
    raw["schedule"][0] = {"name": "shallow", "until": 0.5, "stacks": 2, "train": [3]}
    message = prepare_error(tmp_path, raw, monkeypatch)
    assert "schedule[0].train: stack [3] is not active in this phase (`stacks: 2`" in message


def test_epochs_over_streamed_data_need_max_steps(tmp_path, good, monkeypatch):
    raw = copy.deepcopy(good)
    raw["data"]["train"]["streaming"] = True
    del raw["training"]["max_steps"]
    message = prepare_error(tmp_path, raw, monkeypatch)
    assert "training.max_steps: the training data is streamed" in message


def test_epochs_resolve_to_steps(tmp_path, good):
    raw = copy.deepcopy(good)
    del raw["training"]["max_steps"]
    raw["training"].update(num_train_epochs=2, per_device_train_batch_size=64)
    prepared = run.prepare(load_recipe(write(tmp_path, raw)))
    per_epoch = -(-len(prepared.train_dataset) // 64)
    assert prepared.total_steps == 2 * per_epoch


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_every_shipped_recipe_is_valid(path, monkeypatch):
    """Parsed, validated statically and against the real model config and data (assets: `make assets`)."""
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(str(path))
    assert recipe.schedule.phases[-1].until == 1.0
    assert path.read_text().startswith("#"), "each recipe starts with a comment saying how to run it"
    model = ROOT / recipe.model["name_or_path"]
    assert model.exists(), f"{model} missing: run `make assets` (scripts/demo_assets.py) first"
    monkeypatch.setattr(run, "check_output_dir", lambda *a, **k: None)  # a previous demo run may exist
    prepared = run.prepare(recipe)
    recipe.schedule.resolve(prepared.total_steps)


def test_recipes_are_found():
    assert any(p.name == "demo.yaml" for p in RECIPES)


@pytest.mark.parametrize("env, value", [("ACCELERATE_USE_FSDP", "true"), ("ACCELERATE_USE_DEEPSPEED", "true")])
def test_sharded_launches_are_refused_before_weights(tmp_path, good, monkeypatch, env, value):
    """An accelerate config asking for DeepSpeed or FSDP1 (accelerate's default FSDP version) is refused with the
    reason; FSDP2 is what runs (tests/test_fsdp.py)."""
    monkeypatch.setenv(env, value)
    message = prepare_error(tmp_path, good, monkeypatch)
    assert "the schedule changes which parameters train" in message and "1.4e-2 off" in message
    assert "multi_gpu_ddp.yaml" in message and "fsdp2.yaml" in message
    single = copy.deepcopy(good)
    single["schedule"] = [{"name": "all", "until": 1.0, "train": "all"}]
    message = prepare_error(tmp_path, single, monkeypatch)
    assert "the trainable set never changes here" in message and "not verified" in message


def test_accelerate_configs_are_valid_launch_configs():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = sorted(ACCELERATE_CONFIGS.glob("*.yaml"))
    assert [c.name for c in configs] == ["fsdp2.yaml", "multi_gpu_ddp.yaml", "single_gpu_bf16.yaml"]
    for path in configs:
        assert path.read_text().startswith("# "), "each config says how to launch with it"
        config = load_config_from_file(str(path))
        assert config.distributed_type in ("NO", "MULTI_GPU", "FSDP") and config.mixed_precision == "bf16"
        if config.distributed_type == "FSDP":  # what hf_stackwise accepts: FSDP2 with full state dicts
            assert config.fsdp_config["fsdp_version"] == 2
            assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
