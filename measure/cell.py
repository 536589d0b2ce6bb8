"""One cell's final numbers from its scores: every metric of measure/metrics.py and the per-sequence table.

    measurement = measure_cell(shape, scores)   # measurement.metrics, measurement.per_sequence

The caller (orchestrator/cell.py) scores the sequences with the trained model (models/scoring.py) and
hands the arrays over; nothing here knows of torch or of how the model was trained. `dataset_mem_bits`
is the same memorization measured at each evaluation step, so the curves and the final value agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from measure.memorization import (
    PAPER_ALPHA_BITS_PER_PARAM,
    mem_bits_against_reference,
    mem_bits_floor,
    mem_bits_per_sequence,
    predicted_mem_bits,
    summarize_synthetic,
)
from measure.asymptote import asymptote_metrics
from measure.metrics import EXTRACTION_PREFIXES, SYNTHETIC, extraction_name
from measure.mia import mia_metrics


@dataclass(frozen=True)
class CellShape:
    """What the numbers of a cell depend on besides its scores."""

    kind: str  # "synthetic" or "text"
    seq_len: int  # S, tokens per sequence
    vocab_size: int  # V
    params: int  # every trainable parameter
    params_paper: int  # the paper's count
    precision: str  # fp32, bf16, amp_bf16: picks the paper's alpha for predictions

    @property
    def sequence_bits(self) -> float:
        """S * log2(V): what a uniform-random sequence carries (as models.spec.DataSpec computes it)."""
        return self.seq_len * math.log2(self.vocab_size)


@dataclass(frozen=True)
class ReferenceScores:
    """nll_bits under a text cell's reference model of its pool, non-members and test split."""

    members: np.ndarray  # (N,)
    nonmembers: np.ndarray  # (M,)
    test: np.ndarray  # (T,)


@dataclass(frozen=True)
class Scores:
    """A trained cell's per-sequence scores; nll in bits, float64.

    `mia_members` indexes the min(N, M) members that membership inference scores, against as many
    non-members (the first ones), so both classes are the same size and chance is F1 = 0.5. Text cells
    add the test split, the reference model's scores and greedy correctness (models.scoring.greedy_correct)
    of those MIA members and of the test split, from which extraction rates follow."""

    members: np.ndarray  # (N,)
    nonmembers: np.ndarray  # (M,)
    mia_members: np.ndarray  # (k,) int indices into members, k = min(N, M)
    test: np.ndarray | None = None  # (T,); None or empty: no test split
    reference: ReferenceScores | None = None
    train_correct: np.ndarray | None = None  # (k, S) bool
    test_correct: np.ndarray | None = None  # (T, S) bool


class Measurement(NamedTuple):
    metrics: dict[str, float]  # the cell's final metrics, named as measure.metrics declares
    per_sequence: pa.Table  # one row per scored sequence (measure.metrics.PER_SEQUENCE_COLUMNS)


def dataset_mem_bits(shape: CellShape, member_nll: np.ndarray, reference_members: np.ndarray | None = None) -> float:
    """mem_bits of the training set: against the uniform code (synthetic data, or a text cell without a
    reference) or against the reference model's code lengths (text)."""
    if shape.kind == SYNTHETIC:
        return summarize_synthetic(member_nll, shape.seq_len, shape.vocab_size).mem_bits
    return float(text_mem_bits(shape, member_nll, reference_members).sum())


def text_mem_bits(shape: CellShape, member_nll: np.ndarray, reference_members: np.ndarray | None) -> np.ndarray:
    """Memorized bits per training sequence of a text cell: unintended memorization against the
    reference, or, for a cell without one (a reference itself), against the uniform code."""
    if reference_members is None:
        return mem_bits_per_sequence(member_nll, shape.seq_len, shape.vocab_size)
    return mem_bits_against_reference(member_nll, reference_members)


def measure_cell(shape: CellShape, scores: Scores) -> Measurement:
    """Every final number of a cell (docs/science.md) and the per-sequence table behind them."""
    if shape.kind == SYNTHETIC:
        return _synthetic(shape, scores)
    return _text(shape, scores)


