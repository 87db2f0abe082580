"""Faults: a checkpoint cut short is never resumed from; SIGTERM saves the current step and stops (resume is bitwise
equal); a non-finite loss or gradient is never applied (stop with a message naming step, phase and units, or skip
up to a limit). The subprocess tests (kill -9 at chosen moments, the CLI's SIGTERM exit, two torchrun ranks) are
slow-marked."""

from __future__ import annotations

import os
import shutil
import signal

import pytest
import torch
from conftest import tiny_causal_lm
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_stackwise.faults import NonFiniteError
from hf_stackwise.persist.checkpoint import (
    COMPLETE_NAME,
    ResumeError,
    complete_checkpoints,
    incomplete_reason,
    read_json,
    resolve_resume,
)
from hf_stackwise.trainer import StackwiseArguments, StackwiseTrainer

SCHEDULE = [
    {"name": "top", "until": 0.25, "train": ["top"]},
    {"name": "lower", "until": 0.5, "train": [0, 1], "embeddings": "train"},
    {"name": "all", "until": 1.0, "train": "all", "lr_schedule": "cosine"},
]


def make_trainer(output_dir, dataset, **overrides):
    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        schedule=SCHEDULE,
        blocks_per_stack=1,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return StackwiseTrainer(model=tiny_causal_lm("llama"), args=StackwiseArguments(**kwargs), train_dataset=dataset)


def weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = max(float((a[n] - b[n]).abs().max()) for n in a)
    assert all(torch.equal(a[n], b[n]) for n in a), f"max |delta| = {diff}"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, token_dataset):
    out = tmp_path_factory.mktemp("full")
    trainer = make_trainer(out, token_dataset)
    trainer.train()
    return out, weights(trainer)


# ---- checkpoints cut short -----------------------------------------------------------------------


def truncate(path, keep: float = 0.5) -> None:
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda c: os.remove(c / "optimizer.pt"), "optimizer.pt is missing"),
        (lambda c: truncate(c / "model.safetensors"), "model.safetensors has"),
        (lambda c: os.remove(c / "rng_state.pth"), "rng_state.pth is missing"),
        (lambda c: os.remove(c / COMPLETE_NAME), f"no readable {COMPLETE_NAME}"),
        (lambda c: (c / COMPLETE_NAME).write_text('{"files": {"model.safe'), f"no readable {COMPLETE_NAME}"),
        (lambda c: os.remove(c / "trainer_state.json"), "no trainer_state.json"),
    ],
    ids=["no-optimizer", "half-weights", "no-rng", "no-marker", "half-marker", "no-trainer-state"],
)
def test_a_damaged_checkpoint_is_never_resumed_from(tmp_path, full_run, damage, reason):
    out, _ = full_run
    run = tmp_path / "run"
    for step in (5, 6):
        shutil.copytree(out / f"checkpoint-{step}", run / f"checkpoint-{step}")
    assert complete_checkpoints(run) == [str(run / "checkpoint-5"), str(run / "checkpoint-6")]
    damage(run / "checkpoint-6")
    assert reason in incomplete_reason(run / "checkpoint-6")
    assert resolve_resume(str(run), True) == str(run / "checkpoint-5")
    with pytest.raises(ResumeError, match="was not completely written"):
        make_trainer(tmp_path / "x", None).prepare_output_dir(str(run / "checkpoint-6"))


def test_the_marker_lists_every_file_and_comes_last(full_run):
    out, _ = full_run
    folder = out / "checkpoint-3"
    marker = read_json(folder / COMPLETE_NAME)
    on_disk = {p.name for p in folder.iterdir()} - {COMPLETE_NAME}
    assert set(marker["files"]) == on_disk and marker["global_step"] == 3
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= on_disk
    newest = max(os.path.getmtime(folder / name) for name in on_disk)
    assert os.path.getmtime(folder / COMPLETE_NAME) >= newest


