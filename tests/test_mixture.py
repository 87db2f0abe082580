"""Per-phase mixtures: proportions per phase, positions map to steps, rows without repeats inside a pass,
and the same stream with any number of DataLoader workers."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from hf_stackwise.data.mixture import MixtureDataset


def source(tag: int, rows: int) -> Dataset:
    return Dataset.from_dict({"input_ids": [[tag, i] for i in range(rows)]})


@pytest.fixture(scope="module")
def mixture():
    sources = {"general": source(0, 700), "domain": source(1, 300)}
    phases = [(10, {"general": 1.0}), (30, {"general": 0.7, "domain": 0.3}), (40, {"general": 1, "domain": 3})]
    return MixtureDataset(sources, phases, samples_per_step=64, total_steps=40, seed=0)


def test_mixture_proportions_per_phase(mixture):
    assert len(mixture) == 40 * 64
    for (start, end), expected in [((0, 10), 0.0), ((10, 30), 0.3), ((30, 40), 0.75)]:
        picks = [mixture.source_of(i) for i in range(start * 64, end * 64)]
        share = picks.count("domain") / len(picks)
        tolerance = 4 * math.sqrt(max(expected * (1 - expected), 1e-9) / len(picks))
        assert abs(share - expected) <= tolerance, (start, share)
        assert mixture.weights_at(start) == pytest.approx({"general": 1 - expected, "domain": expected})
    assert mixture[0]["input_ids"][0] == 0  # phase 0 reads only `general`


def test_positions_map_to_steps_and_rows_do_not_repeat_within_a_pass(mixture):
    assert [mixture.step_of(i) for i in (0, 63, 64, 2559)] == [0, 0, 1, 39]
    rows = [(name, mixture.row_of(name, i)) for i in range(700) for name in [mixture.source_of(i)]]
    general = [r for n, r in rows if n == "general"]
    assert len(general) == len(set(general))  # 700 positions = one pass over `general`: no row twice
    items = [tuple(mixture[i]["input_ids"]) for i in range(64 * 12, 64 * 14)]
    again = MixtureDataset(mixture.sources, [(10, {"general": 1.0}), (30, {"general": 0.7, "domain": 0.3})], 64, 40)
    assert items == [tuple(again[i]["input_ids"]) for i in range(64 * 12, 64 * 14)]  # pure function of position


def test_same_stream_with_0_and_2_workers(mixture):
    def stream(workers):
        loader = torch.utils.data.DataLoader(
            mixture, batch_size=16, num_workers=workers, collate_fn=lambda rows: [r["input_ids"] for r in rows]
        )
        out = []
        for index, rows in enumerate(loader):
            out.extend(rows)
            if index == 40:
                break
        return out

    assert stream(0) == stream(2)
