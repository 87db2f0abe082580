"""StackwiseTrainer semantics on tiny models: golden phase trace, frozen bit-identical, trainable changed,
superset optimizer, the invariant, optimizers, bf16, per-stack learning rates."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_causal_lm
from transformers import TrainerCallback

from hf_stackwise.trainer import StackwiseArguments, StackwiseTrainer

SCHEDULE = [
    {"name": "top", "until": 0.25, "train": ["top"]},
    {"name": "shallow", "until": 0.5, "stacks": 2, "train": [0, 1], "head": "train"},
    {"name": "all", "until": 1.0, "train": "all"},
]
# (first step of the phase, phase, trainable stacks) for 8 steps, 4 stacks of one block each
GOLDEN = [(0, "top", (3,)), (2, "shallow", (0, 1)), (4, "all", (0, 1, 2, 3))]


def make_trainer(tmp_path, dataset, schedule=SCHEDULE, family="llama", **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        schedule=schedule,
        blocks_per_stack=1,
    )
    kwargs.update(overrides)
    model = tiny_causal_lm(family)
    return StackwiseTrainer(model=model, args=StackwiseArguments(**kwargs), train_dataset=dataset)


def units_of(trainer):
    """unit -> list of parameter tensors (by name), from the rack."""
    return {u: [n for n, _ in ps] for u, ps in trainer.rack.parameter_units().items()}


class Recorder(TrainerCallback):
    """Observes the model after every step: which units changed, which had requires_grad."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.units = units_of(trainer)
        self.snapshot = self._copy()
        self.steps = []  # (step, phase, trainable stacks by flag, changed units, trainable units by flag)

    def _copy(self):
        return {n: p.detach().clone() for n, p in self.trainer.model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        params = dict(self.trainer.model.named_parameters())
        now = self._copy()
        changed = {
            u for u, names in self.units.items() if any(not torch.equal(now[n], self.snapshot[n]) for n in names)
        }
        flagged = {u for u, names in self.units.items() if any(params[n].requires_grad for n in names)}
        stacks = tuple(sorted({int(u.split("_")[1].split(".")[0]) for u in flagged if u.startswith("stack_")}))
        self.steps.append((state.global_step - 1, self.trainer._phase_state.name, stacks, changed, flagged))
        self.snapshot = now


def test_golden_trace_frozen_identical_trainable_changed(tmp_path, token_dataset):
    trainer = make_trainer(tmp_path, token_dataset)
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    assert trainer.resolved.trace(4) == GOLDEN
    expected = []
    for step in range(8):
        start, name, stacks = [g for g in GOLDEN if g[0] <= step][-1]
        expected.append((step, name, stacks))
    assert [s[:3] for s in recorder.steps] == expected
    for step, name, _, changed, flagged in recorder.steps:
        # exactly the units with requires_grad changed; everything else is bit-identical
        assert changed == flagged, (step, name, changed, flagged)
    by_phase = {s[1]: s[4] for s in recorder.steps}
    assert by_phase["top"] == {"stack_3"}
    assert by_phase["shallow"] == {"stack_0", "stack_1", "head"}
    assert by_phase["all"] == {"embeddings", "stack_0", "stack_1", "stack_2", "stack_3", "head"}


def test_optimizer_holds_the_superset_only(tmp_path, token_dataset):
    schedule = [{"name": "a", "until": 0.5, "train": [3]}, {"name": "b", "until": 1.0, "train": [2]}]
    trainer = make_trainer(tmp_path, token_dataset, schedule=schedule, max_steps=4)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    units = trainer.rack.parameter_units()
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    superset = {id(p) for u in ("stack_2", "stack_3") for _, p in units[u]}
    assert optimized == superset
    # never-trained units have no optimizer state and are bit-identical
    for unit in ("embeddings", "stack_0", "stack_1", "head"):
        for name, param in units[unit]:
            assert torch.equal(param, before[name]), name
            assert param not in trainer.optimizer.state


def test_invariant_catches_a_frozen_parameter_that_changed(tmp_path, token_dataset):
    trainer = make_trainer(tmp_path, token_dataset)
    victim = trainer.rack.parameter_units()["stack_0"][0][1]

    class Tamper(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:  # stack 0 is frozen in phase 'top'
                with torch.no_grad():
                    victim.add_(1.0)

    trainer.add_callback(Tamper())
    with pytest.raises(RuntimeError, match="frozen in phase 'top' changed"):
        trainer.train()


def test_invariant_catches_trainable_parameter_outside_optimizer(tmp_path, token_dataset):
    trainer = make_trainer(tmp_path, token_dataset, schedule=[{"until": 1.0, "train": [3]}], max_steps=2)
    trainer.create_optimizer()
    stray = trainer.rack.parameter_units()["stack_0"][0][1]
    stray.requires_grad_(True)
    with pytest.raises(RuntimeError, match="not in the optimizer"):
        trainer._check_trainable_optimized()


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd", "adafactor", "rmsprop"])
def test_training_optim_is_honoured_across_transitions(tmp_path, token_dataset, optim):
    trainer = make_trainer(tmp_path, token_dataset, optim=optim, max_steps=4)
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    expected_cls = {"adamw_torch": "AdamW", "sgd": "SGD", "adafactor": "Adafactor", "rmsprop": "RMSprop"}[optim]
    assert type(trainer.optimizer.optimizer).__name__ == expected_cls
    for step, name, _, changed, flagged in recorder.steps:
        assert changed == flagged, (optim, step, name)


def test_bf16_mixed_precision_across_transitions(tmp_path, token_dataset):
    trainer = make_trainer(tmp_path, token_dataset, bf16=True)
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    for step, name, _, changed, flagged in recorder.steps:
        assert changed == flagged, (step, name)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_logs_carry_t_phase_trainable_count_and_stack_learning_rates(tmp_path, token_dataset):
    schedule = [
        {"name": "warm", "until": 0.5, "train": ["top"], "learning_rate": 2e-3},
        {"name": "decay", "until": 1.0, "train": "all", "learning_rate": 1e-3, "layer_lr_decay": 0.5},
    ]
    trainer = make_trainer(tmp_path, token_dataset, schedule=schedule, max_steps=4)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["phase"] for h in logs] == ["warm", "warm", "decay", "decay"]
    assert [h["t"] for h in logs] == [0.25, 0.5, 0.75, 1.0]
    top_params = sum(p.numel() for _, p in trainer.rack.parameter_units()["stack_3"])
    assert logs[0]["trainable_params"] == top_params
    assert logs[-1]["trainable_params"] == sum(p.numel() for p in trainer.model.parameters())
    assert logs[0]["learning_rate/stack_3"] == pytest.approx(2e-3)
    assert logs[0]["learning_rate/stack_0"] == 0.0
    last = logs[-1]
    for i in range(4):
        assert last[f"learning_rate/stack_{i}"] == pytest.approx(1e-3 * 0.5 ** (3 - i))
    assert last["learning_rate/embeddings"] == pytest.approx(1e-3 * 0.5**4)
    assert last["learning_rate/head"] == pytest.approx(1e-3)
    assert last["learning_rate"] == pytest.approx(1e-3)  # the phase's peak, not param group 0
    # per-unit gradient norms: only trainable units have gradients, and together they make the Trainer's norm
    assert {k for k in logs[0] if k.startswith("grad_norm/")} == {"grad_norm/stack_3"}
    for entry in logs:
        units = [v for k, v in entry.items() if k.startswith("grad_norm/")]
        assert sum(v * v for v in units) ** 0.5 == pytest.approx(entry["grad_norm"], rel=1e-4)
    assert len([k for k in last if k.startswith("grad_norm/")]) == 6  # embeddings, 4 stacks, head


def test_inactive_stacks_do_not_run(tmp_path, token_dataset):
    """With `stacks: 2` the head reads after stack 1: the loss equals that of a 2-block model."""
    trainer = make_trainer(tmp_path, token_dataset, schedule=[{"until": 1.0, "stacks": 2, "train": [1]}], max_steps=1)
    model = trainer.model
    batch = torch.tensor(token_dataset[:2]["input_ids"])
    with trainer.rack.active_depth(2), torch.no_grad():
        shallow = model(input_ids=batch).logits
    short = tiny_causal_lm("llama", layers=2)
    state = {k: v for k, v in model.state_dict().items() if not any(f"layers.{i}." in k for i in (2, 3))}
    short.load_state_dict(state)
    with torch.no_grad():
        expected = short(input_ids=batch).logits
    torch.testing.assert_close(shallow, expected, rtol=0, atol=0)
    assert len(model.model.layers) == 4  # the full block list stays registered


def test_gradient_accumulation_keeps_the_trace_and_semantics(tmp_path, token_dataset):
    trainer = make_trainer(tmp_path, token_dataset, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    expected = [(s, *[g for g in GOLDEN if g[0] <= s][-1][1:]) for s in range(8)]
    assert [s[:3] for s in recorder.steps] == expected
    assert all(changed == flagged for _, _, _, changed, flagged in recorder.steps)


def test_epochs_resolve_boundaries_from_update_steps_per_epoch(tmp_path, token_dataset):
    small = token_dataset.select(range(40))  # 10 batches of 4 per epoch, 2 epochs -> 20 steps
    trainer = make_trainer(tmp_path, small, max_steps=-1, num_train_epochs=2)
    assert trainer.resolved is None  # unknown until the Trainer knows the dataloader length
    trainer.train()
    assert trainer.state.global_step == 20 and trainer.resolved.total_steps == 20
    assert trainer.resolved.trace(4) == [(0, "top", (3,)), (5, "shallow", (0, 1)), (10, "all", (0, 1, 2, 3))]


def test_tensorboard_shows_phase_scalars(tmp_path, token_dataset):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = make_trainer(tmp_path, token_dataset, report_to="tensorboard")
    trainer.train()
    events = [p for p in tmp_path.rglob("events.out.tfevents.*")]
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "train/t",
        "train/phase_index",
        "train/trainable_params",
        "train/learning_rate/stack_3",
        "train/grad_norm/stack_3",
    } <= tags
    # one value per logged step, plus the end-of-training summary (still in the last phase)
    assert [e.value for e in acc.Scalars("train/phase_index")] == [0, 0, 1, 1, 2, 2, 2, 2, 2]


def test_progress_bar_shows_the_phase(tmp_path, token_dataset):
    from transformers import ProgressCallback

    trainer = make_trainer(tmp_path, token_dataset, disable_tqdm=False)
    seen = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            bars = [c.training_bar for c in trainer.callback_handler.callbacks if isinstance(c, ProgressCallback)]
            seen.append(bars[0].desc.rstrip(": ") if bars and bars[0] is not None else None)

    trainer.add_callback(Watch())
    trainer.train()
    assert seen == ["phase top"] * 2 + ["phase shallow"] * 2 + ["phase all"] * 4