def training_metrics(result, num_sequences: int, batch_size: int, asymptote_from: int = 0) -> dict[str, float]:
    """The metrics of how a cell was trained, as floats (MLflow holds floats only), from its training
    result (models.progress.TrainResult, read by attribute: measure/ imports no torch): steps,
    convergence, exposures, and under the branches schedule the branches and the asymptote that those
    of horizons >= `asymptote_from` extrapolate to (measure.asymptote). Those that do not apply (None)
    are left out."""
    metrics = {"steps": float(result.steps), "converged": float(result.converged),
               "resumed_from_step": float(result.resumed_from_step), "wall_s": result.wall_s,
               "tokens_per_s": result.tokens_per_s, "steps_trained": float(result.steps_trained or result.steps),
               "exposures": result.steps * batch_size / num_sequences}
    optional = {"converged_step": result.converged_step, "mem_gain_last_doubling": result.gain_last_doubling,
                "decay_start_step": result.decay_start_step}
    metrics.update({name: float(value) for name, value in optional.items() if value is not None})
    if result.branches:
        horizons, _, annealed = zip(*result.branches)
        metrics.update(num_branches=float(len(result.branches)), last_horizon_steps=float(horizons[-1]))
        metrics.update(asymptote_metrics(horizons, annealed, annealed[-1], from_steps=asymptote_from))
    return metrics


def _loss_attack(scores: Scores) -> dict[str, float]:
    k = len(scores.mia_members)
    return mia_metrics(-scores.members[scores.mia_members], -scores.nonmembers[:k]).as_dict("loss")


def _synthetic(shape: CellShape, scores: Scores) -> Measurement:
    member_nll, nonmember_nll = scores.members, scores.nonmembers
    S, N, M = shape.seq_len, len(member_nll), len(nonmember_nll)
    summary = summarize_synthetic(member_nll, S, shape.vocab_size)
    metrics = {
        "params": float(shape.params),
        "params_paper": float(shape.params_paper),
        "entropy_bits": summary.entropy_bits,
        "mem_bits": summary.mem_bits,
        "mem_bits_unclipped": summary.mem_bits_unclipped,
        "mem_fraction": summary.mem_fraction,
        "mem_bits_floor": mem_bits_floor(nonmember_nll, S, shape.vocab_size, N),
        "bits_per_param": summary.mem_bits / shape.params,
        "predicted_mem_bits": float(predicted_mem_bits(
            PAPER_ALPHA_BITS_PER_PARAM[shape.precision], shape.params, summary.entropy_bits)),
        "sequences_per_param": N / shape.params,
        "train_nll_bits_per_token": float(member_nll.mean() / S),
        "test_nll_bits_per_token": float(nonmember_nll.mean() / S),
        **_loss_attack(scores),
    }
    k = len(scores.mia_members)
    every_nll = np.concatenate([member_nll, nonmember_nll])
    per_sequence = pa.table({
        "split": pa.array(["member"] * N + ["nonmember"] * M),
        "index": pa.array(np.concatenate([np.arange(N), np.arange(M)]).astype(np.int64)),
        "nll_bits": pa.array(every_nll),
        "mem_bits": pa.array(np.maximum(0.0, shape.sequence_bits - every_nll)),
        "in_mia": pa.array(np.concatenate([_mask(N, scores.mia_members), np.arange(M) < k])),
    })
    return Measurement(metrics, per_sequence)


