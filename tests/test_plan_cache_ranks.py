"""`plan --world-size N` predicts the activation cache's hit rate per rank under DDP (one store per rank): checked
against torch's DistributedSampler dealing rows to ranks epoch after epoch, and against the page's rule of thumb."""

from __future__ import annotations

import pytest
from torch.utils.data import DistributedSampler

from hf_stackwise.cache.policy import PhaseCache, per_rank_hit_rates


def cached_phase(visits: float, hit_rate: float, index: int = 0) -> PhaseCache:
    return PhaseCache(
        index=index, on=True, cut=2, cut_stacks=1, prefix=(0, 1), visits=visits, hit_rate=hit_rate, seq_length=8
    )


def simulated_hit_rate(rows: int, world: int, epochs: int) -> float:
    """Every rank keeps its own store; DistributedSampler (shuffled, reseeded each epoch) deals the rows."""
    stores = [set() for _ in range(world)]
    hits = visits = 0
    for epoch in range(epochs):
        for rank in range(world):
            sampler = DistributedSampler(range(rows), num_replicas=world, rank=rank, shuffle=True, seed=0)
            sampler.set_epoch(epoch)
            for row in sampler:
                hits += row in stores[rank]
                visits += 1
                stores[rank].add(row)
    return hits / visits


@pytest.mark.parametrize("epochs", [2, 3, 5])
def test_per_rank_hit_rate_matches_the_sampler_with_the_same_global_batch(epochs):
    """Same global batch on 2 ranks: each row comes `epochs` times in all, to a rank drawn afresh each epoch."""
    one_process = 1 - 1 / epochs
    [predicted] = per_rank_hit_rates([cached_phase(epochs, one_process)], 2, same_global_batch=True)
    assert predicted == pytest.approx(simulated_hit_rate(2000, 2, epochs), abs=0.02)
    assert predicted < one_process


def test_the_second_epoch_hits_one_row_in_n():
    """The cache page: with N ranks the second epoch hits about 1/N of its rows; over two epochs, 1/(2N)."""
    for world in (2, 4):
        [predicted] = per_rank_hit_rates([cached_phase(2.0, 0.5)], world, same_global_batch=True)
        assert predicted == pytest.approx(1 / (2 * world))


def test_with_the_per_device_batch_each_rank_sees_n_times_the_rows_and_off_phases_stay_off():
    """The recipe's per-device batch on N ranks: N times the rows per step, so every row comes N times as often."""
    off = PhaseCache(index=1, on=False, cut=2, cut_stacks=1, prefix=(0, 1), visits=3.0, seq_length=8)
    predicted, nothing = per_rank_hit_rates([cached_phase(1.5, 1 / 3), off], 2)
    assert predicted == pytest.approx(simulated_hit_rate(2000, 2, 3), abs=0.02)  # 1.5 visits x 2 ranks
    assert nothing is None
    assert per_rank_hit_rates([cached_phase(1.5, 1 / 3)], 1) == [1 / 3]  # one rank: the one-process figure
