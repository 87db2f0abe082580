"""The frozen-parameter checksum: bit-exact over raw bytes, chunked, any dtype, memory bounded by a chunk."""

from __future__ import annotations

import pytest
import torch

from hf_stackwise.persist.checksum import tensor_checksum, tensor_checksums

CHUNK = 1024  # bytes: every tensor below spans several chunks


def flip_bit(tensor: torch.Tensor, element: int, bit: int) -> torch.Tensor:
    """A copy of ``tensor`` with one bit of one element's bytes flipped."""
    out = tensor.clone()
    raw = out.view(-1).view(torch.uint8)
    byte = element * tensor.element_size() + bit // 8
    raw[byte] ^= 1 << (bit % 8)
    return out


def tensors():
    generator = torch.Generator().manual_seed(0)
    return {
        "float32": torch.randn(64, 33, generator=generator),  # 8448 bytes: 9 chunks
        "bfloat16": torch.randn(3001, generator=generator).to(torch.bfloat16),  # odd byte count / 4
        "float16": torch.randn(17, 129, generator=generator).to(torch.float16),
        "uint8 (4-bit packed)": torch.randint(0, 256, (4097, 1), dtype=torch.uint8, generator=generator),
        "int8": torch.randint(-128, 128, (2051,), dtype=torch.int8, generator=generator),
        "float64": torch.randn(300, generator=generator, dtype=torch.float64),
    }


