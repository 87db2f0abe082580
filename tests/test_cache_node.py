"""One activation store per node under DDP (`hf_stackwise.cache.node`): every rank reads the rows any rank of the
node stored, the replay stays bitwise exact, a rank never reads a slot another rank has not finished, and a second
run on the same `cache.dir` never shares files with the first."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from hf_stackwise.cache.node import NodeStore, Peer, Segment
from hf_stackwise.cache.store import fingerprints, try_lock, unlock

ROWS, EPOCHS = 16, 3  # tests/cache_ddp_worker.py: 16 rows, 12 steps of global batch 4


def load(folder):
    return [(torch.load(folder / f"rank{r}.pt"), json.loads((folder / f"rank{r}.json").read_text())) for r in (0, 1)]


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """One 2-rank run without the cache, one with it, and a second cached run on the first one's cache.dir with the
    first one's files poisoned (every stored bit flipped, fingerprints and stamps intact: reading any of them would
    change the second run's losses) and rank 1's segment still held (its lock), as by a run still going: rank 0
    could take its old file name, but the node's ranks must move to the next name together."""
    from test_ddp import torchrun

    root = tmp_path_factory.mktemp("node-store")
    for name in ("off", "on", "again"):
        (root / name).mkdir()
    torchrun("cache_ddp_worker.py", str(root / "off"), "off")
    torchrun("cache_ddp_worker.py", str(root / "on"), "on")
    first = [log["stores"] for _, log in load(root / "on")]
    for (path,) in first:
        data = np.memmap(f"{path}.data", np.int32, mode="r+")
        data[:] = ~data
        data.flush()
        del data
    held = [try_lock(first[1][0])]
    before = {p: open(p, "rb").read() for (s,) in first for p in (f"{s}.data", f"{s}.fp", f"{s}.step")}
    try:
        torchrun("cache_ddp_worker.py", str(root / "again"), "on", "2", str(root / "on" / "activation-cache"))
    finally:
        for fd in held:
            if fd is not None:
                unlock(fd)
    after = {p: open(p, "rb").read() for p in before}
    return {
        "off": load(root / "off"),
        "on": load(root / "on"),
        "again": load(root / "again"),
        "held": held,
        "first": first,
        "unchanged": before == after,
    }


@pytest.mark.slow
@pytest.mark.parametrize("run", ["on", "again"])
def test_two_ranks_with_a_node_store_train_bitwise_like_without_the_cache(launches, run):
    for rank in (0, 1):
        (off, off_log), (on, on_log) = launches["off"][rank], launches[run][rank]
        assert on_log["world"] == 2 and on_log["losses"] == off_log["losses"]
        for key, value in off["model"].items():
            assert torch.equal(value, on["model"][key]), (rank, key)
        for index, state in off["optimizer"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(on["optimizer"][index][name]))


@pytest.mark.slow
def test_each_rank_hits_as_one_process_does_and_each_row_is_stored_once(launches):
    """One process on the same phase (global batch 4, 3 reshuffled epochs over 16 rows) misses a row's first visit
    and hits the two later ones: (EPOCHS - 1) / EPOCHS. With per-rank stores the measured rate was 0.375."""
    for _, log in launches["on"]:
        assert log["cache"]["rows"] == ROWS * EPOCHS // 2
        assert log["cache"]["hits"] == ROWS * (EPOCHS - 1) // 2  # per rank: 2/3, one process's rate
    filled = []
    for (path,) in launches["on"][0][1]["stores"], launches["on"][1][1]["stores"]:
        fp = np.fromfile(f"{path}.fp", np.uint8).reshape(ROWS, -1)
        filled.append(set(np.flatnonzero(fp.any(axis=1)).tolist()))
    assert filled[0].isdisjoint(filled[1]) and filled[0] | filled[1] == set(range(ROWS))


@pytest.mark.slow
def test_a_second_run_on_the_same_cache_dir_gets_its_own_files(launches):
    """Every rank of the second run moved to the next writer index together (`-w1`, though only rank 1's old files
    were held), and the first run's files were neither read (the training above is bitwise the uncached one) nor
    written."""
    assert all(fd is not None for fd in launches["held"])
    for rank, (_, log) in enumerate(launches["again"]):
        (path,) = log["stores"]
        (first,) = launches["first"][rank]
        assert path == f"{first}-w1" and first.endswith(f"-rank{rank}")
        assert log["cache"]["hits"] == ROWS * (EPOCHS - 1) // 2
    assert launches["unchanged"]


def segment(tmp_path, rank: int, signature: str = "sig") -> Segment:
    store = Segment(("key",), 8, 4, 3, str(tmp_path / f"store-rank{rank}"))
    store.sign(signature)
    return store


def node_of_two(tmp_path) -> tuple[NodeStore, Segment]:
    """Rank 0's view of a node store (its own segment and rank 1's), and rank 1's segment, on the same files as two
    processes would have them."""
    own, other = segment(tmp_path, 0), segment(tmp_path, 1)
    node = NodeStore(own, [other.path])
    node.peers = [Peer.open(other.path, "sig", 8, (8, 4, 3))]
    return node, other


