"""Exact resume: from a mid-phase and a boundary checkpoint the final weights equal the uninterrupted run's
(bitwise, CPU fp32, with dropout on); edited schedules, incomplete checkpoints and foreign output
directories are refused."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from conftest import tiny_causal_lm

from hf_stackwise.persist.checkpoint import MANIFEST_NAME, OutputDirError, ResumeError, read_json
from hf_stackwise.trainer import StackwiseArguments, StackwiseTrainer

SCHEDULE = [
    {"name": "top", "until": 0.25, "train": ["top"]},
    {"name": "shallow", "until": 0.5, "stacks": 2, "train": [0, 1], "head": "train", "warmup": 0.5},
    {"name": "all", "until": 1.0, "train": "all", "lr_schedule": "cosine", "layer_lr_decay": 0.8},
]


def make_trainer(output_dir, dataset, schedule=SCHEDULE, **overrides):
    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        weight_decay=0.01,
        logging_steps=1,
        save_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        schedule=schedule,
        blocks_per_stack=1,
    )
    kwargs.update(overrides)
    model = tiny_causal_lm("gpt2")  # GPT-2 keeps dropout 0.1: resume must restore the RNG too
    return StackwiseTrainer(model=model, args=StackwiseArguments(**kwargs), train_dataset=dataset)


def weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, token_dataset):
    out = tmp_path_factory.mktemp("full")
    trainer = make_trainer(out, token_dataset)
    trainer.train()
    return out, weights(trainer), trainer


@pytest.mark.parametrize("step", [3, 4], ids=["mid-phase", "boundary"])
def test_resume_is_bitwise_equal_to_uninterrupted(tmp_path, token_dataset, full_run, step):
    out, final, _ = full_run
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(out / f"checkpoint-{step}", resumed_dir / f"checkpoint-{step}")
    trainer = make_trainer(resumed_dir, token_dataset)
    trainer.train(resume_from_checkpoint=str(resumed_dir / f"checkpoint-{step}"))
    assert trainer.state.global_step == 8
    resumed = weights(trainer)
    for name, value in final.items():
        assert torch.equal(resumed[name], value), name


def test_resume_true_takes_the_last_complete_checkpoint(tmp_path, token_dataset, full_run):
    out, final, _ = full_run
    run_dir = tmp_path / "run"
    shutil.copytree(out / "checkpoint-5", run_dir / "checkpoint-5")
    shutil.copy(out / "stackwise_run.json", run_dir / "stackwise_run.json")
    # a half-written later checkpoint (the Trainer writes trainer_state.json last): must be skipped
    shutil.copytree(out / "checkpoint-6", run_dir / "checkpoint-6")
    os.remove(run_dir / "checkpoint-6" / "trainer_state.json")
    trainer = make_trainer(run_dir, token_dataset)
    trainer.train(resume_from_checkpoint=True)
    resumed = weights(trainer)
    assert all(torch.equal(resumed[n], v) for n, v in final.items())


def test_checkpoint_manifest(full_run):
    out, _, trainer = full_run
    manifest = read_json(out / "checkpoint-3" / MANIFEST_NAME)
    assert manifest["schedule_hash"] == trainer.schedule.fingerprint()
    assert manifest["rack"] == {"layers": "transformer.h", "num_blocks": 4, "boundaries": [0, 1, 2, 3, 4]}
    assert manifest["global_step"] == 3
    assert manifest["phase"] == {"index": 1, "name": "shallow", "trainable_stacks": [0, 1], "blocks": [0, 1]}
    assert manifest["run"]["total_steps"] == 8
    boundary = read_json(out / "checkpoint-4" / MANIFEST_NAME)
    assert (boundary["phase"]["name"], boundary["next_phase"]) == ("shallow", "all")


def test_resume_with_an_edited_schedule_is_refused(tmp_path, token_dataset, full_run):
    out, _, _ = full_run
    edited = [dict(p) for p in SCHEDULE]
    edited[1]["until"] = 0.625
    trainer = make_trainer(tmp_path / "edited", token_dataset, schedule=edited)
    before = weights(trainer)
    with pytest.raises(ResumeError, match=r"schedule\[1\]\.until: 0\.5 in the checkpoint, 0\.625 now"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    faster = make_trainer(tmp_path / "faster", token_dataset, learning_rate=2e-3)
    with pytest.raises(ResumeError, match=r"training.learning_rate: 0.001 in the checkpoint, 0.002 now"):
        faster.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    longer = make_trainer(tmp_path / "longer", token_dataset, max_steps=16)
    with pytest.raises(ResumeError, match="training.max_steps"):
        longer.train(resume_from_checkpoint=str(out / "checkpoint-3"))


def test_resume_from_a_foreign_or_incomplete_checkpoint_is_refused(tmp_path, token_dataset, full_run):
    out, _, _ = full_run
    foreign = tmp_path / "foreign"
    shutil.copytree(out / "checkpoint-3", foreign)
    os.remove(foreign / MANIFEST_NAME)
    trainer = make_trainer(tmp_path / "x", token_dataset)
    with pytest.raises(ResumeError, match="not an hf_stackwise checkpoint"):
        trainer.train(resume_from_checkpoint=str(foreign))
    with pytest.raises(ResumeError, match="no complete checkpoint"):
        make_trainer(tmp_path / "empty", token_dataset).train(resume_from_checkpoint=True)


def test_output_dir_of_another_run_is_protected(tmp_path, token_dataset, full_run):
    out, _, _ = full_run
    listing = sorted(os.listdir(out))
    other = [dict(p) for p in SCHEDULE]
    other[0]["learning_rate"] = 5e-4
    with pytest.raises(OutputDirError, match="holds a different run"):
        make_trainer(out, token_dataset, schedule=other).train()
    with pytest.raises(OutputDirError, match="already holds checkpoints of this run"):
        make_trainer(out, token_dataset).train()
    assert sorted(os.listdir(out)) == listing  # nothing touched
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="holds no hf_stackwise run"):
        make_trainer(stranger, token_dataset).train()
    assert os.listdir(stranger) == ["notes.txt"]


def test_overwrite_output_dir_replaces_the_old_checkpoints(tmp_path, token_dataset, full_run):
    out, _, _ = full_run
    target = tmp_path / "target"
    shutil.copytree(out, target)
    other = [dict(p) for p in SCHEDULE]
    other[0]["learning_rate"] = 5e-4
    trainer = make_trainer(target, token_dataset, schedule=other, overwrite_output_dir=True, max_steps=4, save_steps=4)
    trainer.train()
    assert sorted(d for d in os.listdir(target) if d.startswith("checkpoint-")) == ["checkpoint-4"]
    assert read_json(target / "checkpoint-4" / MANIFEST_NAME)["run"]["schedule"][0]["learning_rate"] == 5e-4
