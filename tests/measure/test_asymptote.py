"""measure/asymptote.py: the fit of a(T) = A - B T^-c recovers a planted asymptote, its interval covers
A as often as it says it does on noisy planted curves, and the fit says why when it cannot extrapolate
(too few branches, c at a bound, non-finite input, a curve that does not rise); a flat curve, or one
that rose and went flat, is at its asymptote; asymptote_metrics gives the cell's metrics."""

import math

import numpy as np
import pytest

from measure.asymptote import (
    EXPONENT_BOUNDS,
    INTERVAL_METHODS,
    MIN_BRANCHES,
    NOISE_FLOOR,
    asymptote_metrics,
    fit_asymptote,
)

HORIZONS = 2000 * 2.0 ** np.arange(6)  # 2K .. 64K steps


def planted(asymptote, gap, exponent, horizons=HORIZONS, noise=0.0, rng=None):
    """a(T) = A - gap (T / T_last)^-c, with Gaussian noise of `noise` x a(T_last) on each branch."""
    clean = asymptote - gap * (horizons / horizons[-1]) ** -exponent
    return clean if not noise else clean + noise * clean[-1] * rng.standard_normal(len(horizons))


def test_an_exact_curve_gives_its_asymptote_and_exponent():
    fit = fit_asymptote(HORIZONS, planted(15_000, 1_000, 0.45))
    assert fit.extrapolable and fit.reason is None and fit.num_branches == 6
    assert fit.asymptote_bits == pytest.approx(15_000, rel=1e-6)
    assert fit.exponent == pytest.approx(0.45, rel=1e-4)
    assert fit.rms_residual_bits < 1e-3
    assert fit.ci_low_bits <= 15_000 <= fit.ci_high_bits


@pytest.mark.parametrize("method", INTERVAL_METHODS)
def test_a_noisy_curve_is_recovered_with_its_interval_covering_A(method):
    rng = np.random.default_rng(3)
    values = planted(26_000, 1_200, 0.6, noise=0.001, rng=rng)
    fit = fit_asymptote(HORIZONS, values, method)
    assert fit.extrapolable
    assert fit.asymptote_bits == pytest.approx(26_000, rel=0.01)
    assert fit.ci_low_bits <= 26_000 <= fit.ci_high_bits
    assert fit.ci_low_bits <= fit.asymptote_bits <= fit.ci_high_bits


def test_the_order_of_the_branches_does_not_matter():
    values = planted(15_000, 1_000, 0.45, noise=0.002, rng=np.random.default_rng(1))
    order = [3, 0, 5, 1, 4, 2]
    assert fit_asymptote(HORIZONS[order], values[order]) == fit_asymptote(HORIZONS, values)


def test_the_interval_covers_A_in_at_least_85_percent_of_200_noisy_planted_curves():
    """4 to 6 branches from 2K steps, noise at the shipped prior (0.3% of a(T_last), what the truth runs
    show); nominal level 95%."""
    rng = np.random.default_rng(20261208)
    covered = extrapolable = 0
    for draw in range(200):
        horizons = HORIZONS[: 4 + draw % 3]
        asymptote, exponent = rng.uniform(1e4, 5e4), rng.uniform(0.3, 0.8)
        values = planted(asymptote, rng.uniform(0.05, 0.3) * asymptote, exponent, horizons, NOISE_FLOOR, rng)
        fit = fit_asymptote(horizons, values)
        if fit.extrapolable:
            extrapolable += 1
            covered += fit.ci_low_bits <= asymptote <= fit.ci_high_bits
    assert extrapolable >= 190
    assert covered / extrapolable >= 0.85


def test_with_four_branches_the_interval_is_wider_than_with_six():
    rng = np.random.default_rng(5)
    values = planted(15_000, 2_000, 0.5, noise=0.002, rng=rng)
    four, six = fit_asymptote(HORIZONS[:4], values[:4]), fit_asymptote(HORIZONS, values)
    assert four.ci_high_bits - four.ci_low_bits > six.ci_high_bits - six.ci_low_bits


def test_branches_before_from_steps_are_left_out_of_the_fit():
    early = np.array([500.0, 1000.0, *HORIZONS])
    values = np.concatenate([[3_000.0, 9_000.0], planted(15_000, 1_000, 0.45)])  # off the later branches' law
    fit = fit_asymptote(early, values, from_steps=2000)
    assert fit == fit_asymptote(HORIZONS, values[2:]) and fit.num_branches == 6
    assert fit.asymptote_bits == pytest.approx(15_000, rel=1e-6)
    assert fit_asymptote(early, values).asymptote_bits != pytest.approx(15_000, rel=0.01)
    assert asymptote_metrics(early, values, values[-1], from_steps=2000)["mem_bits_asymptote"] == fit.asymptote_bits
    assert "at least 4" in fit_asymptote(early, values, from_steps=16_000).reason


def test_three_branches_are_not_extrapolable():
    fit = fit_asymptote(HORIZONS[:3], planted(15_000, 1_000, 0.45, HORIZONS[:3]))
    assert MIN_BRANCHES == 4
    assert not fit.extrapolable and "at least 4" in fit.reason and fit.num_branches == 3
    assert fit.asymptote_bits is fit.ci_low_bits is fit.ci_high_bits is fit.exponent is None


