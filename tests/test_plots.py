"""`hf-stackwise plot`: the schedule timeline and the loss by phase, as non-empty PNGs of the expected size."""

from __future__ import annotations

import json
import pathlib

import matplotlib.image as mpimg
import numpy as np
import pytest
import yaml
from conftest import brief_run_args

from hf_stackwise.cli.commands import main
from hf_stackwise.cli.plan import make_plan
from hf_stackwise.recipe.loader import load_recipe
from hf_stackwise.report.plots import phase_spans, plot_timeline, timeline_cells
from hf_stackwise.schedule.phases import Schedule

ROOT = pathlib.Path(__file__).resolve().parents[1]


def check_png(path):
    image = mpimg.imread(path)
    assert image.shape[:2] == (400, 1000)  # 10 x 4 inches at 100 dpi
    assert np.unique(image.reshape(-1, image.shape[-1]), axis=0).shape[0] > 20  # drawn on, not blank


def test_plot_a_run(tmp_path, tiny_llama_dir, pydoc_files, capsys):
    raw = {
        "model": {"name_or_path": tiny_llama_dir, "dtype": "float32"},
        "rack": {"blocks_per_stack": 1},
        "adapters": {"r": 2, "alpha": 4},
        "data": {
            "train": {"path": "text", "data_files": pydoc_files[0]},
            "eval": {"path": "text", "data_files": pydoc_files[1]},
            "max_eval_samples": 8,
            "max_seq_length": 32,
        },
        "schedule": [
            {"name": "shallow", "until": 0.5, "stacks": 2, "train": ["top"], "head": "train"},
            {"name": "deep", "until": 1.0, "train": [3], "adapter": "lora", "trunk": "lora", "learning_rate": 5e-4},
        ],
        "training": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 6,
            "per_device_train_batch_size": 4,
            "logging_steps": 1,
            "eval_strategy": "steps",
            "eval_steps": 3,
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
        },
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(tmp_path / "recipe.yaml")]) == 0
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "plots")]) == 0
    for name in ("schedule.png", "loss.png"):
        check_png(tmp_path / "plots" / name)
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    assert {h["phase"] for h in history if "loss" in h} == {"shallow", "deep"}


def test_timeline_before_training(tmp_path):
    schedule = Schedule.from_list([{"until": 0.3, "train": [3]}, {"until": 1.0, "train": "all"}])
    check_png(plot_timeline(schedule, 4, str(tmp_path / "t.png")))


def test_timeline_of_a_growing_rack(tmp_path):
    schedule = Schedule.from_list(
        [
            {"name": "base", "until": 0.5, "train": "top"},
            {"name": "grow", "until": 1.0, "grow": {"op": "identity", "stacks": 1, "at": "bottom"}, "train": "new"},
        ]
    )
    cells = [(c.phase, c.position, c.stack, c.mode, c.new) for c in timeline_cells(schedule, 2)]
    assert cells == [
        (0, 0, 0, "frozen", False),
        (0, 1, 1, "full", False),  # two rows before the growth
        (1, 0, 2, "full", True),  # the new stack is the bottom row; the old ones move up
        (1, 1, 0, "frozen", False),
        (1, 2, 1, "frozen", False),
    ]
    check_png(plot_timeline(schedule, 2, str(tmp_path / "t.png")))


def test_phases_end_at_the_resolved_steps():
    schedule = Schedule.from_list([{"until": 0.4, "train": [1]}, {"until": 1.0, "train": "all"}])
    assert phase_spans(schedule) == [(0.0, 0.4), (0.4, 1.0)]  # without a run length: the recipe's `until`
    assert phase_spans(schedule, 3) == [(0.0, 1 / 3), (1 / 3, 1.0)]  # round(0.4 x 3) = step 1
    assert {(c.start, c.end) for c in timeline_cells(schedule, 2, 3) if c.phase == 0} == {(0.0, 1 / 3)}


GROWTH_RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "grow:" in p.read_text())


def rows(cells, phase: int) -> list[tuple[int, str, bool]]:
    """(physical stack, mode, new) of one phase's rows, position 0 first."""
    mine = sorted((c for c in cells if c.phase == phase), key=lambda c: c.position)
    assert [c.position for c in mine] == list(range(len(mine)))
    return [(c.stack, c.mode, c.new) for c in mine]


