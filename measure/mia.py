"""Membership-inference metrics (docs/science.md, "Membership inference").

Scores follow one convention: higher means "more likely a member" (the loss attack scores
-nll_bits). Each metric takes the members' and the non-members' scores as 1-D arrays and treats the
members as the positive class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def _labelled(member_scores, nonmember_scores) -> tuple[np.ndarray, np.ndarray]:
    """Validate and stack scores into (labels, scores), both shape (M + N,); members labelled 1."""
    members = np.asarray(member_scores, dtype=np.float64).ravel()
    nonmembers = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    for name, scores in (("member_scores", members), ("nonmember_scores", nonmembers)):
        if scores.size == 0:
            raise ValueError(f"{name} is empty: membership inference needs both classes")
        if not np.all(np.isfinite(scores)):
            bad = int(np.count_nonzero(~np.isfinite(scores)))
            raise ValueError(f"{name} has {bad} NaN or infinite values of {scores.size}")
    labels = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)])
    return labels, np.concatenate([members, nonmembers])


def roc_auc(member_scores, nonmember_scores) -> float:
    """ROC AUC: the probability a random member outscores a random non-member, ties counting 1/2."""
    labels, scores = _labelled(member_scores, nonmember_scores)
    return float(roc_auc_score(labels, scores))


def tpr_at_fpr(member_scores, nonmember_scores, fpr: float) -> float:
    """The largest true-positive rate reachable by a threshold whose false-positive rate is <= fpr.

    Only the ROC curve's vertices count (thresholds "score >= t" at each distinct score), with no
    interpolation between them: a group of tied scores is either all labelled members or none, so
    the answer is achievable by a deterministic threshold and never overstates the attack. With N
    non-members an FPR below 1/N allows no false positive at all.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr={fpr} must lie in [0, 1]")
    labels, scores = _labelled(member_scores, nonmember_scores)
    fprs, tprs, _ = roc_curve(labels, scores, drop_intermediate=False)
    # fprs are k / N in float64; the slack keeps k / N == fpr from being lost to rounding.
    return float(tprs[fprs <= fpr + 1e-12].max())


def balanced_f1(member_scores, nonmember_scores) -> float:
    """The paper's balanced F1: label as members exactly as many sequences as there are members (M).

    Then precision and recall are both TP / M, and so is F1. When the M-th highest score is shared
    by a tied group that straddles the threshold, the remaining slots are filled from that group at
    random and TP counts their expected members (a fractional count), so the result does not depend
    on sort order: identical score distributions give M / (M + N), exactly 0.5 with balanced
    classes, as does random guessing in expectation.
    """
    labels, scores = _labelled(member_scores, nonmember_scores)
    num_members = int(labels.sum())
    # The M-th highest score is the threshold; everything strictly above it is labelled a member.
    threshold = np.sort(scores)[::-1][num_members - 1]
    above = scores > threshold
    tied = scores == threshold
    slots_left = num_members - int(above.sum())  # 1 <= slots_left <= tied.sum()
    true_pos = labels[above].sum() + slots_left * labels[tied].sum() / tied.sum()
    return float(true_pos / num_members)


@dataclass(frozen=True)
class MiaMetrics:
    """One attack's metrics: AUC, TPR at 1% and 0.1% FPR, balanced F1; all fractions in [0, 1]."""

    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_0p1pct_fpr: float
    f1: float

    def as_dict(self, prefix: str) -> dict[str, float]:
        """Metric names for tracking, e.g. prefix "mia_loss" gives "mia_loss_auc", "mia_loss_f1"."""
        return {
            f"{prefix}_auc": self.auc,
            f"{prefix}_tpr_at_1pct_fpr": self.tpr_at_1pct_fpr,
            f"{prefix}_tpr_at_0p1pct_fpr": self.tpr_at_0p1pct_fpr,
            f"{prefix}_f1": self.f1,
        }


def mia_metrics(member_scores, nonmember_scores) -> MiaMetrics:
    """Every docs/science.md metric of one attack, from its member and non-member scores."""
    return MiaMetrics(
        auc=roc_auc(member_scores, nonmember_scores),
        tpr_at_1pct_fpr=tpr_at_fpr(member_scores, nonmember_scores, 0.01),
        tpr_at_0p1pct_fpr=tpr_at_fpr(member_scores, nonmember_scores, 0.001),
        f1=balanced_f1(member_scores, nonmember_scores),
    )
