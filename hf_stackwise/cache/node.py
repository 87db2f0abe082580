"""One activation store per node under DDP: every rank of the node reads the rows any of them stored.

**Layout.** Each rank writes only its own *segment* (memory-mapped files under ``cache.dir``, named
``...-<identity>-rank<r>[-w<k>]``, held under its ``flock`` like a one-process store) and reads the segments of the
other ranks of its node (same host, same folder) read-only. No two processes ever write the same file, so no
cross-process lock is needed.

**Write order.** A segment slot is written as in :class:`~hf_stackwise.cache.store.ActivationStore` (fingerprint
cleared, data, checksum) and then *stamped* with the optimizer step that wrote it, before the fingerprint publishes
it. A rank accepts another rank's slot only if it was stamped at an earlier step than the one it is running: DDP's
gradient all-reduce at the end of every step waits for every rank's forwards of that step, so such a slot is
complete. Which rows a rank finds is therefore a function of the data order and the step alone, never of which
rank ran ahead (the hit pattern of a run is reproducible), and the replayed rows are bitwise the rows the prefix
computes (any rank's forward of a row is the same function of the same frozen weights and inputs). A rank's own
slots are visible at once, as in one process. After copying another rank's rows the reader checks their
fingerprints and stamps again (a slot that rank rewrote meanwhile, e.g. for a row with new padding, makes the
micro-batch a miss, never a mix).

**Identity.** The segments of one store share its name (the run identity and the prefix); the node's ranks take
the same writer index ``k`` together (the lowest at which every rank gets its lock), so a second run on the same
``cache.dir`` moves all its ranks to other files and never reads the first one's. At each sign (phase start,
freeze) every rank signs its own segment, waits for the others (a barrier), then reads only segments whose header
carries the same signature.
"""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import torch

from .policy import FINGERPRINT_BYTES
from .store import DTYPES, INT_OF_SIZE, MAX_WRITERS, ActivationStore, try_lock, unlock

STAMP = np.int64  # per slot of a segment: the optimizer step that wrote it


class Segment(ActivationStore):
    """One rank's part of a node store: an :class:`ActivationStore` whose slots also carry the step that wrote them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stamps: np.ndarray | None = None

    def sign(self, signature: str) -> None:
        super().sign(signature)
        if self.stamps is None:  # fresh (a reload maps it in _reload)
            self.stamps = self._array("step", (self.slots,), STAMP, fresh=True)

    def _sizes_ok(self, itemsize: int) -> bool:
        try:
            stamps_ok = os.path.getsize(f"{self.path}.step") == self.slots * np.dtype(STAMP).itemsize
        except OSError:
            return False
        return stamps_ok and super()._sizes_ok(itemsize)

    def _reload(self, signature: str) -> bool:
        if not super()._reload(signature):
            return False
        self.stamps = self._array("step", (self.slots,), STAMP, fresh=False)
        return True

    def _stamp(self, slots: np.ndarray) -> None:
        self.stamps[slots] = self.now

    def close(self) -> None:
        if isinstance(self.stamps, np.memmap):
            self.stamps.flush()
        super().close()


class Peer:
    """Another rank's segment, read-only: fingerprints and stamps mapped at sign, the data at its first hit."""

    def __init__(self, path: str, slots: int, shape: tuple[int, int, int]):
        self.path, self.shape = path, shape
        self.fp = np.memmap(f"{path}.fp", np.uint8, mode="r", shape=(slots, FINGERPRINT_BYTES))
        self.stamps = np.memmap(f"{path}.step", STAMP, mode="r", shape=(slots,))
        self.data: np.ndarray | None = None
        self.dtype: torch.dtype | None = None

    @classmethod
    def open(cls, path: str, signature: str, slots: int, shape: tuple[int, int, int]) -> Peer | None:
        """The segment at ``path`` if its header carries this signature and shape and its files are whole."""
        header = _header(path)
        if header is None or header.get("signature") != signature:
            return None
        if [header.get(k) for k in ("slots", "seq_length", "hidden")] != [slots, *shape[1:]]:
            return None
        sizes = {"fp": slots * FINGERPRINT_BYTES, "step": slots * np.dtype(STAMP).itemsize}
        try:
            if any(os.path.getsize(f"{path}.{name}") != size for name, size in sizes.items()):
                return None
        except OSError:
            return None
        return cls(path, slots, shape)

    def visible(self, slots: np.ndarray, fps: np.ndarray, now: int) -> np.ndarray:
        """Per row: the slot holds this row, stamped at a step before ``now`` (so complete)."""
        return (self.fp[slots] == fps).all(axis=1) & (self.stamps[slots] < now)

    def rows(self) -> np.ndarray | None:
        """The mapped data (mapped at the first hit: its header names the dtype by then), or None if unreadable."""
        if self.data is None:
            header = _header(self.path) or {}
            dtype = DTYPES.get(header.get("dtype"))
            if dtype is None:
                return None
            size = int(np.prod(self.shape)) * dtype.itemsize
            try:
                if os.path.getsize(f"{self.path}.data") != size:
                    return None
            except OSError:
                return None
            self.dtype = dtype
            self.data = np.memmap(f"{self.path}.data", INT_OF_SIZE[dtype.itemsize], mode="r", shape=self.shape)
        return self.data