def test_an_exponent_at_its_bound_is_not_extrapolable():
    linear_in_log = 10_000 + 1_000 * np.log2(HORIZONS / HORIZONS[0])  # no saturation: c runs to 0
    fit = fit_asymptote(HORIZONS, linear_in_log)
    assert not fit.extrapolable and "bound" in fit.reason and fit.exponent is None
    jumpy = np.array([10_000, 15_000, 15_100, 15_000, 15_100, 15_000.0])  # c runs to 4, no flat tail
    fit = fit_asymptote(HORIZONS, jumpy)
    assert not fit.extrapolable and str(EXPONENT_BOUNDS[1]) in fit.reason


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_is_not_extrapolable(bad):
    values = planted(15_000, 1_000, 0.45)
    values[2] = bad
    fit = fit_asymptote(HORIZONS, values)
    assert not fit.extrapolable and "finite" in fit.reason
    horizons = HORIZONS.copy()
    horizons[1] = bad
    assert not fit_asymptote(horizons, planted(15_000, 1_000, 0.45)).extrapolable


def test_other_unfittable_inputs_say_why():
    values = planted(15_000, 1_000, 0.45)
    assert "positive" in fit_asymptote(HORIZONS, values - 20_000).reason  # a(T_last) <= 0
    assert "distinct" in fit_asymptote([1000, 1000, 2000, 4000, 8000, 16000], values).reason
    assert "does not rise" in fit_asymptote(HORIZONS, values[::-1]).reason
    assert "horizons for" in fit_asymptote(HORIZONS[:5], values).reason
    with pytest.raises(ValueError, match="unknown interval method"):
        fit_asymptote(HORIZONS, values, "jackknife")


def test_a_flat_curve_is_at_its_asymptote():
    """A cell that memorized its whole dataset: a(T) == H(X) at every branch, or within noise of it."""
    entropy = 32 * 6 * 64.0
    fit = fit_asymptote(HORIZONS, np.full(6, entropy))
    assert fit.extrapolable and fit.exponent is None
    assert fit.asymptote_bits == fit.ci_low_bits == fit.ci_high_bits == entropy
    wobbly = entropy * (1 + 2e-4 * np.array([-1, 1, 0, -1, 1, 0]))
    fit = fit_asymptote(HORIZONS, wobbly)
    assert fit.extrapolable and fit.ci_low_bits <= fit.asymptote_bits <= fit.ci_high_bits
    assert fit.ci_high_bits - fit.ci_low_bits <= 1e-3 * entropy


def test_a_curve_that_rose_then_went_flat_is_at_its_asymptote():
    """A small cell that reached H(X) after its first branch: c runs to its upper bound, and the last
    branches agree: A is the last value, not 'not extrapolable'."""
    step = np.array([10_000, 14_950, 15_000, 15_000, 14_995, 15_000.0])
    fit = fit_asymptote(HORIZONS, step)
    assert fit.extrapolable and fit.exponent is None and fit.asymptote_bits == 15_000
    assert (fit.ci_low_bits, fit.ci_high_bits) == (14_995, 15_000)  # the branches within 0.1% of the last


def test_asymptote_metrics_keys():
    values = planted(15_000, 1_000, 0.45, noise=0.001, rng=np.random.default_rng(0))
    metrics = asymptote_metrics(HORIZONS, values, mem_bits=values[-1])
    assert set(metrics) == {"asymptote_extrapolable", "mem_bits_asymptote", "mem_bits_asymptote_ci_low",
                            "mem_bits_asymptote_ci_high", "asymptote_exponent", "fraction_of_asymptote"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["asymptote_extrapolable"] == 1.0
    assert metrics["fraction_of_asymptote"] == pytest.approx(values[-1] / metrics["mem_bits_asymptote"])
    assert metrics["fraction_of_asymptote"] < 1
    assert asymptote_metrics(HORIZONS[:3], values[:3], values[2]) == {"asymptote_extrapolable": 0.0}
    assert asymptote_metrics([], [], 0.0) == {}
    flat = asymptote_metrics(HORIZONS, np.full(6, 100.0), 100.0)
    assert "asymptote_exponent" not in flat and flat["fraction_of_asymptote"] == 1.0


def test_a_curve_still_in_its_rise_is_not_extrapolable():
    """A cell far past capacity early in its saturation (its last branch at half its fitted A) lies beyond
    what the validation covered (last branches at 0.75-0.92 of A): not extrapolable, with the reason;
    the same curve followed further, to 0.8 of A, is."""
    from measure.asymptote import MIN_REACHED

    horizons = [2000, 4000, 8000, 16000]
    early = [10_000.0 - 60_000.0 * t ** -0.3 for t in horizons]  # a(16K) = 0.47 A
    fit = fit_asymptote(horizons, early)
    assert early[-1] < MIN_REACHED * 10_000.0
    assert not fit.extrapolable and "still in its rise" in fit.reason
    later = [10_000.0 - 3_000.0 * (t / 1000) ** -0.3 for t in horizons]  # a(16K) = 0.84 A
    assert fit_asymptote(horizons, later).extrapolable
