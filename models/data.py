"""Synthetic data: uniform random token sequences, and the order in which training visits them.

Members and non-members are drawn from independent numpy streams keyed by (stream, seed, N, S, V), so a
cell's data is a pure function of its spec and the two sets can never share a generator state. The batch
order is stateless too: step t reads positions [t*B, (t+1)*B) of an endless sequence of epochs, each a
permutation keyed by (seed, epoch). A resumed run therefore sees exactly the batches an uninterrupted
one would, with no data cursor to save beyond the step itself.
"""

from __future__ import annotations

import numpy as np

from models.spec import DataSpec

MEMBER_STREAM = 0
NONMEMBER_STREAM = 1
ORDER_STREAM = 2
MIA_SUBSET_STREAM = 3


def _rng(stream: int, seed: int, data: DataSpec, *extra: int) -> np.random.Generator:
    key = [stream, seed, data.num_sequences, data.seq_len, data.vocab_size, *extra]
    return np.random.default_rng(np.random.SeedSequence(key))


def synthetic_members(data: DataSpec, seed: int) -> np.ndarray:
    """(N, S) int64 training sequences, i.i.d. uniform over [0, V)."""
    rng = _rng(MEMBER_STREAM, seed, data)
    return rng.integers(0, data.vocab_size, size=(data.num_sequences, data.seq_len), dtype=np.int64)


def synthetic_nonmembers(data: DataSpec, seed: int) -> np.ndarray:
    """(M, S) int64 fresh sequences from the same distribution, from a separate stream."""
    rng = _rng(NONMEMBER_STREAM, seed, data)
    return rng.integers(0, data.vocab_size, size=(data.num_nonmembers, data.seq_len), dtype=np.int64)


def mia_member_subset(data: DataSpec, seed: int) -> np.ndarray:
    """Indices of the members scored against the non-members: a fixed random subset of
    min(N, M) members, so both classes have the same size and random guessing scores 0.5."""
    size = min(data.num_sequences, data.num_nonmembers)
    rng = _rng(MIA_SUBSET_STREAM, seed, data)
    return np.sort(rng.choice(data.num_sequences, size=size, replace=False))


class BatchOrder:
    """Which member indices form the batch of each step (epoch-wise shuffling, stateless)."""

    def __init__(self, data: DataSpec, seed: int, batch_size: int):
        self.data, self.seed, self.batch_size = data, seed, batch_size
        self._cached_epoch, self._cached_perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._cached_epoch:
            rng = _rng(ORDER_STREAM, self.seed, self.data, epoch)
            self._cached_epoch, self._cached_perm = epoch, rng.permutation(self.data.num_sequences)
        return self._cached_perm

    def indices(self, step: int) -> np.ndarray:
        """(B,) member indices for optimizer step `step` (0-based)."""
        n = self.data.num_sequences
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
        out = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(positions // n):  # a batch may straddle epochs (or span several)
            mask = positions // n == epoch
            out[mask] = self._permutation(int(epoch))[positions[mask] % n]
        return out