def test_rotation_keeps_a_complete_checkpoint(tmp_path, token_dataset):
    trainer = make_trainer(tmp_path / "run", token_dataset, max_steps=4, save_total_limit=1)
    trainer.train()
    assert complete_checkpoints(tmp_path / "run") == [str(tmp_path / "run" / "checkpoint-4")]
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-4"]


# ---- SIGTERM, in process ---------------------------------------------------------------------------


class SignalDuringStep(TrainerCallback):
    """Send SIGTERM to this process in the middle of the forward pass of step ``step`` (1-based)."""

    def __init__(self, trainer, step: int):
        self.step = step
        block = trainer.model.model.layers[0]
        block.register_forward_hook(self._hook)
        self.state = trainer.state
        self.trainer = trainer

    def _hook(self, module, args, output):
        if self.trainer.state.global_step + 1 == self.step and not self.trainer.preemption.signalled:
            os.kill(os.getpid(), signal.SIGTERM)
        return output


def test_sigterm_finishes_the_step_saves_it_and_resume_is_bitwise_equal(tmp_path, token_dataset, full_run):
    _, final = full_run
    previous = signal.getsignal(signal.SIGTERM)
    trainer = make_trainer(tmp_path / "run", token_dataset, save_steps=100)
    SignalDuringStep(trainer, step=6)
    trainer.train()
    assert trainer.preemption.stopped_at == 6 and trainer.state.global_step == 6
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is restored after train()
    assert complete_checkpoints(tmp_path / "run") == [str(tmp_path / "run" / "checkpoint-6")]
    assert read_json(tmp_path / "run" / "checkpoint-6" / "trainer_state.json")["global_step"] == 6
    resumed = make_trainer(tmp_path / "run", token_dataset, save_steps=100)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.preemption.stopped_at is None and resumed.state.global_step == 8
    assert_bitwise_equal(weights(resumed), final)


# ---- divergence ----------------------------------------------------------------------------------


class Inject:
    """Make step ``step`` (1-based) non-finite: ``output`` multiplies block 2's output by inf (the loss is nan),
    ``grad`` makes the gradient of block 1's first MLP weight inf (the loss stays finite)."""

    def __init__(self, trainer, steps: set[int], where: str = "output", block: int = 1, factor=float("inf")):
        self.trainer, self.steps, self.factor = trainer, steps, factor
        if where == "output":
            trainer.model.model.layers[2].register_forward_hook(lambda m, a, out: out * self._factor())
        else:
            trainer.model.model.layers[block].mlp.up_proj.weight.register_hook(lambda g: g * self._factor())

    def _factor(self) -> float:
        return self.factor if self.trainer.state.global_step + 1 in self.steps else 1.0


