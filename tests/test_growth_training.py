"""Growth inside one StackwiseTrainer run: the superset rule (parameters, optimizer and their identities never
change), exactness at the growth step, fresh and reset optimizer state, bitwise resume after a growth, and an
export that plain transformers loads with the grown depth."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import brief_run_args, logits_in_clean_process, tiny_causal_lm

from hf_stackwise.cli.commands import main
from hf_stackwise.trainer import StackwiseArguments, StackwiseTrainer

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11, 64, 128, 200, 31]])
LLAMA_PRO = [  # train the base briefly, then LLaMA Pro: identity blocks interleaved, only they train
    {"name": "base", "until": 0.5, "train": "all"},
    {"name": "expand", "until": 1.0, "grow": {"op": "identity", "stacks": 2, "at": "interleave"}, "train": "new"},
]
PREPEND = [  # right-to-left: copy the bottom stack below everything, train it through the frozen suffix
    {"name": "base", "until": 0.25, "train": "all"},
    {
        "name": "below",
        "until": 0.625,
        "grow": {"op": "copy", "stacks": 1, "at": "bottom"},
        "train": "new",
        "warmup": 0.5,
    },
    {"name": "all", "until": 1.0, "grow": {"op": "random", "stacks": 1}, "train": "all", "optimizer_state": "reset"},
]


def make_trainer(out, dataset, schedule, family="llama", **overrides):
    kwargs = dict(
        output_dir=str(out),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        weight_decay=0.01,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        schedule=schedule,
    )
    kwargs.update(overrides)
    return StackwiseTrainer(model=tiny_causal_lm(family), args=StackwiseArguments(**kwargs), train_dataset=dataset)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_identity_growth_in_a_run_is_exact_and_trains_only_new_blocks(tmp_path, token_dataset):
    schedule = [LLAMA_PRO[0], {**LLAMA_PRO[1], "learning_rate": 0.0}]  # lr 0 after growth: weights stay as grown
    trainer = make_trainer(tmp_path / "out", token_dataset, schedule)
    params_before = {n: id(p) for n, p in trainer.model.named_parameters()}
    assert len(trainer.model.model.layers) == 6  # allocated up front
    trainer.train()
    assert {n: id(p) for n, p in trainer.model.named_parameters()} == params_before
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimized == set(params_before.values())  # the superset: every parameter, registered once
    # at the end, phase 0's arrangement and the grown one compute the same logits (identity growth, lr 0)
    model = trainer.model.eval()
    with torch.no_grad(), trainer.rack.arranged([0, 1, 2, 3]):
        before = model(input_ids=IDS).logits
    with torch.no_grad(), trainer.arranged():
        after = model(input_ids=IDS).logits
    assert trainer.producing_blocks() == [0, 1, 4, 2, 3, 5]
    assert torch.equal(after, before)  # the grown blocks add exact zeros to the residual stream


def test_growth_trains_new_blocks_and_keeps_the_rest_bit_identical(tmp_path, token_dataset):
    trainer = make_trainer(tmp_path / "out", token_dataset, LLAMA_PRO)
    seen = {}

    class AtGrowth(__import__("transformers").TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:  # end of the base phase
                seen["base"] = snapshot(trainer.model)

    trainer.add_callback(AtGrowth())
    trainer.train()
    end = snapshot(trainer.model)
    blocks = trainer.model.model.layers
    new_names = {f"model.layers.{b}." for b in (4, 5)}
    for name, value in end.items():
        if any(name.startswith(p) for p in new_names):
            source = name.replace("layers.4.", "layers.1.").replace("layers.5.", "layers.3.")
            if not name.endswith(("o_proj.weight", "down_proj.weight")):
                assert not torch.equal(value, seen["base"][source]), name  # copied at the growth step, then trained
        else:
            assert torch.equal(value, seen["base"][name]), name  # frozen after growth: bit-identical
    assert blocks[4].self_attn.o_proj.weight.abs().sum() > 0  # the zeroed projections learned
    # new blocks start with fresh optimizer state: Adam's step count equals the steps they trained
    state = trainer.optimizer.state[blocks[4].self_attn.q_proj.weight]
    assert int(state["step"]) == 4
    assert trainer.optimizer.state[blocks[0].self_attn.q_proj.weight]["step"] == 4  # trained in phase 0 only


def test_optimizer_state_reset_and_prepend(tmp_path, token_dataset):
    trainer = make_trainer(tmp_path / "out", token_dataset, PREPEND)
    trainer.train()
    assert trainer.producing_blocks() == [4, 0, 1, 2, 3, 5]
    steps = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert steps == {3}  # `optimizer_state: reset` at step 5: every state restarted for the last 3 steps
    logs = [h for h in trainer.state.log_history if "phase" in h and "loss" in h]
    assert [h["phase"] for h in logs] == ["base"] * 2 + ["below"] * 3 + ["all"] * 3
    assert logs[2]["learning_rate/stack_4"] == 0.0  # warm-up re-starts from 0 in the growth phase
    assert logs[3]["learning_rate/stack_4"] == pytest.approx(0.5e-3)  # half-way through the warm-up
    assert logs[3]["learning_rate/stack_5"] == 0.0  # grown later: in the optimizer, not training yet


@pytest.fixture(scope="module")
def grown_run(tmp_path_factory, token_dataset):
    out = tmp_path_factory.mktemp("grown")
    trainer = make_trainer(out, token_dataset, PREPEND, family="gpt2", save_strategy="steps", save_steps=1)
    trainer.train()
    return out, snapshot(trainer.model), trainer


@pytest.mark.parametrize("step", [2, 3, 6], ids=["at-growth", "after-growth", "after-second-growth"])
def test_resume_after_growth_is_bitwise_equal(tmp_path, token_dataset, grown_run, step):
    out, final, _ = grown_run
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(out / f"checkpoint-{step}", resumed_dir / f"checkpoint-{step}")
    trainer = make_trainer(resumed_dir, token_dataset, PREPEND, family="gpt2", save_strategy="steps", save_steps=1)
    trainer.train(resume_from_checkpoint=str(resumed_dir / f"checkpoint-{step}"))
    resumed = snapshot(trainer.model)
    for name, value in final.items():
        assert torch.equal(resumed[name], value), name


def test_export_of_a_grown_run_loads_in_plain_transformers(tmp_path, grown_run):
    out, _, trainer = grown_run
    assert main(["export", str(out / "checkpoint-8"), str(tmp_path / "export")]) == 0
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tmp_path / "export")
    assert config.num_hidden_layers == 6 and not hasattr(config, "stackwise_base_layers")
    with torch.no_grad(), trainer.arranged():
        expected = trainer.model.eval()(input_ids=IDS).logits
    got = logits_in_clean_process(tmp_path / "export", IDS, tmp_path)
    assert (got - expected).abs().max() < 1e-5
    # a checkpoint from before the second growth exports the depth of its own phase
    assert main(["export", str(out / "checkpoint-4"), str(tmp_path / "export4")]) == 0
    assert AutoConfig.from_pretrained(tmp_path / "export4").num_hidden_layers == 5


def shipped(name, model_dir, tmp_path, *extra):
    return brief_run_args(f"recipes/{name}.yaml", model_dir, tmp_path, *extra)


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])  # recipes name data from the root


@pytest.mark.slow
def test_llama_pro_recipe_runs_and_exports_35_blocks(tmp_path, tiny_30_block_dir, at_root, capsys):
    """The shipped LLaMA Pro recipe (4-bit trunk, identity growth, trunk LoRA), only the model swapped."""
    assert main(shipped("smollm2-135m/llama_pro", tiny_30_block_dir, tmp_path)) == 0
    assert "trained 4 steps" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "export")]) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert model.config.num_hidden_layers == 35 and len(model.model.layers) == 35
    # the interleaved blocks trained (their zeroed projections moved), the rest is the dequantized base + LoRA
    assert model.model.layers[6].mlp.down_proj.weight.abs().sum() > 0
    assert model.generate(IDS[:, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_progressive_stacking_recipe_runs(tmp_path, tiny_llama_dir, at_root, capsys):
    args = shipped("tiny/progressive_stacking", tiny_llama_dir, tmp_path)
    args += ["--training.max_steps", "10"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "trained 10 steps" in out
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "export")]) == 0
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "export").num_hidden_layers == 8  # 2 -> 4 -> 8


def test_prepend_recipe_runs(tmp_path, tiny_30_block_dir, at_root, capsys):
    assert main(shipped("smollm2-135m/prepend", tiny_30_block_dir, tmp_path)) == 0
    assert "trained 4 steps" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "export")]) == 0
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "export").num_hidden_layers == 36


@pytest.mark.parametrize("at", ["bottom", "top"], ids=["prepend-right-to-left", "append-left-to-right"])
def test_new_stack_trains_through_frozen_neighbours(tmp_path, token_dataset, at):
    """Prepend: the loss reaches the new bottom stack through the frozen suffix and head. Append: the new top stack
    trains on a frozen prefix. Either way only the new stack changes."""
    schedule = [
        {"name": "base", "until": 0.5, "train": "all"},
        {"name": "grown", "until": 1.0, "grow": {"op": "copy", "stacks": 1, "at": at}, "train": "new"},
    ]
    trainer = make_trainer(tmp_path / "out", token_dataset, schedule)
    seen = {}

    class AtGrowth(__import__("transformers").TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 5:  # one step after the growth step: the new stack holds its copy + 1 update
                seen["after_first"] = snapshot(trainer.model)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                seen["base"] = snapshot(trainer.model)

    trainer.add_callback(AtGrowth())
    trainer.train()
    end = snapshot(trainer.model)
    prefix = "model.layers.4."  # the grown block (physical id 4), at the bottom or the top of the rack
    assert trainer.producing_blocks()[0 if at == "bottom" else -1] == 4
    for name, value in end.items():
        if name.startswith(prefix):
            assert not torch.equal(value, seen["after_first"][name]), name  # kept training after the growth step
        else:
            assert torch.equal(value, seen["base"][name]), name  # frozen: bit-identical