EXPECTED_ROWS = {  # per phase, (physical stack, mode, grown here) bottom → top
    # 2 -> 4 -> 8 stacks of one block, every one training; copies on top
    "progressive_stacking": [
        [(0, "full", False), (1, "full", False)],
        [(0, "full", False), (1, "full", False), (2, "full", True), (3, "full", True)],
        [(0, "full", False), (1, "full", False), (2, "full", False), (3, "full", False)]
        + [(s, "full", True) for s in (4, 5, 6, 7)],
    ],
    # one block after every stack of 6: the new ones at positions 1, 3, 5, 7, 9
    "llama_pro": [
        [r for s in range(5) for r in ((s, "frozen", False), (5 + s, "full", True))],
        [r for s in range(5) for r in ((s, "trunk", False), (5 + s, "full", False))],
    ],
    # the new stack (physical id 5) is the bottom row from its phase on; stacks 0..4 sit above it
    "prepend": [
        [(5, "full", True)] + [(s, "frozen", False) for s in range(5)],
        [(5, "full", False), (0, "full", False)] + [(s, "frozen", False) for s in range(1, 5)],
    ],
}


@pytest.mark.parametrize("path", GROWTH_RECIPES, ids=[p.stem for p in GROWTH_RECIPES])
def test_shipped_growth_recipes_draw_positions(path):
    """`plan --plot` draws each phase's rack by position, bottom to top, as the phase runs it: the rows agree with
    the stacks the plan says train, and grown stacks sit where the growth put them."""
    plan = make_plan(load_recipe(str(path)))
    cells = timeline_cells(plan.schedule, plan.base_sizes, plan.total_steps)
    layout = plan.schedule.layout(plan.base_sizes)
    for index, phase in enumerate(plan.phases):
        phase_rows = rows(cells, index)
        assert [stack for stack, _, _ in phase_rows] == list(layout.orders[index])
        trained = tuple(i for i, (_, mode, _) in enumerate(phase_rows) if mode in ("full", "lora"))
        assert trained == phase.trainable_stacks
        assert tuple(i for i, (_, _, new) in enumerate(phase_rows) if new) == layout.new_positions(index)
        assert {(c.start, c.end) for c in cells if c.phase == index} == {
            (phase.start / plan.total_steps, phase.end / plan.total_steps)
        }
    assert set(EXPECTED_ROWS) <= {p.stem for p in GROWTH_RECIPES}
    if path.stem in EXPECTED_ROWS:
        assert [rows(cells, i) for i in range(len(plan.phases))] == EXPECTED_ROWS[path.stem]


def test_plot_of_a_run_draws_what_plan_drew(tmp_path, tiny_llama_dir, monkeypatch):
    """A real run of the prepend recipe (a tiny model of 4 one-block stacks, 4 steps): `hf-stackwise plot` draws the
    same cells as `plan --plot` did before training, phases ending at the resolved steps (`until: 0.6` of 4 steps is
    step 2, t = 0.50), and the exported model card's table says the same."""
    from huggingface_hub import ModelCard

    from hf_stackwise.report import plots

    drawn = []

    def recording(*args, **kwargs):  # the real function; keeps what each picture drew
        drawn.append(timeline_cells(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(plots, "timeline_cells", recording)
    recipe = str(ROOT / "recipes" / "smollm2-135m" / "prepend.yaml")
    extra = ("--rack.blocks_per_stack", "1", "--training.logging_steps", "1", "--data.eval", "null")
    arguments = brief_run_args(recipe, tiny_llama_dir, tmp_path, *extra)
    assert main(["plan", *arguments[1:], "--plot", str(tmp_path / "plan.png")]) == 0
    assert main(arguments) == 0
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "plots")]) == 0
    planned, plotted = drawn
    assert plotted == planned
    # the new stack (physical id 4) is the bottom row from its phase on; stacks 0..3 sit above it
    assert rows(plotted, 0) == [(4, "full", True)] + [(s, "frozen", False) for s in range(4)]
    assert rows(plotted, 1) == [(4, "full", False), (0, "full", False)] + [(s, "frozen", False) for s in (1, 2, 3)]
    assert {(c.phase, c.start, c.end) for c in plotted} == {(0, 0.0, 0.5), (1, 0.5, 1.0)}
    check_png(tmp_path / "plots" / "schedule.png")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    text = ModelCard.load(tmp_path / "out" / "README.md").text
    assert [line for line in text.splitlines() if line.startswith(("| prepend", "| settle"))] == [
        "| prepend | 0–1 | 0.00–0.50 | 0–4 | stacks 0 | grow identity at bottom, full (trunk frozen) | "
        "2.0e-05 constant, warm-up 0.1 |",
        "| settle | 2–3 | 0.50–1.00 | 0–4 | stacks 0, 1 | full (trunk frozen) | 1.0e-05 cosine |",
    ]
    assert "the schedule grows it to 5 stacks over 5 blocks" in text


def test_plot_refuses_non_runs_and_runs_without_logs(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "is not an hf_stackwise run" in capsys.readouterr().err
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "stackwise_run.json").write_text(
        json.dumps({"format_version": 1, "schedule": [{"until": 1.0}], "rack": {"boundaries": [0, 4]}})
    )
    assert main(["plot", str(run)]) == 2
    assert "no trainer_state.json yet" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["stackwise_run.json"]  # nothing written
