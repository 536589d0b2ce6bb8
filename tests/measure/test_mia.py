"""Membership-inference metrics on score sets whose answers are known analytically."""

import numpy as np
import pytest

from measure.mia import balanced_f1, mia_metrics, roc_auc, tpr_at_fpr


def test_auc_separated_reversed_and_tied():
    members, nonmembers = np.arange(10.0, 20.0), np.arange(0.0, 10.0)
    assert roc_auc(members, nonmembers) == 1.0
    assert roc_auc(nonmembers, members) == 0.0
    same = np.array([1.0, 2.0, 2.0, 3.0])
    assert roc_auc(same, same) == 0.5
    assert roc_auc(np.zeros(7), np.zeros(3)) == 0.5


def test_auc_of_random_scores_is_near_half():
    rng = np.random.default_rng(0)
    assert roc_auc(rng.normal(size=5000), rng.normal(size=5000)) == pytest.approx(0.5, abs=0.02)


def test_tpr_at_fpr_hand_example():
    # Non-members 0..9, members 8.5, 9.5, 10, 11. "score >= 9.5" catches 3 members and no non-member
    # (FPR 0, TPR 3/4); "score >= 8.5" catches all 4 and non-member 9 (FPR 1/10, TPR 1).
    members = np.array([8.5, 9.5, 10.0, 11.0])
    nonmembers = np.arange(10.0)
    assert tpr_at_fpr(members, nonmembers, 0.0) == 0.75
    assert tpr_at_fpr(members, nonmembers, 0.05) == 0.75
    assert tpr_at_fpr(members, nonmembers, 0.1) == 1.0


def test_tpr_at_fpr_does_not_split_ties():
    # A member tied with a non-member at the top: taking it costs FPR 1/2, so below that nothing is
    # found (interpolating along the ROC segment would claim TPR 1/4 at FPR 1/4).
    assert tpr_at_fpr([5.0, 1.0], [5.0, 0.0], 0.0) == 0.0
    assert tpr_at_fpr([5.0, 1.0], [5.0, 0.0], 0.25) == 0.0
    assert tpr_at_fpr([5.0, 1.0], [5.0, 0.0], 0.5) == 1.0


def test_balanced_f1_separated_and_tied():
    assert balanced_f1(np.arange(10.0, 20.0), np.arange(10.0)) == 1.0
    assert balanced_f1(np.ones(100), np.ones(100)) == 0.5
    assert balanced_f1(np.arange(10.0), np.arange(10.0)) == 0.5


def test_balanced_f1_of_random_scores_is_near_half():
    rng = np.random.default_rng(1)
    f1 = balanced_f1(rng.normal(size=10000), rng.normal(size=10000))
    assert f1 == pytest.approx(0.5, abs=0.03)


def test_balanced_f1_hand_example():
    # Members 4, 3, 1; non-members 2, 0, 0. The top 3 scores are 4, 3, 2: TP = 2, F1 = 2/3.
    assert balanced_f1([4.0, 3.0, 1.0], [2.0, 0.0, 0.0]) == pytest.approx(2 / 3)
    # Members 3, 1; non-members 1, 0. Top 2 = {3} plus one of the two 1s (a member half the time):
    # expected TP = 1.5, F1 = 0.75.
    assert balanced_f1([3.0, 1.0], [1.0, 0.0]) == pytest.approx(0.75)


def test_metrics_bundle_and_names():
    metrics = mia_metrics(np.arange(10.0, 20.0), np.arange(10.0))
    assert metrics.as_dict("mia_loss") == {
        "mia_loss_auc": 1.0,
        "mia_loss_tpr_at_1pct_fpr": 1.0,
        "mia_loss_tpr_at_0p1pct_fpr": 1.0,
        "mia_loss_f1": 1.0,
    }


@pytest.mark.parametrize(
    "members, nonmembers, message",
    [([], [1.0], "member_scores is empty"), ([1.0], [], "nonmember_scores is empty"),
     ([1.0, np.nan], [0.0], "NaN")],
)
def test_bad_inputs_raise(members, nonmembers, message):
    with pytest.raises(ValueError, match=message):
        mia_metrics(members, nonmembers)