class Snapshots(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.by_step = trainer, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.by_step[state.global_step] = weights(self.trainer)


def test_a_nonfinite_loss_stops_the_run_before_it_touches_the_weights(tmp_path, token_dataset, full_run):
    _, _ = full_run
    trainer = make_trainer(tmp_path / "run", token_dataset)
    Inject(trainer, {6})
    with pytest.raises(NonFiniteError) as err:
        trainer.train()
    message = str(err.value)
    assert "training.nonfinite: step 6 of 8 (phase 'all', t=0.625): the loss is nan" in message
    assert "non-finite gradients in embeddings, stack_0, stack_1, stack_2, stack_3, head" in message
    assert "the last is checkpoint-5" in message and "`training.nonfinite: skip`" in message
    after5 = load_file(tmp_path / "run" / "checkpoint-5" / "model.safetensors")
    now = weights(trainer)
    assert all(torch.isfinite(p).all() for p in now.values())
    assert_bitwise_equal({n: now[n] for n in after5}, after5)  # step 6 was never applied
    assert [os.path.basename(c) for c in complete_checkpoints(tmp_path / "run")][-1] == "checkpoint-5"
    for folder in complete_checkpoints(tmp_path / "run"):
        assert all(torch.isfinite(t).all() for t in load_file(os.path.join(folder, "model.safetensors")).values())


CLIPPING = pytest.mark.parametrize("max_grad_norm", [1.0, 0.0], ids=["clipping", "no-clipping"])


@CLIPPING
def test_a_nonfinite_gradient_names_its_unit(tmp_path, token_dataset, max_grad_norm):
    trainer = make_trainer(tmp_path / "run", token_dataset, save_strategy="no", max_grad_norm=max_grad_norm)
    Inject(trainer, {3}, where="grad")
    with pytest.raises(
        NonFiniteError,
        match=r"step 3 of 8 \(phase 'lower', t=0.250\): the gradient norm is inf "
        r"\(non-finite gradients in stack_1\)",
    ):
        trainer.train()
    assert trainer.state.global_step == 2


@CLIPPING
def test_the_skip_policy_skips_up_to_its_limit_and_logs_it(tmp_path, token_dataset, max_grad_norm):
    trainer = make_trainer(
        tmp_path / "run",
        token_dataset,
        nonfinite="skip",
        max_skipped_steps=1,
        save_strategy="no",
        max_grad_norm=max_grad_norm,
    )
    Inject(trainer, {4})
    snapshots = Snapshots(trainer)
    trainer.add_callback(snapshots)
    trainer.train()
    assert trainer.state.global_step == 8
    assert_bitwise_equal(snapshots.by_step[4], snapshots.by_step[3])  # the optimizer did not move at step 4
    assert not torch.equal(snapshots.by_step[5]["lm_head.weight"], snapshots.by_step[4]["lm_head.weight"])
    history = trainer.state.log_history
    skipped = [h for h in history if "skipped_step" in h]
    assert skipped == [
        {"step": 4, "skipped_step": 4, "skipped_steps": 1, "phase": "lower", "nonfinite": skipped[0]["nonfinite"]}
    ]
    assert skipped[0]["nonfinite"].startswith("the loss is nan")
    assert [h["skipped_steps"] for h in history if "loss" in h and "step" in h] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert all(torch.isfinite(p).all() for p in weights(trainer).values())

    over = make_trainer(tmp_path / "over", token_dataset, nonfinite="skip", max_skipped_steps=1, save_strategy="no")
    Inject(over, {4, 7})
    with pytest.raises(NonFiniteError, match=r"step 7 of 8 .* and 1 steps were skipped already \(\[4\]"):
        over.train()


@CLIPPING
def test_the_guard_reuses_the_trainers_gradient_norm(tmp_path, token_dataset, max_grad_norm, monkeypatch):
    """No gradient-norm pass of the guard's own: the Trainer computes the step's norm (to clip it, or for its
    `grad_norm` log) and the guard checks that one, which is the norm the logs show."""
    seen, passes = [], []
    total_norm = torch.nn.utils.get_total_norm

    def counted(*args, **kwargs):
        passes.append(1)
        return total_norm(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "get_total_norm", counted)  # accelerate's clip and a guard's own pass
    trainer = make_trainer(tmp_path / "run", token_dataset, save_strategy="no", max_grad_norm=max_grad_norm)
    guard = trainer._guard_nonfinite
    trainer._guard_nonfinite = lambda losses, norm=None: (seen.append(norm), guard(losses, norm))
    trainer.train()
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(seen) == 8 and all(n is not None for n in seen)
    assert [float(n) for n in seen] == logged
    assert len(passes) == 8  # one norm per optimizer step: the Trainer's (a pass of the guard's own made it 16)


def test_weights_an_update_made_non_finite_are_never_saved(tmp_path, token_dataset):
    trainer = make_trainer(
        tmp_path / "run", token_dataset, optim="sgd", learning_rate=3e38, max_steps=4, max_grad_norm=0
    )
    Inject(trainer, {1}, where="grad", block=3, factor=1e10)  # a large but finite gradient
    with pytest.raises(
        NonFiniteError, match="after step 1 the weights are non-finite .* checkpoint-1 was not written"
    ):
        trainer.train()  # step 1's loss and gradient were finite; its update overflowed
    assert complete_checkpoints(tmp_path / "run") == []


def test_bad_policy_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="training.nonfinite: 'ignore'"):
        StackwiseArguments(output_dir=str(tmp_path), nonfinite="ignore", report_to="none")
