"""One activation store: hidden states at one cut, one slot per (row, piece), in RAM or in memory-mapped files.

**Trust.** Each slot keeps a 16-byte BLAKE2b fingerprint of the inputs the prefix read; a slot serves a row only
when the fingerprint matches, so a stale slot is a miss. A store is signed by the prefix's parameter checksums and
the run's identity (:func:`run_identity`: model config, parameter and compute dtype, attention implementation,
library versions); a signature change empties it. A file-backed store also:

- is named after the identity and held under an exclusive ``flock`` for as long as its run uses it; a second run
  sharing ``cache.dir`` at the same time gets its own files (``...-w1``), never the first one's slots;
- starts empty in a fresh run (files truncated under the lock); only a resumed run reloads it;
- keeps a per-slot checksum of the data written (zero the fingerprint, write the data, then the checksum, then the
  fingerprint), and on reload checks every file's size *before* mapping it (``np.memmap(mode="r+")`` would extend a
  short file with zeros) and every filled slot's checksum: a damaged store is rebuilt, a torn slot is a miss.

Under DDP each rank's store is one segment of a node store (:mod:`~hf_stackwise.cache.node`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os

import numpy as np
import torch

from .policy import FINGERPRINT_BYTES

FINGERPRINTED = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
INT_OF_SIZE = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}
TORCH_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}
SUM_BYTES = 8  # per slot of a file-backed store: a BLAKE2b digest of the slot's data
MAX_WRITERS = 64


def fingerprints(inputs: dict) -> np.ndarray:
    """``[rows, 16]`` uint8: a BLAKE2b digest per row of everything the prefix reads."""
    present = [k for k in FINGERPRINTED if isinstance(inputs.get(k), torch.Tensor)]
    parts = [inputs[k].detach().cpu().contiguous().numpy() for k in present]
    rows = parts[0].shape[0]
    out = np.empty((rows, FINGERPRINT_BYTES), np.uint8)
    for r in range(rows):
        h = hashlib.blake2b(digest_size=FINGERPRINT_BYTES)
        for key, part in zip(present, parts, strict=True):
            h.update(key.encode() + str(part[r].shape).encode() + str(part.dtype).encode())
            h.update(part[r].tobytes())
        out[r] = np.frombuffer(h.digest(), np.uint8)
    return out


def run_identity(config, param_dtype, compute: str) -> dict:
    """What, besides the prefix weights, decides the hidden state at a cut: ``compute`` names the mixed precision
    (``"no"``, ``"bf16"``, ``"fp16"``)."""
    from importlib.metadata import PackageNotFoundError, version

    import numpy
    import transformers

    try:
        ours = version("hf_stackwise")
    except PackageNotFoundError:
        ours = "unknown"

    text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(config)
    return {
        "config": hashlib.blake2b(text.encode(), digest_size=8).hexdigest(),
        "param_dtype": str(param_dtype),
        "compute": compute,
        "attention": str(getattr(config, "_attn_implementation", None)),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": numpy.__version__,
            "hf_stackwise": ours,
        },
    }


def identity_key(identity: dict) -> str:
    return hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=6).hexdigest()


def try_lock(path: str) -> int | None:
    """The open descriptor of ``path.lock`` held under an exclusive ``flock``, or None while another holds it."""
    fd = os.open(f"{path}.lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _slot_sum(raw: np.ndarray) -> np.ndarray:
    digest = hashlib.blake2b(np.ascontiguousarray(raw).tobytes(), digest_size=SUM_BYTES).digest()
    return np.frombuffer(digest, np.uint8)


class ActivationStore:
    """Hidden states at one cut, one slot per (row, piece), with per-slot input fingerprints."""

    def __init__(self, key: tuple, slots: int, seq_length: int, hidden: int, path: str | None = None):
        self.key, self.slots, self.seq_length, self.hidden, self.path = key, slots, seq_length, hidden, path
        self.signature: str | None = None
        self.dtype: torch.dtype | None = None
        self.data: np.ndarray | None = None
        self.fp = np.zeros((slots, FINGERPRINT_BYTES), np.uint8)  # a file-backed store maps its file in sign()
        self.sums: np.ndarray | None = None
        self.reload = False  # a resumed run may reload the files; a fresh one starts them empty
        self.repaired = 0  # slots found torn on reload (made misses)
        self.now = 0  # the optimizer step the current micro-batch belongs to (a node store's segments stamp it)
        self._lock: int | None = None

    @classmethod
    def open(cls, key, slots, seq_length, hidden, base: str) -> ActivationStore:
        """A file-backed store at ``base`` or, while another run holds it, at ``base-w1``, ``base-w2``, ..."""
        for writer in range(MAX_WRITERS):
            path = base if writer == 0 else f"{base}-w{writer}"
            fd = try_lock(path)
            if fd is None:
                continue
            store = cls(key, slots, seq_length, hidden, path)
            store._lock = fd
            return store
        raise RuntimeError(f"cache.dir: {MAX_WRITERS} runs hold stores named {os.path.basename(base)} already")

    def close(self) -> None:
        """Flush the files and release the lock (the rows stay readable in this process)."""
        for array in (self.data, self.fp, self.sums):
            if isinstance(array, np.memmap):
                array.flush()
        if self._lock is not None:
            unlock(self._lock)
            self._lock = None

    def _array(self, name: str, shape, dtype, fresh: bool) -> np.ndarray:
        if self.path is None:
            return np.zeros(shape, dtype)
        return np.memmap(f"{self.path}.{name}", dtype=dtype, mode="w+" if fresh else "r+", shape=shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the rows stored so far (hidden states and fingerprints)."""
        filled = int(np.count_nonzero(self.fp.any(axis=1)))
        itemsize = self.dtype.itemsize if self.dtype is not None else 0
        return filled * (self.seq_length * self.hidden * itemsize + FINGERPRINT_BYTES)

    def sign(self, signature: str) -> None:
        """Keep the rows if this exact prefix computed them (or reload them from disk), else empty the store."""
        if signature == self.signature:
            return
        if self.path is not None and self.signature is None:
            if self.reload and self._reload(signature):
                return
            self.fp = self._array("fp", (self.slots, FINGERPRINT_BYTES), np.uint8, fresh=True)
            self.sums = self._array("sum", (self.slots, SUM_BYTES), np.uint8, fresh=True)
            self.data = None  # a fresh file is created (truncated) at the first write
        self.fp[:] = 0
        self.signature = signature
        self._write_header()

    def _header(self) -> dict:
        return {
            "signature": self.signature,
            "slots": self.slots,
            "seq_length": self.seq_length,
            "hidden": self.hidden,
            "dtype": str(self.dtype) if self.dtype is not None else None,
        }

    def _write_header(self) -> None:
        """Atomically (a new file renamed over the old): the other ranks of a node store read it while it changes."""
        if self.path is not None:
            with open(f"{self.path}.json.tmp", "w") as f:
                json.dump(self._header(), f)
            os.replace(f"{self.path}.json.tmp", f"{self.path}.json")

    def _sizes_ok(self, itemsize: int) -> bool:
        """Every file exactly as long as the header says (checked before mapping: r+ would extend a short file)."""
        expected = {
            "fp": self.slots * FINGERPRINT_BYTES,
            "sum": self.slots * SUM_BYTES,
            "data": self.slots * self.seq_length * self.hidden * itemsize,
        }
        try:
            return all(os.path.getsize(f"{self.path}.{name}") == size for name, size in expected.items())
        except OSError:
            return False

    def _reload(self, signature: str) -> bool:
        try:
            with open(f"{self.path}.json") as f:
                header = json.load(f)
        except (OSError, ValueError):
            return False
        expected = {"signature": signature, "slots": self.slots, "seq_length": self.seq_length, "hidden": self.hidden}
        if any(header.get(k) != v for k, v in expected.items()) or header.get("dtype") not in DTYPES:
            return False
        dtype = DTYPES[header["dtype"]]
        if not self._sizes_ok(dtype.itemsize):
            return False  # short, truncated or grown: rebuilt
        self.signature, self.dtype = signature, dtype
        self.fp = self._array("fp", (self.slots, FINGERPRINT_BYTES), np.uint8, fresh=False)
        self.sums = self._array("sum", (self.slots, SUM_BYTES), np.uint8, fresh=False)
        self.data = self._array("data", self._data_shape(), INT_OF_SIZE[dtype.itemsize], fresh=False)
        for slot in np.flatnonzero(self.fp.any(axis=1)):  # torn slots (data not what was written): misses
            if not np.array_equal(_slot_sum(self.data[slot]), self.sums[slot]):
                self.fp[slot] = 0
                self.repaired += 1
        return True

    def _stamp(self, slots: np.ndarray) -> None:
        """Mark freshly written slots before their fingerprints publish them (a node store's segment: the step)."""

    def _data_shape(self) -> tuple[int, int, int]:
        return (self.slots, self.seq_length, self.hidden)

    def match(self, slots: np.ndarray, fps: np.ndarray) -> np.ndarray:
        """Per row: whether its slot holds this row's hidden state."""
        if self.data is None:
            return np.zeros(len(slots), bool)
        return (self.fp[slots] == fps).all(axis=1)

    def read(self, slots: np.ndarray, length: int, device) -> torch.Tensor | None:
        """The stored hidden states of rows :meth:`match` found (None: one changed since; a node store's peer)."""
        raw = torch.from_numpy(np.ascontiguousarray(self.data[slots, :length]))
        return raw.view(self.dtype).to(device)

    def write(self, slots: np.ndarray, fps: np.ndarray, hidden: torch.Tensor) -> None:
        if hidden.shape[1] > self.seq_length or hidden.shape[-1] != self.hidden:
            return  # a row longer than the store's rows is never cached (always a miss)
        if self.data is None:
            self.dtype = hidden.dtype
            self.data = self._array("data", self._data_shape(), INT_OF_SIZE[self.dtype.itemsize], fresh=True)
            self._write_header()
        raw = hidden.detach().to(self.dtype).contiguous().view(TORCH_INT_OF_SIZE[self.dtype.itemsize]).cpu().numpy()
        self.fp[slots] = 0  # a slot being rewritten serves nothing until its fingerprint is back
        self.data[slots, : hidden.shape[1]] = raw
        if self.sums is not None:
            for slot in slots:
                self.sums[slot] = _slot_sum(self.data[slot])
        self._stamp(slots)
        self.fp[slots] = fps  # last: a fingerprint never points at a half-written slot