def rows_of(seed: int, n: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (n, 4), generator=g)
    return fingerprints({"input_ids": ids}), torch.randn(n, 4, 3, generator=g)


def test_a_slot_of_another_rank_is_seen_from_the_next_step_on_and_replays_its_bits(tmp_path):
    node, other = node_of_two(tmp_path)
    slots = np.array([2, 5])
    fps, hidden = rows_of(0)
    other.now = 7
    other.write(slots, fps, hidden)
    node.now = 7  # the step that wrote it: the other rank may still be writing
    assert not node.match(slots, fps).any()
    node.now = 8  # after the step's all-reduce
    assert node.match(slots, fps).all()
    assert torch.equal(node.read(slots, 4, "cpu"), hidden)
    assert not node.match(slots, rows_of(1)[0]).any()  # other inputs: a miss
    own_fps, own_hidden = rows_of(2)
    node.write(np.array([3, 4]), own_fps, own_hidden)  # this rank's own slots: visible at once
    assert node.match(np.array([3, 4]), own_fps).all()
    mixed = np.array([2, 3])
    assert node.match(mixed, np.stack([fps[0], own_fps[0]])).all()
    assert torch.equal(node.read(mixed, 4, "cpu"), torch.stack([hidden[0], own_hidden[0]]))


@pytest.mark.parametrize("meanwhile", ["cleared", "rewritten"])
def test_a_slot_changed_while_it_is_copied_is_never_replayed(tmp_path, meanwhile):
    """The writer clears a slot's fingerprint before it writes the data: a reader that found the slot and then sees
    it changed (cleared mid-write, or rewritten in this step) returns nothing, never a mix."""
    node, other = node_of_two(tmp_path)
    slots = np.array([1, 6])
    fps, hidden = rows_of(0)
    other.now = 2
    other.write(slots, fps, hidden)
    node.now = 4
    assert node.match(slots, fps).all()
    if meanwhile == "cleared":
        other.fp[6] = 0
    else:
        other.now = 4
        other.write(slots[1:], rows_of(3, 1)[0], rows_of(3, 1)[1])
    assert node.read(slots, 4, "cpu") is None


def test_a_segment_signed_by_another_prefix_is_not_read(tmp_path):
    other = segment(tmp_path, 1, "another prefix")
    assert Peer.open(other.path, "sig", 8, (8, 4, 3)) is None
    assert Peer.open(other.path, "another prefix", 8, (8, 4, 3)) is not None
    assert Peer.open(other.path, "another prefix", 9, (9, 4, 3)) is None  # another shape


@pytest.mark.parametrize("how", ["recipe", "accelerate config"])
def test_the_cache_under_fsdp2_is_refused_before_any_weight_loads_pointing_to_ddp(
    tmp_path, tiny_llama_dir, pydoc_files, monkeypatch, how
):
    """FSDP2 gathers each block's shards with every rank, so a rank skipping the prefix would stall the others: with
    `activations: true` the recipe is refused before any weight loads, however FSDP2 is asked for."""
    from conftest import tiny_recipe, write_recipe

    from hf_stackwise.cli.pipeline import check_recipe
    from hf_stackwise.errors import RecipeError
    from hf_stackwise.recipe.loader import load_recipe

    top = [{"name": "top", "until": 1.0, "train": "top", "head": "train"}]
    fsdp = {"fsdp": True, "fsdp_config": {"version": 2}} if how == "recipe" else {}
    raw = tiny_recipe(tmp_path, tiny_llama_dir, pydoc_files[0], top, **fsdp)
    raw["cache"] = {"activations": True}
    if how != "recipe":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        monkeypatch.setenv("FSDP_VERSION", "2")
        monkeypatch.setenv("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT")
    with pytest.raises(RecipeError, match=r"schedule\[0\]: training.fsdp: under FSDP2 .* under DDP, where the ranks"):
        check_recipe(load_recipe(write_recipe(tmp_path, raw)))
    assert not os.path.exists(raw["training"]["output_dir"])


def test_a_resumed_rank_reloads_its_segment_with_the_steps_that_wrote_it(tmp_path):
    """A resumed run reloads its segment (stamps included, so the other ranks' rule still holds); a stamp file of the
    wrong size makes it rebuild the segment empty rather than trust it."""
    first = segment(tmp_path, 1)
    fps, hidden = rows_of(0)
    first.now = 5
    first.write(np.array([0, 7]), fps, hidden)
    first.close()
    again = Segment(("key",), 8, 4, 3, first.path)
    again.reload = True
    again.sign("sig")
    assert again.match(np.array([0, 7]), fps).all() and again.stamps[[0, 7]].tolist() == [5, 5]
    again.close()
    with open(f"{first.path}.step", "ab") as f:
        f.write(b"\0" * 8)
    rebuilt = Segment(("key",), 8, 4, 3, first.path)
    rebuilt.reload = True
    rebuilt.sign("sig")
    assert not rebuilt.match(np.array([0, 7]), fps).any()
