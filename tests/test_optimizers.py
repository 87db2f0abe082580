"""Optimizers the user brings: ``optimizer_cls_and_kwargs`` builds the per-unit groups with the user's class and
kwargs (checked against a hand-written SGD-momentum step); a ready optimizer or scheduler is refused clearly."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_arguments, tiny_causal_lm
from transformers import TrainerCallback

from hf_stackwise.trainer import StackwiseTrainer

SCHEDULE = [
    {"name": "top", "until": 0.5, "train": ["top"]},
    {"name": "low", "until": 1.0, "train": [0, 1]},
]


def make_args(tmp_path, **overrides):
    return tiny_arguments(tmp_path / "out", **{"schedule": SCHEDULE, **overrides})


class StepRecorder(TrainerCallback):
    """Each optimizer step: the tracked parameters before and after, their (clipped) gradients and group lr."""

    def __init__(self, trainer, names):
        self.trainer, self.names, self.steps = trainer, names, []
        self.params = {n: p for n, p in trainer.model.named_parameters() if n in names}

    def _lr_of(self, param):
        return next(
            (g["lr"] for g in self.trainer.optimizer.param_groups if any(p is param for p in g["params"])), None
        )

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.before = {
            n: (p.detach().clone(), None if p.grad is None else p.grad.detach().clone(), self._lr_of(p))
            for n, p in self.params.items()
        }

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.steps.append({n: (*self.before[n], p.detach().clone()) for n, p in self.params.items()})


def test_optimizer_cls_and_kwargs_builds_the_unit_groups_with_that_class(tmp_path, token_dataset):
    model = tiny_causal_lm("llama")
    names = {
        "top": "model.layers.3.mlp.down_proj.weight",  # trains in phase 'top' only
        "low": "model.layers.0.self_attn.q_proj.weight",  # trains in phase 'low' only
        "never": "model.layers.2.mlp.up_proj.weight",
    }
    trainer = StackwiseTrainer(
        model=model,
        args=make_args(tmp_path),
        train_dataset=token_dataset,
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"momentum": 0.9, "nesterov": False}),
    )
    recorder = StepRecorder(trainer, set(names.values()))
    trainer.add_callback(recorder)
    never_before = dict(model.named_parameters())[names["never"]].detach().clone()
    trainer.train()

    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper around the user's class
    assert type(optimizer) is torch.optim.SGD
    assert len(optimizer.param_groups) > 3  # per unit and decay class, not one group
    assert {g["momentum"] for g in optimizer.param_groups} == {0.9}
    assert {u for g in optimizer.param_groups for u in g["stackwise_units"]} >= {"stack_0", "stack_1", "stack_3"}
    # the weights move exactly as SGD with momentum 0.9 moves them, step by step, phase by phase
    buffers = {}
    moved = {name: [] for name in names.values()}
    for step in recorder.steps:
        for name, (before, grad, lr, after) in step.items():
            if grad is None:
                assert torch.equal(after, before), name  # frozen in this phase: bit-identical
                continue
            buffers[name] = grad if name not in buffers else 0.9 * buffers[name] + grad
            torch.testing.assert_close(after, before - lr * buffers[name], rtol=1e-6, atol=1e-7)
            moved[name].append(not torch.equal(after, before))
    assert moved[names["top"]] == [True, True] and moved[names["low"]] == [True, True]
    assert moved[names["never"]] == []
    assert torch.equal(dict(model.named_parameters())[names["never"]], never_before)
    # the schedule's learning rate reached the groups (LambdaLR over lr=1.0), not SGD's default
    assert recorder.steps[0][names["top"]][2] == pytest.approx(1e-2)


def test_optimizer_cls_and_kwargs_adam_hyperparameters_reach_every_group(tmp_path, token_dataset):
    trainer = StackwiseTrainer(
        model=tiny_causal_lm("llama"),
        args=make_args(tmp_path, max_steps=2),
        train_dataset=token_dataset,
        optimizer_cls_and_kwargs=(torch.optim.Adam, {"betas": (0.8, 0.95), "eps": 1e-6}),
    )
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    assert type(optimizer) is torch.optim.Adam
    assert {(g["betas"], g["eps"]) for g in optimizer.param_groups} == {((0.8, 0.95), 1e-6)}


def test_a_ready_optimizer_is_refused_with_the_equivalent_cls_and_kwargs(tmp_path, token_dataset):
    model = tiny_causal_lm("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ready = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError) as info:
        StackwiseTrainer(model=model, args=make_args(tmp_path), train_dataset=token_dataset, optimizers=(ready, None))
    message = str(info.value)
    assert message.startswith("optimizers: StackwiseTrainer builds its own optimizer")
    assert "optimizer_cls_and_kwargs=(torch.optim.SGD, {'momentum': 0.9})" in message
    assert not isinstance(info.value, KeyError)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # refused before touching it
    # the suggestion works as given
    trainer = StackwiseTrainer(
        model=model,
        args=make_args(tmp_path, max_steps=2),
        train_dataset=token_dataset,
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"momentum": 0.9}),
    )
    trainer.train()
    assert type(trainer.optimizer.optimizer) is torch.optim.SGD


def test_a_scheduler_is_refused(tmp_path, token_dataset):
    model = tiny_causal_lm("llama")
    ready = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(ready, lambda step: 1.0)
    with pytest.raises(ValueError, match="cannot use one built beforehand nor a scheduler"):
        StackwiseTrainer(model=model, args=make_args(tmp_path), optimizers=(ready, scheduler))
    with pytest.raises(ValueError, match="builds its own learning-rate scheduler from the schedule; drop the sch"):
        StackwiseTrainer(model=model, args=make_args(tmp_path), optimizers=(None, scheduler))


@pytest.mark.parametrize(
    ("cls_and_kwargs", "match"),
    [
        (
            (torch.optim.SGD, {"lr": 0.5}),
            r"lr=0\.5 would be ignored: the schedule sets each group's lr from `learning_",
        ),
        ((torch.optim.AdamW, {"weight_decay": 0.1}), r"weight_decay=0\.1 would be ignored"),
        ((torch.optim.SGD, {"params": []}), "builds its own parameter groups"),
        (torch.optim.SGD, r"expected \(optimizer class, dict of keyword arguments\)"),
    ],
)
def test_bad_cls_and_kwargs_are_refused(tmp_path, cls_and_kwargs, match):
    with pytest.raises(ValueError, match=match):
        StackwiseTrainer(
            model=tiny_causal_lm("llama"), args=make_args(tmp_path), optimizer_cls_and_kwargs=cls_and_kwargs
        )


def test_cls_and_kwargs_may_repeat_the_schedule_values(tmp_path, token_dataset):
    trainer = StackwiseTrainer(
        model=tiny_causal_lm("llama"),
        args=make_args(tmp_path, max_steps=2, weight_decay=0.01),
        train_dataset=token_dataset,
        optimizer_cls_and_kwargs=(torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.01}),
    )
    trainer.train()
    assert {g["weight_decay"] for g in trainer.optimizer.param_groups} == {0.0, 0.01}


class ModeSwitchingSGD(torch.optim.SGD):
    """An optimizer with train/eval modes like schedule-free ones: eval() moves every parameter it holds state for
    (here to half its value), train() moves it back."""

    def train(self):
        self._move(2.0)

    def eval(self):
        self._move(0.5)

    def _move(self, factor):
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if self.state.get(p):
                        p.mul_(factor)


@pytest.mark.parametrize(
    "overrides, kwargs, match",
    [
        ({"optim": "schedule_free_adamw"}, {}, r"training\.optim: 'schedule_free_adamw' is a schedule-free"),
        ({"optim": "schedule_free_sgd"}, {}, r"training\.optim: 'schedule_free_sgd' is a schedule-free"),
        ({}, {"optimizer_cls_and_kwargs": (ModeSwitchingSGD, {})}, r"ModeSwitchingSGD has optimizer\.train\(\)"),
        (
            {},
            {"optimizers": (ModeSwitchingSGD([torch.zeros(1, requires_grad=True)], lr=0.1), None)},
            "ModeSwitchingSGD",
        ),
    ],
    ids=["schedule_free_adamw", "schedule_free_sgd", "cls_and_kwargs", "ready-optimizer"],
)
def test_optimizers_with_train_eval_modes_are_refused_with_the_reason(tmp_path, overrides, kwargs, match):
    """Schedule-free optimizers rewrite every parameter they hold state for at each train/eval switch, so a stack
    frozen after training would not stay bit-frozen across an eval: refused when the trainer is built (by name, so
    without the `schedulefree` package too), naming the setting."""
    from hf_stackwise.errors import RecipeError

    with pytest.raises(RecipeError, match=match) as err:
        StackwiseTrainer(model=tiny_causal_lm("llama"), args=make_args(tmp_path, **overrides), **kwargs)
    assert "bit-frozen" in str(err.value) and "adamw_torch" in str(err.value)


def test_the_cli_refuses_a_schedule_free_optim_before_weights_load(
    tmp_path, tiny_llama_dir, pydoc_files, capsys, monkeypatch
):
    from conftest import tiny_recipe, write_recipe
    from test_bad_input import refused

    from hf_stackwise.cli import pipeline as run

    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, tiny_llama_dir, pydoc_files[0], SCHEDULE))
    for command in ("train", "validate"):
        refused(
            [command, path, "--training.optim", "schedule_free_adamw"],
            capsys,
            tmp_path / "run",
            "training.optim: 'schedule_free_adamw' is a schedule-free optimizer",
            "bit-frozen",
        )
