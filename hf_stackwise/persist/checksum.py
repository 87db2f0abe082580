"""Exact change detection for frozen tensors: checksums over their raw bytes, in chunks, on their own device.

A tensor's bytes are read as signed 32-bit words ``w_i`` (a final partial word is padded with zero bytes) and
three sums are kept modulo 2**64: ``Σ w_i``, ``Σ i·w_i`` and ``Σ m(w_i)²``, with ``i`` the word's position in the
tensor and ``m(w)`` the high 32 bits of ``w·K mod 2**64`` (``K`` an odd 64-bit constant, the golden ratio's
``0x9E3779B97F4A7C15``): a multiplicative mix that spreads every bit of ``w`` into the bits squared, so the third
sum does not vanish on structured words (a plain ``Σ w²`` taken mod 2**32 is zero for every word whose low 16
bits are zero: float32 1.0, 2.0, 4.0, ...). The first sum alone changes whenever one word changes (the change is
nonzero and smaller than 2**32); the first two together change whenever the changes are confined to two
words of a tensor under 16 GiB (``(i - j)·Δ`` cannot be a multiple of 2**64). A wider change goes unseen
only if all three sums coincide, which no optimizer update or in-place write does short of crafting it.
Any dtype is read the same way (float, bfloat16, int8, bitsandbytes' packed uint8), so the check is
bit-exact: ``torch.equal`` tensors of one dtype and shape have equal checksums, and -0.0 differs from 0.0.
Checksums live in memory only (the frozen check of a phase, an activation store's signature): a store signed
with a former definition no longer matches and is rebuilt, never served.

The bytes are never copied as a whole: each chunk of ``chunk_bytes`` is read in place (a misaligned view or a
non-contiguous tensor copies one chunk), with two int64 buffers of ``2 × chunk_bytes`` (positions, products),
so the extra memory is a few chunks whatever the tensor size, and a whole list of tensors is summed with one
device synchronization at the end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

CHUNK_BYTES = 1 << 20  # 1 MiB of raw bytes per chunk: 256 Ki words
MIX = 0x9E3779B97F4A7C15 - (1 << 64)  # odd: w ↦ w·MIX is a bijection mod 2**64 (as a signed int64)


def tensor_checksums(tensors: Iterable[torch.Tensor], chunk_bytes: int = CHUNK_BYTES) -> list[tuple | None]:
    """One checksum per tensor: ``(dtype, shape, Σw, Σi·w, Σw²)``; None for a tensor on the meta device."""
    if chunk_bytes <= 0 or chunk_bytes % 4:
        raise ValueError(f"chunk_bytes must be a positive multiple of 4, got {chunk_bytes}")
    tensors, words = list(tensors), chunk_bytes // 4
    buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    sums: list[torch.Tensor | None] = []
    for tensor in tensors:
        if tensor.is_meta:
            sums.append(None)
            continue
        device = tensor.device
        if device not in buffers:
            index = torch.arange(words, dtype=torch.int64, device=device)
            buffers[device] = (index, torch.empty_like(index))
        total = torch.zeros(3, dtype=torch.int64, device=device)
        with _one_thread():
            for start, part in _word_chunks(tensor.detach(), chunk_bytes):
                _accumulate(total, part, start, buffers[device])
        sums.append(total)
    values = [None if s is None else s.tolist() for s in sums]  # the only synchronization
    return [None if v is None else (str(t.dtype), tuple(t.shape), *v) for t, v in zip(tensors, values)]


def tensor_checksum(tensor: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> tuple | None:
    """The checksum of one tensor (see :func:`tensor_checksums`)."""
    return tensor_checksums([tensor], chunk_bytes)[0]


def float64_fingerprint(tensor: torch.Tensor) -> tuple[float, float]:
    """The former check, kept for the benchmark's comparison: a float64 copy's sum and sum of squares (not exact:
    it misses e.g. swapped values, and costs a full float64 copy of the tensor)."""
    data = tensor.detach().to(torch.float64)
    return float(data.sum()), float((data * data).sum())


def _word_chunks(tensor: torch.Tensor, chunk_bytes: int):
    """(position of the first word, int32 words) for every chunk of the tensor's bytes, copying at most a chunk."""
    if not tensor.is_contiguous():  # rare for parameters: copy whole rows, 4 at least so words do not straddle
        row_bytes = max(1, tensor[0].numel() * tensor.element_size())
        rows = max(4, chunk_bytes // row_bytes // 4 * 4)
        for first in range(0, tensor.shape[0], rows):
            piece = tensor[first : first + rows].contiguous()  # at most one chunk (or four rows) copied
            for start, part in _word_chunks(piece, chunk_bytes):
                yield first * row_bytes // 4 + start, part
        return
    raw = tensor.reshape(-1).view(torch.uint8) if tensor.dim() else tensor.reshape(1).view(torch.uint8)
    size = raw.numel()
    for first in range(0, size, chunk_bytes):
        part = raw[first : first + chunk_bytes]
        tail = part.numel() % 4
        if tail:  # the last partial word, padded with zero bytes
            part = torch.cat([part, torch.zeros(4 - tail, dtype=torch.uint8, device=part.device)])
        elif part.storage_offset() % 4:  # a view that does not start on a word boundary
            part = part.clone()
        yield first // 4, part.view(torch.int32)


def _accumulate(total: torch.Tensor, part: torch.Tensor, start: int, buffers) -> None:
    """Add one chunk's three sums (mod 2**64) to ``total``; ``start`` is the chunk's first word position."""
    index, product = (b[: part.numel()] for b in buffers)
    chunk_sum = part.sum(dtype=torch.int64)
    torch.mul(part, index, out=product)  # int32 · int64 → int64
    total[0] += chunk_sum
    total[1] += product.sum() + chunk_sum * start  # Σ (start + j)·w_j
    product.copy_(part)  # the mix, in place: m(w) = (w·MIX mod 2**64) >> 32, then its square mod 2**64
    product.mul_(MIX)
    product.bitwise_right_shift_(32)
    product.mul_(product)
    total[2] += product.sum()


@contextlib.contextmanager
def _one_thread():
    """Sum on one CPU thread: a chunk's ops are too small to gain from torch's thread pool, whose synchronization
    dominates (tens of times slower) when other processes keep the cores busy. GPU kernels are unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
