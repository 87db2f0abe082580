"""`plan --world-size N` predicts the activation cache's hit rate per rank under DDP (one store per node shared by
its ranks, or one per rank): checked against torch's DistributedSampler dealing rows to ranks epoch after epoch,
and against the page's rule of thumb."""

from __future__ import annotations

import pytest
from torch.utils.data import DistributedSampler

from hf_stackwise.cache.policy import PhaseCache, per_rank_hit_rates


def cached_phase(visits: float, hit_rate: float, index: int = 0) -> PhaseCache:
    return PhaseCache(
        index=index, on=True, cut=2, cut_stacks=1, prefix=(0, 1), visits=visits, hit_rate=hit_rate, seq_length=8
    )


def simulated_hit_rate(rows: int, world: int, epochs: int, nodes: int | None = None) -> float:
    """Every rank keeps its own store (``nodes`` given: the ranks of a node, consecutive, share one);
    DistributedSampler (shuffled, reseeded each epoch) deals the rows. A row stored in an epoch serves the next."""
    nodes = world if nodes is None else nodes
    stores = [set() for _ in range(nodes)]
    hits = visits = 0
    for epoch in range(epochs):
        dealt = []
        for rank in range(world):
            sampler = DistributedSampler(range(rows), num_replicas=world, rank=rank, shuffle=True, seed=0)
            sampler.set_epoch(epoch)
            store = stores[rank * nodes // world]
            hits += sum(row in store for row in sampler)
            visits += len(sampler)
            dealt.append((store, list(sampler)))
        for store, rows_seen in dealt:
            store.update(rows_seen)
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


@pytest.mark.parametrize("world", [2, 4])
def test_a_node_store_hits_as_one_process_with_the_same_global_batch(world):
    """One node: its ranks share one store, so a row stored in an epoch hits in the next, whichever rank gets it."""
    one_process = 1 - 1 / 3
    [predicted] = per_rank_hit_rates([cached_phase(3, one_process)], world, same_global_batch=True, stores=1)
    assert predicted == one_process == pytest.approx(simulated_hit_rate(2000, world, 3, nodes=1))
    [per_device] = per_rank_hit_rates([cached_phase(1.5, 1 / 3)], 2, stores=1)  # 1.5 visits x 2 ranks: 3 epochs
    assert per_device == pytest.approx(simulated_hit_rate(2000, 2, 3, nodes=1))


def test_several_nodes_each_keep_a_store():
    """4 ranks on 2 nodes: a row hits where the node that gets it stored it before (as 2 ranks with a store each)."""
    [predicted] = per_rank_hit_rates([cached_phase(3, 2 / 3)], 4, same_global_batch=True, stores=2)
    assert predicted == pytest.approx(simulated_hit_rate(2000, 4, 3, nodes=2), abs=0.02)
    assert predicted == pytest.approx(per_rank_hit_rates([cached_phase(3, 2 / 3)], 2, same_global_batch=True)[0])
