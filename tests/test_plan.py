"""`hf-stackwise plan`: the phase table and the memory estimate, checked against what a real run of the same recipe
holds (weights, gradients and optimizer state exactly from the trainer's tensors, activations from the tensors
autograd saves for backward); the plan reads only the config, loads no weights and writes nothing.

Tolerances: weights, gradients and optimizer state within 5% (they are counted from the same shapes; the optimizer
also holds a 4-byte `step` per tensor; a 4-bit base adds the bitsandbytes quantization state); activations within
10% (the formula counts every per-token tensor a Llama block saves, and leaves out what is per sequence: the rotary
cos/sin tables; measured here within 0.5% in every phase, the margin is for other attention kernels).
"""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from conftest import ROOT, build_tokenizer, tiny_config
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback

from hf_stackwise.cli import pipeline as run
from hf_stackwise.cli.commands import main
from hf_stackwise.cli.plan import format_plan, make_plan
from hf_stackwise.recipe.loader import load_recipe

TOLERANCE = {"weights": 0.05, "gradients": 0.05, "optimizer": 0.05, "activations": 0.10}
SCHEDULE = [
    {"name": "top", "until": 0.25, "train": ["top"]},
    {"name": "mid-lora", "until": 0.5, "train": [2], "adapter": "lora", "trunk": "lora", "head": "train"},
    {"name": "shallow", "until": 0.75, "stacks": 2, "train": [1]},
    {"name": "all", "until": 1.0, "train": "all"},
]
GROW = [  # LLaMA Pro interleave, then a prepended copy with fresh optimizer state, then everything
    {"name": "base", "until": 0.25, "train": "all"},
    {"name": "pro", "until": 0.5, "grow": {"op": "identity", "stacks": 2, "at": "interleave"}, "train": "new"},
    {
        "name": "below",
        "until": 0.75,
        "grow": {"op": "copy", "stacks": 1, "at": "bottom"},
        "train": "new",
        "optimizer_state": "reset",
    },
    {"name": "all", "until": 1.0, "train": "all"},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama wide enough for activations to matter: 8 blocks, hidden 256, vocab 512."""
    folder = tmp_path_factory.mktemp("plan-llama")
    config = AutoConfig.for_model(
        "llama",
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return str(folder)


def write(tmp_path, model_dir, train_file, schedule=SCHEDULE, **training) -> str:
    raw = {
        "model": {"name_or_path": model_dir, "dtype": "float32"},
        "rack": {"blocks_per_stack": 2},
        **({"adapters": {"r": 8, "alpha": 16, "trunk_r": 2}} if schedule is SCHEDULE else {}),
        "data": {"train": {"path": "text", "data_files": train_file}, "max_seq_length": 64},
        "schedule": schedule,
        "training": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 4,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-3,
            "optim": "adamw_torch",
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
            **training,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


class Measure(TrainerCallback):
    """Per step: bytes of weights, gradients (before the optimizer step), optimizer state (after it) and of the
    tensors autograd saved for backward (each storage once, parameters and buffers excluded)."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        tensors = [*model.parameters(), *model.buffers()]
        owned = {t.untyped_storage().data_ptr() for t in tensors}
        weights = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        saved: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in owned:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
        self.hooks.__enter__()
        self.steps.append({"weights": sum(weights.values()), "saved": saved})

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.hooks.__exit__(None, None, None)
        step = self.steps[-1]
        step["activations"] = sum(step.pop("saved").values())
        step["gradients"] = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.steps[-1]["optimizer"] = sum(
            t.nbytes for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)
        )


@pytest.mark.parametrize("schedule", [SCHEDULE, GROW], ids=["adapters", "growth"])
def test_memory_estimate_matches_a_real_run(tmp_path, model_dir, pydoc_files, schedule):
    path = write(tmp_path, model_dir, pydoc_files[0], schedule)
    plan = make_plan(load_recipe(path))
    assert [(p.start, p.end) for p in plan.phases] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    prepared = run.prepare(load_recipe(path))
    trainer = run.build_trainer(prepared)
    measure = Measure()
    trainer.add_callback(measure)
    trainer.train()
    report = []
    for phase, measured in zip(plan.phases, measure.steps, strict=True):
        for key, tolerance in TOLERANCE.items():
            estimate = phase.memory[key]
            report.append(f"{phase.name} {key}: estimate {estimate:,.0f} measured {measured[key]:,.0f}")
            assert estimate == pytest.approx(measured[key], rel=tolerance), report[-1]
    print("\n".join(report))
    # trainable counts are exact
    counts = [p.trainable_params for p in plan.phases]
    assert counts[3] == sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" not in n)


