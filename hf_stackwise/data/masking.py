"""Time-dependent batch transforms: rows split to the phase's length, MLM and masked-diffusion corruption.

Every function here is pure: its output depends on the batch, the phase's settings and a seed, never on
mutable state, so the trainer can apply it where the step is known (not in a collator) and a
resumed run sees the same masks. Each row draws its randomness from its own generator, seeded by
``(seed, step, the row's tokens)``: the masks of a given (sample, step) are reproducible whatever the
batch size, worker count or process that carries the sample.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # label of a position that carries no loss
MIN_DIFFUSION_RATE = 1e-3  # floor of a drawn diffusion rate (its 1/rate weight stays finite)


@dataclass(frozen=True)
class Vocabulary:
    """What corruption needs to know about a tokenizer."""

    mask_id: int | None
    special_ids: tuple[int, ...]  # never masked (CLS, SEP, PAD, BOS, EOS, ...)
    size: int  # random replacement tokens are drawn from [0, size)

    @classmethod
    def from_tokenizer(cls, tokenizer, model_vocab_size: int | None = None) -> Vocabulary:
        size = len(tokenizer) if model_vocab_size is None else min(len(tokenizer), model_vocab_size)
        special = set(tokenizer.all_special_ids)
        if tokenizer.pad_token_id is not None:
            special.add(tokenizer.pad_token_id)
        return cls(tokenizer.mask_token_id, tuple(sorted(special)), size)


def row_seed(seed: int, step: int | str, row: torch.Tensor) -> int:
    """A 63-bit seed from the run's seed, the step (or ``"eval"``) and the row's tokens."""
    digest = hashlib.blake2b(f"{seed}:{step}:".encode(), digest_size=8)
    digest.update(row.detach().to("cpu", torch.int64).numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


def _generators(input_ids: torch.Tensor, seed: int, step: int | str) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(row_seed(seed, step, row)) for row in input_ids]


def split_rows(batch: dict, length: int) -> dict:
    """Cut each row of every ``[batch, L]`` tensor into ``L // length`` rows of ``length`` tokens.

    Splitting keeps the tokens a shorter phase would otherwise throw away (only a remainder of
    ``L mod length`` tokens per row is dropped); the number of tokens per step stays the same.
    """
    ids = batch["input_ids"]
    total = ids.shape[-1]
    if length >= total:
        return batch
    pieces = total // length
    rows = ids.shape[0]
    out = dict(batch)
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == (rows, total):
            out[key] = value[:, : pieces * length].reshape(rows * pieces, length)
    return out


def corruptible(input_ids: torch.Tensor, vocab: Vocabulary) -> torch.Tensor:
    """Positions that may be masked: every token that is not special (special tokens and padding never are)."""
    special = torch.tensor(vocab.special_ids, dtype=input_ids.dtype, device=input_ids.device)
    return ~torch.isin(input_ids, special)


def mask_for_mlm(
    input_ids: torch.Tensor,
    vocab: Vocabulary,
    rate: float,
    seed: int,
    step: int | str,
    split: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style corruption: each corruptible token is chosen with probability ``rate``; of those, a fraction
    ``split[0]`` becomes the mask token, ``split[1]`` a random token, the rest stays. Labels are the original
    tokens at chosen positions and -100 elsewhere. Returns ``(input_ids, labels)``."""
    device = input_ids.device
    ids = input_ids.detach().cpu()
    allowed = corruptible(ids, vocab)
    out, labels = ids.clone(), torch.full_like(ids, IGNORE_INDEX)
    for i, gen in enumerate(_generators(ids, seed, step)):
        length = ids.shape[1]
        chosen = (torch.rand(length, generator=gen) < rate) & allowed[i]
        how = torch.rand(length, generator=gen)
        random_tokens = torch.randint(vocab.size, (length,), generator=gen)
        to_mask = chosen & (how < split[0])
        to_random = chosen & (how >= split[0]) & (how < split[0] + split[1])
        labels[i, chosen] = ids[i, chosen]
        out[i, to_mask] = vocab.mask_id
        out[i, to_random] = random_tokens[to_random].to(ids.dtype)
    return out.to(device), labels.to(device)


def mask_for_diffusion(
    input_ids: torch.Tensor,
    vocab: Vocabulary,
    max_rate: float,
    seed: int,
    step: int | str,
    min_rate: float = 0.0,
    weighting: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Masked diffusion: each row draws its rate uniformly from ``[min_rate, max_rate]`` and replaces that
    fraction of its corruptible tokens by the mask token (no random/keep). Labels on masked positions only.
    With ``weighting``, returns per-token loss weights ``1 / rate`` at masked positions (0 elsewhere)."""
    device = input_ids.device
    ids = input_ids.detach().cpu()
    allowed = corruptible(ids, vocab)
    out, labels = ids.clone(), torch.full_like(ids, IGNORE_INDEX)
    weights = torch.zeros(ids.shape, dtype=torch.float32) if weighting else None
    for i, gen in enumerate(_generators(ids, seed, step)):
        rate = max(min_rate + (max_rate - min_rate) * float(torch.rand(1, generator=gen)), MIN_DIFFUSION_RATE)
        chosen = (torch.rand(ids.shape[1], generator=gen) < rate) & allowed[i]
        labels[i, chosen] = ids[i, chosen]
        out[i, chosen] = vocab.mask_id
        if weights is not None:
            weights[i, chosen] = 1.0 / rate
    return out.to(device), labels.to(device), None if weights is None else weights.to(device)