def _header(path: str) -> dict | None:
    try:
        with open(f"{path}.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class NodeStore:
    """The store of one cut shared by the ranks of a node: this rank's :class:`Segment` and its peers' segments.
    Same interface as :class:`ActivationStore` for the replay (``match``, ``read``, ``write``, ``sign``)."""

    def __init__(self, own: Segment, peer_paths: list[str]):
        self.own, self.peer_paths = own, peer_paths
        self.peers: list[Peer] = []
        self.now = 0
        self._found: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    key = property(lambda self: self.own.key)
    slots = property(lambda self: self.own.slots)
    seq_length = property(lambda self: self.own.seq_length)
    hidden = property(lambda self: self.own.hidden)
    path = property(lambda self: self.own.path)
    signature = property(lambda self: self.own.signature)
    nbytes = property(lambda self: self.own.nbytes)  # the rows this rank stored

    @property
    def dtype(self) -> torch.dtype | None:
        return self.own.dtype or next((p.dtype for p in self.peers if p.dtype is not None), None)

    @property
    def repaired(self) -> int:
        return self.own.repaired

    @repaired.setter
    def repaired(self, value: int) -> None:
        self.own.repaired = value

    @property
    def data(self):
        """Not None once any segment may hold rows (the replay's cheap test before a lookup)."""
        return self.own.data if self.own.data is not None or not self.peers else self.peers

    def sign(self, signature: str) -> None:
        """Sign this rank's segment, wait for every rank to sign theirs, then read the peers that match."""
        import torch.distributed as dist

        self.own.sign(signature)
        dist.barrier()
        shape = (self.own.slots, self.own.seq_length, self.own.hidden)
        peers = (Peer.open(path, signature, self.own.slots, shape) for path in self.peer_paths)
        self.peers = [p for p in peers if p is not None]

    def match(self, slots: np.ndarray, fps: np.ndarray) -> np.ndarray:
        """Per row: found in this rank's segment, or in a peer's stamped before the current step."""
        found = np.where(self.own.match(slots, fps), 0, -1)
        for i, peer in enumerate(self.peers, start=1):
            left = found < 0
            if not left.any():
                break
            found[left & peer.visible(slots, fps, self.now)] = i
        self._found = (slots.copy(), fps.copy(), found)
        return found >= 0

    def read(self, slots: np.ndarray, length: int, device) -> torch.Tensor | None:
        """The rows :meth:`match` found; None if a peer's slot changed while it was copied (or is unreadable)."""
        if self._found is None or not np.array_equal(self._found[0], slots):
            return None  # only after a match of these rows
        _, fps, found = self._found
        if (found < 0).any():
            return None
        used = sorted(set(found.tolist()))
        sources = {s: self.own.data if s == 0 else self.peers[s - 1].rows() for s in used}
        dtypes = {self.own.dtype if s == 0 else self.peers[s - 1].dtype for s in used}
        if any(v is None for v in sources.values()) or len(dtypes) != 1:
            return None
        (dtype,) = dtypes
        out = np.empty((len(slots), length, self.own.hidden), INT_OF_SIZE[dtype.itemsize])
        for s in used:
            rows = found == s
            out[rows] = sources[s][slots[rows], :length]
        for s in used:  # the peers' slots again: unchanged while copied (seqlock-style check)
            rows = found == s
            if s and not self.peers[s - 1].visible(slots[rows], fps[rows], self.now).all():
                return None
        return torch.from_numpy(out).view(dtype).to(device)

    def write(self, slots: np.ndarray, fps: np.ndarray, hidden: torch.Tensor) -> None:
        self.own.now = self.now
        self.own.write(slots, fps, hidden)

    def close(self) -> None:
        self.own.close()


def open_node_store(key, slots: int, seq_length: int, hidden: int, stem: str, rank: int, reload: bool) -> NodeStore:
    """This rank's segment of the store named ``stem`` (``<folder>/<prefix>-<identity>``), with the node's peers.
    Every rank calls it at the same point (a collective): the ranks take the lowest writer index at which each gets
    its segment's lock, so they never write into, nor read, the files another run holds."""
    import torch.distributed as dist

    where = (socket.gethostname(), os.path.realpath(os.path.dirname(stem)))
    world = dist.get_world_size()
    for writer in range(MAX_WRITERS):
        suffix = f"-w{writer}" if writer else ""
        path = f"{stem}-rank{rank}{suffix}"
        fd = try_lock(path)
        everyone: list = [None] * world
        dist.all_gather_object(everyone, (*where, fd is not None))
        if all(got for *_, got in everyone):
            own = Segment(key, slots, seq_length, hidden, path)
            own._lock, own.reload = fd, reload
            node = [r for r, (*w, _) in enumerate(everyone) if r != rank and tuple(w) == where]
            peers = [f"{stem}-rank{r}{suffix}" for r in node]
            return NodeStore(own, peers)
        if fd is not None:
            unlock(fd)
    raise RuntimeError(f"cache.dir: {MAX_WRITERS} runs hold stores named {os.path.basename(stem)} already")