def test_plan_prints_every_phase_and_loads_no_weights(tmp_path, model_dir, pydoc_files, capsys, monkeypatch):
    path = write(tmp_path, model_dir, pydoc_files[0])

    def refuse(*args, **kwargs):
        raise AssertionError("plan loaded weights")

    monkeypatch.setattr(run, "load_model", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    before = sorted(os.listdir(tmp_path))
    assert main(["plan", path]) == 0
    out = capsys.readouterr().out
    assert "4 stacks over 8 blocks (model.layers)" in out and "4 steps" in out
    for name in ("top", "mid-lora", "shallow", "all"):
        assert f"\n{name} " in out
    assert "stacks lora, trunk lora, +head" in out
    assert "peak" in out and "memory estimate in MiB, 1 MiB = 2^20 bytes (batch 4, one process)" in out
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no output_dir
    assert main(["plan", path, "--training.per_device_train_batch_size", "8", "--plot", str(tmp_path / "t.png")]) == 0
    assert "(batch 8, one process)" in capsys.readouterr().out
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_format_plan_of_a_shallow_phase(tmp_path, model_dir, pydoc_files):
    plan = make_plan(load_recipe(write(tmp_path, model_dir, pydoc_files[0])))
    shallow = plan.phases[2]
    assert shallow.active_depth == 2 and shallow.trainable_stacks == (1,)
    text = format_plan(plan)
    assert "shallow" in text and "0-1" in text


def test_plan_refuses_what_is_not_a_recipe(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "notes.txt").write_text("just some text\n")
    for target, expected in (
        (tmp_path / "run", "is not a file"),
        (tmp_path / "notes.txt", "expected a YAML mapping"),
    ):
        assert main(["plan", str(target)]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "run"]


def test_four_bit_weights_estimate(tmp_path, model_dir, pydoc_files):
    pytest.importorskip("bitsandbytes")
    path = write(tmp_path, model_dir, pydoc_files[0])
    raw = yaml.safe_load(open(path))
    raw["model"]["quantization"] = {"bits": 4, "quant_type": "nf4", "double_quant": True}
    raw["schedule"] = [
        {"name": "top", "until": 0.5, "train": ["top"], "trunk": "lora"},
        {"name": "lora", "until": 1.0, "train": [1], "adapter": "lora"},
    ]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    plan = make_plan(load_recipe(path))
    trainer = run.build_trainer(run.prepare(load_recipe(path)))
    seen, measured = set(), 0
    for tensor in [*trainer.model.parameters(), *trainer.model.buffers()]:
        state = getattr(tensor, "quant_state", None)
        extra = []
        while state is not None:
            extra += [getattr(state, k, None) for k in ("absmax", "code", "offset")]
            state = getattr(state, "state2", None)
        for t in [tensor, *(e for e in extra if isinstance(e, torch.Tensor))]:
            if t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                measured += t.untyped_storage().nbytes()
    assert plan.phases[0].memory["weights"] == pytest.approx(measured, rel=TOLERANCE["weights"])
    full = make_plan(load_recipe(path, ["--model.quantization", "null"])).phases[0].memory["weights"]
    assert plan.phases[0].memory["weights"] < 0.6 * full  # 6 of 8 blocks are 4-bit


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory, tokenizer):
    """A tiny Llama whose LM head shares the input embeddings (as SmolLM2's does); the embeddings are a large part
    of it, so counting the shared tensor twice would miss by far more than the tolerance."""
    folder = tmp_path_factory.mktemp("plan-tied")
    config = tiny_config("llama", layers=4)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_tied_weights_count_once(tmp_path, tied_dir, pydoc_files):
    schedule = [{"name": "top", "until": 0.5, "train": ["top"]}, {"name": "all", "until": 1.0, "train": "all"}]
    path = write(tmp_path, tied_dir, pydoc_files[0], schedule, max_steps=2)
    plan = make_plan(load_recipe(path))
    trainer = run.build_trainer(run.prepare(load_recipe(path)))
    model = trainer.model
    distinct = sum(p.numel() for p in model.parameters())  # each tensor once
    shared = model.lm_head.weight.nbytes
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert plan.total_params == plan.superset_params == plan.phases[1].trainable_params == distinct
    measure = Measure()
    trainer.add_callback(measure)
    trainer.train()
    top, everything = measure.steps
    for key in ("weights", "gradients", "optimizer"):
        print(f"tied all {key}: estimate {plan.phases[1].memory[key]:,.0f} measured {everything[key]:,.0f}")
        assert plan.phases[1].memory[key] == pytest.approx(everything[key], rel=TOLERANCE[key]), key
    assert plan.phases[1].memory["gradients"] == everything["gradients"]  # exact: the same shapes
    # the test can tell: the shared tensor counted twice would miss by more than the tolerance
    assert shared > TOLERANCE["gradients"] * everything["gradients"]
    assert 2 * shared > TOLERANCE["optimizer"] * everything["optimizer"]


