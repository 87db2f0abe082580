"""What `hf-stackwise train` shows at the end: one evaluation of the final weights, no pin-memory warning on CPU,
and a summary of an early-stopped run with the resolved phase ranges and where it stopped (issue 24)."""

from __future__ import annotations

import json
import warnings

import yaml
from test_cli import recipe

from hf_stackwise.cli.commands import main


def eval_steps_logged(run_dir) -> list[int]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return [h["step"] for h in state["log_history"] if "eval_loss" in h]


def test_a_run_evaluates_its_final_weights_once(tmp_path, tiny_llama_dir, pydoc_files, capsys):
    """eval_steps 3 of 6: the loop's eval at step 6 is the final one; eval_steps 4: one eval after the loop."""
    for eval_steps in (3, 4):
        folder = tmp_path / f"every-{eval_steps}"
        folder.mkdir()
        path = recipe(folder, tiny_llama_dir, *pydoc_files, eval_steps=eval_steps, save_steps=eval_steps)
        raw = yaml.safe_load(open(path))
        del raw["training"]["use_cpu"]  # the machine decides pin_memory, not the user
        open(path, "w").write(yaml.safe_dump(raw))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["train", path]) == 0
        assert not [w for w in caught if "pin_memory" in str(w.message)]
        steps = eval_steps_logged(folder / "run")
        assert steps.count(6) == 1, steps
        assert steps == [0, *range(eval_steps, 6, eval_steps), 6]  # eval_on_start, the loop's, the final one
        out = capsys.readouterr().out
        final = json.loads((folder / "run" / "trainer_state.json").read_text())["log_history"]
        last_eval = [h["eval_loss"] for h in final if "eval_loss" in h][-1]
        assert f"-> last {last_eval:.4f}" in out


def test_an_early_stopped_run_prints_the_resolved_ranges_and_where_it_stopped(
    tmp_path, tiny_llama_dir, pydoc_files, capsys
):
    """Phase `all` trains at a rate that makes eval worse, so early stopping ends the 8-step run inside it: the
    summary keeps the schedule's ranges (0-3, 4-7 of 8 steps) and says where the run stopped."""
    path = recipe(tmp_path, tiny_llama_dir, *pydoc_files, max_steps=8, eval_steps=1, logging_steps=1)
    raw = yaml.safe_load(open(path))
    del raw["training"]["save_steps"], raw["training"]["eval_on_start"]
    raw["schedule"][1]["learning_rate"] = 50.0
    raw["callbacks"] = {"early_stopping": {"patience": 1, "metric": "loss"}}
    open(path, "w").write(yaml.safe_dump(raw))
    assert main(["train", path]) == 0
    out = capsys.readouterr().out
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    stopped = state["global_step"]
    assert 4 < stopped < 8  # early stopping fired inside phase `all`
    lines = [line.split() for line in out.splitlines() if line.startswith("  top ") or line.startswith("  all ")]
    assert lines[0][:6] == ["top", "steps", "0-3", "t", "0.00-0.50", "train"]
    assert lines[1][:6] == ["all", "steps", "4-7", "t", "0.50-1.00", "train"]
    assert f"(stopped after step {stopped - 1}, t {stopped / 8:.2f})" in " ".join(lines[1])
    assert f"stopped early: {stopped} of 8 steps ran (t {stopped / 8:.2f})" in out
    assert f"trained {stopped} steps" in out
