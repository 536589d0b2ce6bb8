"""Capacity, alpha and MIA-law fits recover constants planted in synthetic sweeps."""

import numpy as np
import pytest

from measure.capacity import (
    capacity,
    fit_alpha,
    fit_mia_law,
    mem_prediction_error,
    mia_law,
)

BITS_PER_SEQUENCE = 64 * 11  # S = 64, V = 2048


def planted_sweep(params: float, alpha: float, num_seeds: int, rng):
    """(sizes, mem_bits) per cell: min(alpha * P, H), 1% seed noise, a dip at the largest N."""
    sizes = np.array([250, 500, 1000, 2000, 4000, 8000, 16000])
    entropy_bits = sizes * BITS_PER_SEQUENCE
    plateau = np.minimum(alpha * params, entropy_bits)
    plateau[-1] *= 0.9  # past capacity training gets harder: the largest set memorizes less
    cell_sizes = np.repeat(sizes, num_seeds)
    cell_bits = np.repeat(plateau, num_seeds) * (1 + 0.01 * rng.standard_normal(cell_sizes.size))
    return cell_sizes, cell_bits


def test_capacity_recovers_planted_plateau():
    rng = np.random.default_rng(0)
    sizes, bits = planted_sweep(params=1e6, alpha=3.6, num_seeds=4, rng=rng)
    estimate = capacity(sizes, bits, np.ones(sizes.size, dtype=bool))
    assert estimate.capacity_bits == pytest.approx(3.6e6, rel=0.01)
    assert estimate.num_sequences_at_max == 8000  # first size whose entropy exceeds 3.6e6 bits
    assert 0 < estimate.seed_std_bits < 0.03 * 3.6e6
    assert estimate.lower_bound is False


def test_capacity_averages_seeds_before_the_maximum():
    # One lucky seed at N=2 must not win: means are 10 (N=1) and 9 (N=2).
    estimate = capacity([1, 1, 2, 2], [10.0, 10.0, 3.0, 15.0], [True] * 4)
    assert estimate.capacity_bits == 10.0
    assert estimate.num_sequences_at_max == 1
    assert estimate.seed_std_bits == 0.0


def test_capacity_flags_unconverged_cell_at_the_maximum():
    sizes, bits = [1, 2, 2, 3], [5.0, 9.0, 11.0, 7.0]
    assert capacity(sizes, bits, [True, True, False, True]).lower_bound is True
    assert capacity(sizes, bits, [False, True, True, False]).lower_bound is False
    single = capacity([1, 2], [5.0, 9.0], [True, True])
    assert single.seed_std_bits == 0.0 and single.capacity_bits == 9.0


def test_capacity_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        capacity([1, 2], [1.0], [True, True])


def test_fit_alpha_recovers_planted_alpha_with_seeds():
    rng = np.random.default_rng(1)
    params = np.array([8e4, 2e5, 5e5, 1e6, 2e6, 4e6, 7e6])
    by_seed = [3.6 * p * (1 + 0.02 * rng.standard_normal(5)) for p in params]
    fit = fit_alpha(params, by_seed, n_boot=2000, seed=0)
    assert fit.alpha == pytest.approx(3.6, rel=0.02)
    assert fit.ci_low < 3.6 < fit.ci_high
    assert fit.ci_high - fit.ci_low < 0.1 * 3.6
    assert fit.n_models == 7


def test_fit_alpha_single_seed_resamples_models():
    params = np.array([1e5, 2e5, 4e5, 8e5])
    capacity_bits = 3.5 * params * np.array([1.05, 0.95, 1.02, 0.99])
    fit = fit_alpha(params, capacity_bits, n_boot=500, seed=0)
    assert fit.alpha == pytest.approx(np.dot(params, capacity_bits) / np.dot(params, params))
    assert fit.ci_low < fit.alpha < fit.ci_high  # not collapsed to the point


def test_fit_mia_law_recovers_planted_constants():
    rng = np.random.default_rng(2)
    x = np.linspace(0.0, 0.2, 40)  # sequences per parameter
    f1 = mia_law(x, 1.0, -40.0, 2.0) + 0.005 * rng.standard_normal(x.size)
    fit = fit_mia_law(x, f1)
    assert fit.c1 == pytest.approx(1.0, abs=0.05)
    assert fit.c2 == pytest.approx(-40.0, rel=0.1)
    assert fit.c3 == pytest.approx(2.0, rel=0.1)
    assert fit.rmse < 0.01
    assert 0 < fit.c2_std < 5


def test_fit_mia_law_needs_three_points():
    with pytest.raises(ValueError, match="at least 3"):
        fit_mia_law([0.1, 0.2], [0.6, 0.55])


def test_prediction_error_is_signed_and_relative():
    np.testing.assert_allclose(mem_prediction_error([90.0, 120.0], [100.0, 100.0]), [-0.1, 0.2])
