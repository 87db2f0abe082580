"""Per-phase dataset mixtures as a deterministic sample stream.

Sample ``i`` of the stream belongs to optimizer step ``i // samples_per_step`` (with a sequential sampler,
the Trainer's batches of step k hold exactly samples ``[k·S, (k+1)·S)``, S = batch × accumulation ×
processes). Which source it comes from is a seeded hash of ``i`` under the weights of that step's phase,
and which row of the source is a seeded permutation of the source at ``i``: both pure functions of the
position, so DataLoader workers, several processes and a resumed run (which skips the first batches)
all see the same samples.
"""

from __future__ import annotations

import bisect
import copy
import hashlib

import numpy as np
import torch


def _unit(seed: int, i: int) -> float:
    """A uniform number in [0, 1) from (seed, i)."""
    digest = hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) / float(1 << 53)


class MixtureDataset(torch.utils.data.Dataset):
    """A map-style dataset of ``total_steps × samples_per_step`` samples drawn from named sources.

    ``phases`` lists ``(end_step, weights)`` per phase in order; ``weights`` maps each source name to its
    share (normalized here). Inside a source, rows come in a fresh seeded permutation for every pass: within
    any window of ``len(source)`` consecutive positions no row of that source repeats.
    """

    def __init__(
        self,
        sources: dict[str, object],
        phases: list[tuple[int, dict[str, float]]],
        samples_per_step: int,
        total_steps: int,
        seed: int = 0,
    ):
        if not sources:
            raise ValueError("a mixture needs at least one source")
        self.sources = dict(sources)
        self.names = tuple(self.sources)
        self.samples_per_step = samples_per_step
        self.total_steps = total_steps
        self.seed = seed
        self._ends = [end for end, _ in phases]
        self._cumulative = []
        for _, weights in phases:
            total = sum(weights.get(n, 0.0) for n in self.names)
            if total <= 0:
                raise ValueError(f"mixture weights {weights} give no source a positive share")
            self._cumulative.append(np.cumsum([weights.get(n, 0.0) / total for n in self.names]))
        self._permutations: dict[str, tuple[int, np.ndarray]] = {}

    def with_sources(self, sources: dict[str, object]) -> MixtureDataset:
        """The same stream (phases, positions, seed) over other rows of the same sources (e.g. tokenized)."""
        other = copy.copy(self)
        other.sources = dict(sources)
        other._permutations = {}
        return other

    def __len__(self) -> int:
        return self.total_steps * self.samples_per_step

    def step_of(self, i: int) -> int:
        return i // self.samples_per_step

    def weights_at(self, step: int) -> dict[str, float]:
        """The normalized weights of the phase of ``step``."""
        cumulative = self._cumulative[self._phase(step)]
        shares = np.diff(cumulative, prepend=0.0)
        return {name: float(share) for name, share in zip(self.names, shares)}

    def _phase(self, step: int) -> int:
        return min(bisect.bisect_right(self._ends, step), len(self._ends) - 1)

    def source_of(self, i: int) -> str:
        cumulative = self._cumulative[self._phase(self.step_of(i))]
        index = int(np.searchsorted(cumulative, _unit(self.seed, i), side="right"))
        return self.names[min(index, len(self.names) - 1)]

    def row_of(self, name: str, i: int) -> int:
        """Row of source ``name`` that position ``i`` reads: a seeded permutation per pass over the source."""
        size = len(self.sources[name])
        passes, offset = divmod(i, size)
        cached = self._permutations.get(name)
        if cached is None or cached[0] != passes:
            source_index = self.names.index(name)
            order = np.random.default_rng([self.seed, source_index, passes]).permutation(size)
            cached = self._permutations[name] = (passes, order)
        return int(cached[1][offset])

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        name = self.source_of(i)
        return self.sources[name][self.row_of(name, i)]
