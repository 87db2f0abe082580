"""Every folder a run writes either loads in plain transformers as the trained function or does not load as a model
at all. The trained function is observed, not recomputed by the saving code's own helpers: forward hooks record
which physical blocks the last training step ran, in which order, and a hand-written golden order per schedule
says what that order must be; the saved layers must hold exactly those blocks' weights, in that order. Cases: the
final output_dir after growth at the bottom, interleaved identity growth and a shallow final phase; the merged model
of a QLoRA run; every checkpoint. Plus nested arrangements and a package whose imports have no cycle."""

from __future__ import annotations

import copy
import os
import re

import pytest
import torch
from conftest import tiny_causal_lm, tiny_config, tiny_recipe, write_recipe
from transformers import AutoModelForCausalLM, TrainerCallback

from hf_stackwise.cli import pipeline as run
from hf_stackwise.cli.commands import main
from hf_stackwise.export.folder import load_merged, select_blocks
from hf_stackwise.persist.checkpoint import read_json
from hf_stackwise.rack.rack import Rack, arranged

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11, 64, 128, 200, 31]])
BASE = {"name": "base", "until": 0.5, "train": "all"}
SCHEDULES = {
    "copy-bottom": [
        BASE,
        {"name": "below", "until": 1.0, "grow": {"op": "copy", "stacks": 1, "at": "bottom"}, "train": "new"},
    ],
    "identity-interleave": [
        BASE,
        {"name": "expand", "until": 1.0, "grow": {"op": "identity", "stacks": 2, "at": "interleave"}, "train": "new"},
    ],
    "shallow-final": [BASE, {"name": "shallow", "until": 1.0, "stacks": 2, "train": "all"}],
}
QLORA = [
    {"name": "top-full", "until": 0.5, "train": ["top"], "trunk": "lora"},
    {"name": "s2-lora", "until": 1.0, "train": [2], "adapter": "lora", "trunk": "lora"},
]


# Physical blocks (0-3 the loaded ones, 4+ those the schedule grows, in growth order) the last step runs, bottom →
# top, worked out by hand from the schedule: a copy of stack 0 grown below it; two identity stacks interleaved
# (one after each of stacks 1 and 3: LLaMA Pro's spacing of 2 new among 4); the first two stacks only.
GOLDEN_ORDER = {
    "copy-bottom": [4, 0, 1, 2, 3],
    "identity-interleave": [0, 1, 4, 2, 3, 5],
    "shallow-final": [0, 1],
}


class RecordBlockOrder(TrainerCallback):
    """Forward hooks on every physical block: the indices, in call order, of the blocks the last step ran."""

    def __init__(self, blocks):
        self.physical, self.calls, self.last_step = list(blocks), [], []
        index = {id(b): i for i, b in enumerate(self.physical)}
        for block in self.physical:
            block.register_forward_hook(lambda module, args, out: self.calls.append(index[id(module)]))

    def on_step_begin(self, args, state, control, **kwargs):
        self.calls = []

    def on_step_end(self, args, state, control, **kwargs):
        self.last_step = self.calls