def test_smollm2_ever_train_is_at_most_its_parameters():
    """SmolLM2 ties its LM head to the input embeddings: `train: all` trains 134.5M parameters, not 162.8M."""
    smollm2 = ROOT + "/.cache/models/SmolLM2-135M-Instruct"
    assert os.path.isfile(smollm2 + "/config.json"), "run `make assets` first"
    plan = make_plan(load_recipe(ROOT + "/recipes/smollm2-135m/unfreeze.yaml"))
    assert plan.total_params == 134_515_008  # SmolLM2-135M, embeddings once
    assert plan.superset_params == plan.phases[-1].trainable_params == plan.total_params
    memory = plan.phases[-1].memory
    assert memory["gradients"] == 4 * plan.total_params <= memory["weights"]  # float32, each tensor once
    assert memory["optimizer"] == 2 * memory["gradients"]  # AdamW: two float32 tensors per trained value


BAD = {  # override → what the refusal names; each is refused before any weight loads
    "seq": (["--data.max_seq_length", "100000"], "data.max_seq_length: 100000 exceeds the model's 256 positions"),
    "phase-seq": (["--schedule.1.max_seq_length", "4096"], "schedule[1].max_seq_length: 4096 exceeds"),
    "deepspeed": (["--training.deepspeed", "ds.json"], "training.deepspeed: the schedule changes which parameters"),
    "stack": (["--schedule.0.train", "[9]"], "schedule[0].train: stack [9] does not exist"),
    "optim": (["--training.optim", "galore_adamw"], None),  # refused alike once the optimizer check refuses it
}


@pytest.mark.parametrize("case", list(BAD))
def test_plan_and_validate_refuse_alike(tmp_path, model_dir, pydoc_files, capsys, case):
    """`plan` runs the checks `validate` and `train` run (one function, `run.check_recipe`): what one refuses, the
    other refuses with the same message; a `max_seq_length` beyond the model's positions is no 382 GiB plan."""
    path = write(tmp_path, model_dir, pydoc_files[0])
    overrides, expected = BAD[case]
    results = {}
    for command in ("plan", "validate"):
        code = main([command, path, *overrides])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hf-stackwise: error")]
        results[command] = (code, err)
    assert results["plan"] == results["validate"]
    if expected is not None:
        code, err = results["plan"]
        assert code == 2 and len(err) == 1 and expected in err[0], err


def test_tensor_names_follow_declared_ties_on_an_untied_skeleton():
    """Where a skeleton has not tied the head to the embeddings yet, the model's tie declarations still count the
    shared tensor once."""
    from torch import nn

    from hf_stackwise.cli.plan import tensor_names

    config = tiny_config("llama", layers=4)
    config.tie_word_embeddings = True
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        model.lm_head.weight = nn.Parameter(torch.empty_like(model.lm_head.weight))  # untied
    names = tensor_names(model)
    assert names["lm_head.weight"] == "model.embed_tokens.weight"
    assert names["model.layers.0.self_attn.q_proj.weight"] == "model.layers.0.self_attn.q_proj.weight"
    config.tie_word_embeddings = False
    with torch.device("meta"):
        untied = AutoModelForCausalLM.from_config(config)
    assert tensor_names(untied)["lm_head.weight"] == "lm_head.weight"
