"""A cached run killed with SIGKILL in the middle of its cached phase (a real `hf-stackwise train` process, stores
in memory-mapped files) resumes, reloads its stores, and ends bitwise equal to the uninterrupted run without the
cache."""

from __future__ import annotations

import json
import os
import re
import time

import pytest
from conftest import pydoc_paragraphs
from test_faults_processes import RESUME, Run, assert_bitwise_equal, cli, final_weights

from hf_stackwise.persist.checkpoint import last_complete_checkpoint

pytestmark = pytest.mark.slow
STEPS = 16  # the cached phase ends at step 8; a checkpoint every 2 steps
SCHEDULE = [
    {"name": "top", "until": 0.5, "train": ["top"], "head": "train"},
    {"name": "all", "until": 1.0, "train": "all"},
]


def recipe(tmp_path, model_dir, train_file, name: str, cache: dict) -> str:
    from conftest import tiny_recipe, write_recipe

    settings = dict(max_steps=STEPS, save_strategy="steps", save_steps=2, logging_steps=1, learning_rate=1e-3)
    raw = tiny_recipe(tmp_path, model_dir, train_file, SCHEDULE, output_dir=str(tmp_path / name), **settings)
    raw["rack"] = {"blocks_per_stack": 1}
    raw["cache"] = cache
    (tmp_path / f"recipe-{name}").mkdir()
    return write_recipe(tmp_path / f"recipe-{name}", raw)


def steps_done(run: Run) -> int:
    ts = [float(m.group(1)) for m in re.finditer(r"'t': '?([0-9.e-]+)", run.output())]
    return round(max(ts, default=0) * STEPS)


def wait_until(run: Run, step: int, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while steps_done(run) < step:
        assert run.proc.poll() is None, f"exited {run.proc.returncode} before step {step}:\n{run.output()[-3000:]}"
        assert time.monotonic() < end, f"no step {step} after {timeout} s"
        time.sleep(0.002)


def test_kill_9_in_a_cached_phase_then_resume_is_bitwise_equal(tmp_path, tiny_llama_dir):
    text = tmp_path / "small.txt"  # about 16 rows of 32 tokens: every row comes twice in the cached phase
    text.write_text("\n".join(pydoc_paragraphs()[:10]) + "\n")
    plain = Run(cli(recipe(tmp_path, tiny_llama_dir, str(text), "plain", {"activations": False})))
    assert plain.finish() == 0, plain.output()[-3000:]

    cached = recipe(tmp_path, tiny_llama_dir, str(text), "cached", {"activations": True, "max_memory": 0})
    run = Run(cli(cached))
    wait_until(run, 6)  # inside the cached phase, in its second epoch: the stores hold every row
    run.kill()
    last = last_complete_checkpoint(str(tmp_path / "cached"))
    resumed_at = int(last.rsplit("-", 1)[1])
    assert 4 <= resumed_at < 8, f"killed at step {steps_done(run)}, resumes from {last}"
    assert os.listdir(tmp_path / "cached" / "activation-cache")
    run = Run(cli(cached, *RESUME))
    assert run.finish() == 0, run.output()[-3000:]
    assert_bitwise_equal(final_weights(tmp_path / "cached"), final_weights(tmp_path / "plain"))
    with open(os.path.join(last_complete_checkpoint(str(tmp_path / "cached")), "trainer_state.json")) as f:
        history = [h for h in json.load(f)["log_history"] if "loss" in h]
    after = [h["cache/hit_rate"] for h in history if resumed_at < h["step"] <= 8]
    assert after and after[-1] == 1.0, after  # the reloaded store served the second epoch's rows