def train_with_cli(tmp_path, raw, monkeypatch, capsys):
    """`hf-stackwise train` on ``raw``; returns the trainer it built (with a ``RecordBlockOrder`` as ``.recorded``)
    and the folder its last line names."""
    built = []
    build = run.build_trainer

    def build_and_record(prepared, model=None):
        trainer = build(prepared, model)
        trainer.recorded = RecordBlockOrder(trainer.rack.blocks)  # physical; grown blocks are allocated at init
        trainer.add_callback(trainer.recorded)
        built.append(trainer)
        return trainer

    monkeypatch.setattr(run, "build_trainer", build_and_record)
    assert main(["train", write_recipe(tmp_path, raw)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    match = re.fullmatch(
        r'hf-stackwise: trained 4 steps; load the model with AutoModelForCausalLM\.from_pretrained\("(.+)"\)', last
    )
    assert match, last
    return built[0], match.group(1)


def assert_holds_blocks(model, physical, order):
    """The model's layers are the given physical blocks, in order: every tensor bitwise equal."""
    assert len(model.model.layers) == len(order)
    for layer, (position, block) in enumerate(zip(order, model.model.layers, strict=True)):
        trained, saved = physical[position].state_dict(), block.state_dict()
        assert saved.keys() == trained.keys()
        assert all(torch.equal(saved[k], trained[k]) for k in saved), f"saved layer {layer} is not block {position}"


def logits(model, ids=IDS):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def arranged_logits(trainer):
    with torch.no_grad(), trainer.arranged():
        return trainer.model.eval()(input_ids=IDS).logits


def check_checkpoints(run_dir, tmp_path):
    """Each checkpoint loads as its phase's model (same logits as its export) or raises in `from_pretrained`."""
    outcomes = {}
    for name in sorted(n for n in os.listdir(run_dir) if n.startswith("checkpoint-")):
        folder = run_dir / name
        assert main(["export", str(folder), str(tmp_path / f"export-{name}")]) == 0
        exported = logits(AutoModelForCausalLM.from_pretrained(tmp_path / f"export-{name}"))
        try:
            plain = AutoModelForCausalLM.from_pretrained(folder)
        except OSError as err:
            assert "no file named model.safetensors" in str(err)
            outcomes[name] = "raises"
            continue
        assert read_json(folder / "stackwise_state.json")["phase"]["blocks"] == list(
            range(plain.config.num_hidden_layers)
        )
        torch.testing.assert_close(logits(plain), exported, rtol=0, atol=0)
        outcomes[name] = "loads"
    return outcomes


@pytest.mark.parametrize("case", list(SCHEDULES))
def test_the_output_dir_is_the_trained_function(tmp_path, tiny_llama_dir, pydoc_files, monkeypatch, capsys, case):
    raw = tiny_recipe(
        tmp_path, tiny_llama_dir, pydoc_files[0], SCHEDULES[case], save_strategy="steps", save_steps=1, logging_steps=1
    )
    trainer, folder = train_with_cli(tmp_path, raw, monkeypatch, capsys)
    assert folder == str(tmp_path / "run")
    model = AutoModelForCausalLM.from_pretrained(folder)
    depth = {"copy-bottom": 5, "identity-interleave": 6, "shallow-final": 2}[case]
    assert model.config.num_hidden_layers == len(model.model.layers) == depth
    assert not hasattr(model.config, "stackwise_base_layers")
    assert trainer.recorded.last_step == GOLDEN_ORDER[case]  # the trained function, observed
    assert_holds_blocks(model, trainer.recorded.physical, GOLDEN_ORDER[case])  # ...is what was saved
    assert (logits(model) - arranged_logits(trainer)).abs().max() <= 1e-5
    # the run stays exportable (same function) and plottable
    assert main(["export", folder, str(tmp_path / "exported")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    assert_holds_blocks(exported, trainer.recorded.physical, GOLDEN_ORDER[case])
    torch.testing.assert_close(logits(exported), logits(model))
    assert main(["plot", folder, "--out", str(tmp_path / "plots")]) == 0
    # checkpoints: the full-depth phase of an ungrown rack is a normal checkpoint; every other one does not load
    outcomes = check_checkpoints(tmp_path / "run", tmp_path)
    grows = case != "shallow-final"
    assert outcomes == {
        "checkpoint-1": "raises" if grows else "loads",
        "checkpoint-2": "raises" if grows else "loads",
        "checkpoint-3": "raises",
        "checkpoint-4": "raises",
    }
    last = AutoModelForCausalLM.from_pretrained(tmp_path / "export-checkpoint-4")  # the final weights, exported
    assert_holds_blocks(last, trainer.recorded.physical, GOLDEN_ORDER[case])


def test_resume_from_an_unarranged_checkpoint_is_bitwise(tmp_path, tiny_llama_dir, pydoc_files, monkeypatch, capsys):
    raw = tiny_recipe(
        tmp_path, tiny_llama_dir, pydoc_files[0], SCHEDULES["copy-bottom"], save_strategy="steps", save_steps=1
    )
    trainer, _ = train_with_cli(tmp_path, raw, monkeypatch, capsys)
    final = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    raw["training"].update(
        output_dir=str(tmp_path / "resumed"), resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3")
    )
    again, _ = train_with_cli(tmp_path, raw, monkeypatch, capsys)
    assert all(torch.equal(p, final[n]) for n, p in again.model.named_parameters())


@pytest.mark.slow
def test_a_qlora_run_ends_in_its_merged_model(tmp_path, tiny_llama_dir, pydoc_files, monkeypatch, capsys):
    raw = tiny_recipe(
        tmp_path,
        tiny_llama_dir,
        pydoc_files[0],
        QLORA,
        {"r": 4, "alpha": 8, "trunk_r": 2},
        save_strategy="steps",
        save_steps=2,
    )
    raw["model"]["quantization"] = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    trainer, folder = train_with_cli(tmp_path, raw, monkeypatch, capsys)
    model = AutoModelForCausalLM.from_pretrained(folder)
    got = logits(model)
    # as export merges it: the base dequantized, every adapter merged in full precision
    merged = load_merged(folder, read_json(tmp_path / "run" / "stackwise_state.json"))
    print("qlora: merged vs export-style merge", (got - logits(merged)).abs().max().item())
    assert (got - logits(merged)).abs().max() <= 1e-5
    # and the trained 4-bit + LoRA model itself (measured: max |diff| ~5e-7, fp32 compute)
    print("qlora: merged vs trained 4-bit", (got - arranged_logits(trainer)).abs().max().item())
    assert (got - arranged_logits(trainer)).abs().max() <= 1e-5
    # no folder of the run holds a PEFT adapter (PEFT would load one adapter of several: a different model)
    assert not list((tmp_path / "run").rglob("adapter_config.json"))
    for name in ("checkpoint-2", "checkpoint-4"):  # no config.json, no weights file: transformers raises
        with pytest.raises((OSError, ValueError)):
            AutoModelForCausalLM.from_pretrained(tmp_path / "run" / name)
    assert main(["export", folder, str(tmp_path / "exported")]) == 0
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(tmp_path / "exported")), got, rtol=0, atol=0
    )


def test_save_merged_false_leaves_no_model(tmp_path, tiny_llama_dir, pydoc_files, capsys):
    schedule = [{"name": "lora", "until": 1.0, "train": ["top"], "adapter": "lora"}]
    raw = tiny_recipe(tmp_path, tiny_llama_dir, pydoc_files[0], schedule, {"r": 4}, save_merged=False)
    # a model file an earlier run left in the folder must not pass for this run's model
    (tmp_path / "run").mkdir()
    tiny_causal_lm("llama").save_pretrained(tmp_path / "run")
    (tmp_path / "run" / "stackwise_run.json").write_text("{}")
    raw["training"]["overwrite_output_dir"] = True
    assert main(["train", write_recipe(tmp_path, raw)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "training.save_merged: false" in last and f"hf-stackwise export {tmp_path / 'run'} OUT" in last
    assert not (tmp_path / "run" / "config.json").exists() and not (tmp_path / "run" / "model.safetensors").exists()
    with pytest.raises((OSError, ValueError)):
        AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").config.num_hidden_layers == 4


def test_save_merged_is_a_checked_training_key(tmp_path, tiny_llama_dir, pydoc_files):
    from hf_stackwise.recipe.loader import load_recipe
    from hf_stackwise.schedule.phases import RecipeError

    raw = tiny_recipe(tmp_path, tiny_llama_dir, pydoc_files[0], [BASE | {"until": 1.0}], save_merged="no")
    with pytest.raises(RecipeError, match=r"training.save_merged: 'no' is not of type bool"):
        run.prepare(load_recipe(write_recipe(tmp_path, raw)))


def state(model):
    layers = model.model.layers
    return (
        [id(b) for b in layers],
        [b.self_attn.layer_idx for b in model.model._modules["layers"]],
        model.config.num_hidden_layers,
        list(model.config.layer_types),
    )


def test_arrangements_nest_and_restore(tmp_path):
    config = tiny_config("qwen2", layers=4)
    config.use_sliding_window, config.sliding_window = True, 4
    config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    physical = list(model.model.layers)
    orders = [[3, 0, 1], [2, 0, 1, 3], [1]]

    def reference(order):  # a plain model folder holding exactly these blocks, loaded back
        plain = AutoModelForCausalLM.from_config(copy.deepcopy(config))
        plain.load_state_dict(model.state_dict())
        select_blocks(plain, "model.layers", order)
        folder = tmp_path / "-".join(map(str, order))
        plain.save_pretrained(folder)
        return logits(AutoModelForCausalLM.from_pretrained(folder), IDS[:, :8])

    states = [state(model)]
    expected = [reference(o) for o in orders]
    with arranged(model, "model.layers", orders[0]):
        states.append(state(model))
        with arranged(model, "model.layers", orders[1]):
            states.append(state(model))
            with arranged(model, "model.layers", orders[2]):
                assert [b.self_attn.layer_idx for b in model.model.layers] == [0]
                assert model.config.layer_types == ["sliding_attention"] and model.config.num_hidden_layers == 1
                torch.testing.assert_close(logits(model, IDS[:, :8]), expected[2], rtol=0, atol=0)
            assert state(model) == states[2]
            torch.testing.assert_close(logits(model, IDS[:, :8]), expected[1], rtol=0, atol=0)
            with Rack.from_model(model).active_depth(4):  # the identity, nested: the physical rack again
                assert list(model.model.layers) == physical and model.config.num_hidden_layers == 4
            assert state(model) == states[2]
        assert state(model) == states[1]
        assert model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
        torch.testing.assert_close(logits(model, IDS[:, :8]), expected[0], rtol=0, atol=0)
    assert state(model) == states[0] and list(model.model.layers) == physical
    assert "layers" not in model.model.__dict__


def test_evaluate_inside_arranged(tmp_path, token_dataset):
    from hf_stackwise.trainer import StackwiseArguments, StackwiseTrainer

    args = StackwiseArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        schedule=[BASE, {"name": "grow", "until": 1.0, "grow": {"op": "copy", "stacks": 1, "at": "bottom"}}],
    )
    small = token_dataset.select(range(8))
    trainer = StackwiseTrainer(model=tiny_causal_lm("llama"), args=args, train_dataset=small, eval_dataset=small)
    trainer.train()
    alone = trainer.evaluate()["eval_loss"]
    with trainer.arranged():
        assert trainer.evaluate()["eval_loss"] == alone
        assert len(trainer.model.model.layers) == 5
    assert "layers" not in trainer.model.model.__dict__ and trainer.model.config.num_hidden_layers == 5