@pytest.mark.parametrize("name", list(tensors()))
def test_every_single_bit_flip_at_first_middle_last_element_is_detected(name):
    tensor = tensors()[name]
    assert tensor.numel() * tensor.element_size() > 2 * CHUNK
    reference = tensor_checksum(tensor, CHUNK)
    assert tensor_checksum(tensor.clone(), CHUNK) == reference
    n = tensor.numel()
    for element in (0, n // 2, n - 1):
        for bit in range(8 * tensor.element_size()):
            assert tensor_checksum(flip_bit(tensor, element, bit), CHUNK) != reference, (element, bit)


def test_equal_tensors_equal_checksums_whatever_their_layout():
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(40, 70, generator=generator)
    transposed = base.t()  # not contiguous: read in row pieces
    assert not transposed.is_contiguous()
    assert tensor_checksum(transposed, CHUNK) == tensor_checksum(transposed.contiguous(), CHUNK)
    storage = torch.randn(1 + 3001, generator=generator).to(torch.bfloat16)
    view = storage[1:]  # starts mid-word in its storage
    assert tensor_checksum(view, CHUNK) == tensor_checksum(view.clone(), CHUNK)
    assert tensor_checksum(base, CHUNK) == tensor_checksum(base, 4 * CHUNK) == tensor_checksum(base)  # any chunk


def test_changes_the_float64_sums_miss_are_detected():
    tensor = torch.tensor([1.0, 2.0, 3.0, 4.0])
    swapped = torch.tensor([2.0, 1.0, 3.0, 4.0])  # same sum and sum of squares
    assert tensor_checksum(swapped) != tensor_checksum(tensor)
    signed_zero = torch.tensor([-0.0, 2.0, 3.0, 4.0])
    assert tensor_checksum(signed_zero) != tensor_checksum(torch.tensor([0.0, 2.0, 3.0, 4.0]))
    # two words changed by opposite amounts keep Σw; the position-weighted sum tells them apart
    words = torch.tensor([5, 7, 9, 11], dtype=torch.int32)
    assert tensor_checksum(torch.tensor([6, 6, 9, 11], dtype=torch.int32)) != tensor_checksum(words)


def test_dtype_and_shape_are_part_of_the_checksum():
    tensor = torch.zeros(8)
    assert tensor_checksum(tensor) != tensor_checksum(torch.zeros(2, 4))
    assert tensor_checksum(tensor) != tensor_checksum(torch.zeros(8, dtype=torch.int32))


def test_meta_and_empty_tensors():
    assert tensor_checksum(torch.empty(4, 4, device="meta")) is None
    assert tensor_checksum(torch.empty(0)) == ("torch.float32", (0,), 0, 0, 0)
    assert tensor_checksum(torch.tensor(1.5)) == tensor_checksum(torch.tensor(1.5).clone())


def test_many_tensors_at_once_equal_one_by_one():
    values = list(tensors().values())
    assert tensor_checksums(values, CHUNK) == [tensor_checksum(t, CHUNK) for t in values]


def test_extra_memory_is_bounded_by_the_chunk():
    """A 64 MiB tensor with 1 MiB chunks: peak allocation stays at a few chunks (the float64 copy would be 128 MiB)."""
    profiler = pytest.importorskip("torch.profiler")
    tensor = torch.ones(16 * 1024 * 1024)
    with profiler.profile(activities=[profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        tensor_checksum(tensor, 1 << 20)
    largest = max(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)
    assert largest <= 2 * (1 << 20) + 4096  # the biggest single buffer: one chunk widened to int64


def test_chunk_size_must_be_a_multiple_of_four():
    with pytest.raises(ValueError, match="multiple of 4"):
        tensor_checksum(torch.zeros(4), chunk_bytes=6)


def reference_sums(tensor: torch.Tensor) -> tuple[int, int, int]:
    """The three sums of the module docstring, in plain Python integers from the tensor's bytes (an independent
    implementation): words little-endian signed int32, zero-padded; m(w) = top 32 bits of w·K mod 2**64, signed."""
    data = tensor.contiguous().reshape(-1).view(torch.uint8).tolist() if tensor.numel() else []
    data += [0] * (-len(data) % 4)
    words = [int.from_bytes(bytes(data[i : i + 4]), "little", signed=True) for i in range(0, len(data), 4)]
    modulus, k = 1 << 64, 0x9E3779B97F4A7C15

    def mix(w: int) -> int:
        high = ((w * k) % modulus) >> 32
        return high - (1 << 32) if high >= 1 << 31 else high

    def signed(v: int) -> int:
        v %= modulus
        return v - modulus if v >= 1 << 63 else v

    return (
        signed(sum(words)),
        signed(sum(i * w for i, w in enumerate(words))),
        signed(sum(mix(w) ** 2 for w in words)),
    )


@pytest.mark.parametrize("name", list(tensors()))
def test_the_sums_are_the_documented_ones(name):
    tensor = tensors()[name][:300]
    assert tensor_checksum(tensor, CHUNK)[2:] == reference_sums(tensor)


def test_words_with_zero_low_bits_are_told_apart():
    """float32 1.0, 2.0, 4.0 have zero low 16 bits, so Σ w² mod 2**32 was zero for them; [1, 4, 1] and [2, 1, 2]
    differ by (1, -2, 1) exponent steps, which keeps Σw and Σi·w: only the mixed third sum tells them apart."""
    one = tensor_checksum(torch.tensor([1.0, 4.0, 1.0]))
    other = tensor_checksum(torch.tensor([2.0, 1.0, 2.0]))
    assert one[2:4] == other[2:4]  # the linear sums coincide
    assert one != other
    generator = torch.Generator().manual_seed(2)
    for _ in range(200):  # the same class at random: words with zero low 16 bits, a (t, -2t, t) change (no overflow)
        words = torch.randint(-(1 << 14), 1 << 14, (64,), dtype=torch.int32, generator=generator) << 16
        first = int(torch.randint(0, 62, (1,), generator=generator))
        step = int(torch.randint(1, 1 << 12, (1,), generator=generator)) << 16
        changed = words.clone()
        changed[first : first + 3] += torch.tensor([step, -2 * step, step], dtype=torch.int32)
        before, after = tensor_checksum(words.view(torch.float32)), tensor_checksum(changed.view(torch.float32))
        assert before[2:4] == after[2:4]
        assert before != after, (first, step)


def test_a_store_signed_with_the_former_checksum_is_rebuilt_not_served(tmp_path):
    """Checksums are not written into checkpoints; the one place they persist is a memory-mapped activation store's
    signature. A resumed run whose checksums differ from the store's (the former third sum) gets misses, never hits."""
    import numpy as np

    from hf_stackwise.cache.activations import ActivationStore, fingerprints

    weights = torch.tensor([1.0, 4.0, 1.0])
    signature = {"former": "3212836864,3212836864,0", "current": ",".join(map(str, tensor_checksum(weights)[2:]))}
    assert signature["former"] != signature["current"]
    ids = torch.arange(12).reshape(2, 6)
    slots, fps = np.array([0, 1]), fingerprints({"input_ids": ids})
    path = str(tmp_path / "store")
    written = ActivationStore(("k",), 4, 6, 8, path)
    written.sign(signature["former"])
    written.write(slots, fps, torch.randn(2, 6, 8))
    written.close()
    same = ActivationStore(("k",), 4, 6, 8, path)
    same.reload = True  # a resumed run may reload the files (a fresh one starts them empty)
    same.sign(signature["former"])
    assert same.match(slots, fps).all()  # the store reloads for the run that wrote it
    resumed = ActivationStore(("k",), 4, 6, 8, path)
    resumed.reload = True
    resumed.sign(signature["current"])
    assert not resumed.match(slots, fps).any()  # another signature: emptied, rebuilt as the run goes