def _text(shape: CellShape, scores: Scores) -> Measurement:
    """The loss attack (and, with a reference, the reference attack) scores min(N, M) members against as
    many non-members; extraction is measured on those members and on the test split. Test loss is on
    the test split (on the non-members when the split has no test set)."""
    S, N = shape.seq_len, len(scores.members)
    member_nll, nonmember_nll, ref = scores.members, scores.nonmembers, scores.reference
    has_test = scores.test is not None and len(scores.test) > 0
    test_nll = scores.test if has_test else nonmember_nll
    per_sequence_mem = text_mem_bits(shape, member_nll, ref.members if ref else None)
    mem_bits = float(per_sequence_mem.sum())
    entropy_bits = float(ref.members.sum()) if ref else N * shape.seq_len * float(np.log2(shape.vocab_size))
    subset, k = scores.mia_members, len(scores.mia_members)
    metrics = {
        "params": float(shape.params),
        "params_paper": float(shape.params_paper),
        "entropy_bits": entropy_bits,
        "capacity_ratio": entropy_bits / (PAPER_ALPHA_BITS_PER_PARAM[shape.precision] * shape.params),
        "mem_bits": mem_bits,
        "mem_bits_per_sequence": mem_bits / N,
        "bits_per_param": mem_bits / shape.params,
        "sequences_per_param": N / shape.params,
        "train_nll_bits_per_token": float(member_nll.mean() / S),
        "test_nll_bits_per_token": float(test_nll.mean() / S),
        "nonmember_nll_bits_per_token": float(nonmember_nll.mean() / S),
        **_loss_attack(scores),
    }
    if ref is not None:
        metrics.update({
            "reference_train_nll_bits_per_token": float(ref.members.mean() / S),
            "reference_test_nll_bits_per_token": float((ref.test if has_test else ref.nonmembers).mean() / S),
            **mia_metrics((ref.members - member_nll)[subset],
                          (ref.nonmembers - nonmember_nll)[:k]).as_dict("reference"),
        })
    for split, correct in (("train", scores.train_correct), ("test", scores.test_correct if has_test else None)):
        if correct is not None:
            for prefix, rate in extraction_rates(correct, EXTRACTION_PREFIXES).items():
                metrics[extraction_name(split, prefix)] = rate
    return Measurement(metrics, _text_table(scores, test_nll if has_test else np.empty(0), per_sequence_mem))


def extraction_rates(correct: np.ndarray, prefixes: tuple[int, ...]) -> dict[int, float]:
    """From (n, S) greedy correctness: the fraction of sequences whose greedy continuation from each
    prefix length matches exactly (prefixes of at least S are left out: nothing would remain)."""
    return {k: float(correct[:, k:].all(axis=1).mean()) for k in prefixes if k < correct.shape[1]}


def correct_tail(correct: np.ndarray) -> np.ndarray:
    """Per sequence, how many final positions the model predicts greedily: a prefix of k tokens
    extracts the sequence exactly when S - correct_tail <= k."""
    wrong = ~correct[:, ::-1]
    return np.where(wrong.any(axis=1), wrong.argmax(axis=1), correct.shape[1]).astype(np.int64)


def _mask(n: int, indices: np.ndarray) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[indices] = True
    return mask


def _text_table(scores: Scores, test_nll: np.ndarray, per_sequence_mem: np.ndarray) -> pa.Table:
    """One row per sequence: split (member, nonmember, test), index in its split, nll_bits, the
    reference's nll_bits (null without a reference), mem_bits (members only), in_mia, and correct_tail
    (members scored for extraction and test rows; -1 elsewhere)."""
    N, M, T = len(scores.members), len(scores.nonmembers), len(test_nll)
    k, ref = len(scores.mia_members), scores.reference
    member_tail = np.full(N, -1, dtype=np.int64)
    member_tail[scores.mia_members] = correct_tail(scores.train_correct)
    test_tail = correct_tail(scores.test_correct) if T else np.empty(0, dtype=np.int64)
    ref_nll = (np.concatenate([ref.members, ref.nonmembers, ref.test]) if ref is not None
               else np.full(N + M + T, np.nan))
    return pa.table({
        "split": pa.array(["member"] * N + ["nonmember"] * M + ["test"] * T),
        "index": pa.array(np.concatenate([np.arange(N), np.arange(M), np.arange(T)]).astype(np.int64)),
        "nll_bits": pa.array(np.concatenate([scores.members, scores.nonmembers, test_nll])),
        "reference_nll_bits": pa.array(ref_nll, from_pandas=True),
        "mem_bits": pa.array(np.concatenate([per_sequence_mem, np.full(M + T, np.nan)]), from_pandas=True),
        "in_mia": pa.array(np.concatenate([_mask(N, scores.mia_members), np.arange(M) < k, np.zeros(T, dtype=bool)])),
        "correct_tail": pa.array(np.concatenate([member_tail, np.full(M, -1, dtype=np.int64), test_tail])),
    })
