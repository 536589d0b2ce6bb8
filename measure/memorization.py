"""Memorized bits from per-sequence code lengths (docs/science.md, "Memorization").

Inputs are `nll_bits`: the arithmetic-coding length of each sequence under the model, in bits, as
produced by the models package (float32 log-softmax, float64 sums). A uniform-random sequence of S
tokens over a vocabulary of V carries S * log2(V) bits because every token is predicted (the first
from a start token), so a model that has learned nothing scores exactly that and memorizes 0 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def sequence_entropy_bits(seq_len: int, vocab_size: int) -> float:
    """Entropy of one uniform-random sequence: S * log2(V) bits."""
    return float(seq_len * np.log2(vocab_size))


def dataset_entropy_bits(num_sequences: int, seq_len: int, vocab_size: int) -> float:
    """Entropy of a synthetic dataset, H(X) = N * S * log2(V) bits."""
    return float(num_sequences * sequence_entropy_bits(seq_len, vocab_size))


def mem_bits_per_sequence(nll_bits: np.ndarray, seq_len: int, vocab_size: int) -> np.ndarray:
    """Memorized bits per synthetic sequence, max(0, S*log2(V) - nll_bits); float64, input's shape.

    Clipping at 0 is the paper's estimator: a sequence coded worse than uniform counts as 0, not as
    negative memorization, so the dataset sum is a lower bound.
    """
    nll = np.asarray(nll_bits, dtype=np.float64)
    return np.maximum(0.0, sequence_entropy_bits(seq_len, vocab_size) - nll)


def mem_bits_against_reference(nll_bits: np.ndarray, ref_nll_bits: np.ndarray) -> np.ndarray:
    """Memorized bits of each text sequence against a reference model, max(0, ref - nll); float64.

    H^K(x|r) - H^K(x|r, model) with the joint code taken as the shorter of the two codes.
    """
    nll = np.asarray(nll_bits, dtype=np.float64)
    ref = np.asarray(ref_nll_bits, dtype=np.float64)
    if nll.shape != ref.shape:
        raise ValueError(f"nll_bits shape {nll.shape} != ref_nll_bits shape {ref.shape}")
    return np.maximum(0.0, ref - nll)


@dataclass(frozen=True)
class MemorizationSummary:
    """Dataset-level memorization of one synthetic training set; all in bits except the fraction."""

    mem_bits: float  # sum of clipped per-sequence mem_bits (the paper's lower bound)
    mem_bits_unclipped: float  # H(X) - sum nll_bits; may be negative for an untrained model
    entropy_bits: float  # H(X) = N * S * log2(V)
    mem_fraction: float  # mem_bits / H(X), in [0, 1]


def summarize_synthetic(nll_bits: np.ndarray, seq_len: int, vocab_size: int) -> MemorizationSummary:
    """Summarize memorization of a synthetic training set from its members' nll_bits, shape (N,)."""
    nll = np.asarray(nll_bits, dtype=np.float64).ravel()
    if nll.size == 0:
        raise ValueError("nll_bits is empty: need the code length of at least one sequence")
    if not np.all(np.isfinite(nll)):
        raise ValueError("nll_bits contains NaN or infinite values")
    entropy_bits = dataset_entropy_bits(nll.size, seq_len, vocab_size)
    mem_bits = float(mem_bits_per_sequence(nll, seq_len, vocab_size).sum())
    return MemorizationSummary(
        mem_bits=mem_bits,
        mem_bits_unclipped=float(entropy_bits - nll.sum()),
        entropy_bits=entropy_bits,
        mem_fraction=mem_bits / entropy_bits,
    )


def mem_bits_floor(nonmember_nll_bits: np.ndarray, seq_len: int, vocab_size: int, num_members: int) -> float:
    """The noise floor of mem_bits: the same clipped sum over the non-members (which no model saw),
    scaled from their M to the N members: what a model that memorized nothing would still score, as the
    clip keeps every sequence a model happens to code below S*log2(V) and drops those it codes above."""
    nll = np.asarray(nonmember_nll_bits, dtype=np.float64).ravel()
    if nll.size == 0:
        raise ValueError("no non-members: the noise floor needs at least one")
    return float(mem_bits_per_sequence(nll, seq_len, vocab_size).sum() * num_members / nll.size)


def predicted_mem_bits(alpha_bits_per_param, params, entropy_bits):
    """Predicted memorization min(alpha * params, H(X)) in bits; broadcasts over arrays.

    Returns a float for scalar inputs, else a float64 array.
    """
    predicted = np.minimum(
        np.asarray(alpha_bits_per_param, dtype=np.float64) * np.asarray(params, dtype=np.float64),
        np.asarray(entropy_bits, dtype=np.float64),
    )
    return float(predicted) if predicted.ndim == 0 else predicted


def params_paper(vocab_size: int, seq_len: int, n_layer: int, n_embd: int) -> int:
    """The paper's parameter count, V*d + S*d + L*(12d^2 + 13d) + 2d.

    Token embedding (tied head), S learned positions, per block 12d^2 weights (attention 4d^2,
    MLP 8d^2) and 13d biases and LayerNorm terms, and the final LayerNorm (2d). The start-token
    row is not included; the model's own `params` counts it.
    """
    d = n_embd
    return int(vocab_size * d + seq_len * d + n_layer * (12 * d * d + 13 * d) + 2 * d)


# The paper's mean bits per parameter by the dtype the weights are kept in (measure/paper.py);
# amp_bf16 keeps float32 weights. Cells log predictions with these; `aggregate` fits its own alpha.
PAPER_ALPHA_BITS_PER_PARAM = {"fp32": 3.83, "bf16": 3.51, "amp_bf16": 3.83}


def capacity_sequences(alpha_bits_per_param: float, params: int, seq_len: int, vocab_size: int,
                       multiple: float = 1.0) -> int:
    """How many uniform-random sequences hold `multiple` times a model's predicted capacity:
    multiple * alpha * params / (S * log2 V), rounded to whole sequences (at least one). At multiple 1,
    H(X) equals the capacity: where memorization stops growing with N (docs/science.md)."""
    if not multiple > 0:
        raise ValueError(f"a capacity multiple must be positive, not {multiple!r}")
    return max(1, round(multiple * alpha_bits_per_param * params / sequence_entropy_bits(seq_len, vocab_size)))

