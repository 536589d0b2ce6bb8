"""Capacity, alpha and MIA-law fits recover constants planted in synthetic sweeps; both alpha
statistics reproduce the paper's own numbers from its table; the lower-bound flag looks at every
plateau cell; the alpha interval carries the scatter between shapes."""

import numpy as np
import pytest

from measure.capacity import (
    alpha_mean_ratio,
    alpha_slope,
    bootstrap_capacities,
    capacity,
    fit_alpha,
    fit_mia_law,
    mem_prediction_error,
    mia_law,
    mia_law_unidentifiable,
)
from measure.paper import paper_alpha, reference_rows

BITS_PER_SEQUENCE = 64 * 11  # S = 64, V = 2048


def planted_sweep(params: float, alpha: float, num_seeds: int, rng):
    """(sizes, mem_bits, entropy_bits) per cell: min(alpha * P, H), 1% seed noise, a dip at the largest N."""
    sizes = np.array([250, 500, 1000, 2000, 4000, 8000, 16000])
    entropy_bits = sizes * BITS_PER_SEQUENCE
    plateau = np.minimum(alpha * params, entropy_bits)
    plateau[-1] *= 0.9  # past capacity training gets harder: the largest set memorizes less
    cell_sizes = np.repeat(sizes, num_seeds)
    cell_bits = np.repeat(plateau, num_seeds) * (1 + 0.01 * rng.standard_normal(cell_sizes.size))
    return cell_sizes, cell_bits, cell_sizes * float(BITS_PER_SEQUENCE)


def test_capacity_recovers_planted_plateau():
    rng = np.random.default_rng(0)
    sizes, bits, entropy = planted_sweep(params=1e6, alpha=3.6, num_seeds=4, rng=rng)
    estimate = capacity(sizes, bits, np.ones(sizes.size, dtype=bool), entropy)
    assert estimate.capacity_bits == pytest.approx(3.6e6, rel=0.01)
    assert estimate.num_sequences_at_max == 8000  # first size whose entropy exceeds 3.6e6 bits
    assert 0 < estimate.seed_std_bits < 0.03 * 3.6e6
    assert estimate.lower_bound is False and estimate.unconverged_plateau_cells == ()


def test_capacity_averages_seeds_before_the_maximum():
    # One lucky seed at N=2 must not win: means are 10 (N=1) and 9 (N=2).
    estimate = capacity([1, 1, 2, 2], [10.0, 10.0, 3.0, 15.0], [True] * 4, [20.0, 20.0, 40.0, 40.0])
    assert estimate.capacity_bits == 10.0
    assert estimate.num_sequences_at_max == 1
    assert estimate.seed_std_bits == 0.0


# H(X) = 10 * N; the means rise to 25 bits at N = 3 and dip to 24 at N = 4.
SIZES, ENTROPY, BITS = [1, 2, 3, 4], [10.0, 20.0, 30.0, 40.0], [10.0, 20.0, 25.0, 24.0]


def test_an_unconverged_plateau_cell_away_from_the_maximum_makes_a_lower_bound():
    # N = 4 holds 40 bits > the 25-bit capacity: trained longer it could overtake N = 3.
    estimate = capacity(SIZES, BITS, [True, True, True, False], ENTROPY)
    assert estimate.num_sequences_at_max == 3 and estimate.capacity_bits == 25.0
    assert estimate.lower_bound is True and estimate.unconverged_plateau_cells == (3,)
    assert capacity(SIZES, BITS, [True, True, False, True], ENTROPY).lower_bound is True  # at the maximum too


def test_an_unconverged_cell_below_the_capacity_is_no_lower_bound():
    # N = 2 holds 20 bits <= 25: however long it trains it cannot pass the capacity.
    estimate = capacity(SIZES, BITS, [False, False, True, True], ENTROPY)
    assert estimate.lower_bound is False and estimate.unconverged_plateau_cells == ()
    # H(X) equal to the capacity is not above it: a fully memorized maximum cannot grow.
    tied = capacity([1, 2, 3], [10.0, 20.0, 19.0], [True, False, True], [10.0, 20.0, 30.0])
    assert tied.capacity_bits == 20.0 and tied.lower_bound is False


def test_capacity_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        capacity([1, 2], [1.0], [True, True], [1.0, 2.0])


def _paper_table(precision):
    rows = reference_rows("capacity_by_precision.csv")
    return np.array([r["params"] for r in rows]), np.array([r[f"capacity_bits_{precision}"] for r in rows])


@pytest.mark.parametrize("precision, slope, mean_ratio", [("fp32", 3.875, 3.828), ("bf16", 3.602, 3.517)])
def test_both_alpha_statistics_reproduce_the_papers_numbers_from_its_table(precision, slope, mean_ratio):
    params, bits = _paper_table(precision)
    assert round(float(alpha_slope(params, bits)), 3) == slope
    assert round(float(alpha_mean_ratio(params, bits)), 3) == mean_ratio
    assert paper_alpha(precision) == {"slope": pytest.approx(slope, abs=5e-4),
                                      "mean_ratio": pytest.approx(mean_ratio, abs=5e-4)}
    # One shape of one seed at one size per row: fit_alpha's point estimates are the same numbers.
    fits = fit_alpha(params, [[np.array([c])] for c in bits], n_boot=200)
    assert round(fits["slope"].alpha, 3) == slope and round(fits["mean_ratio"].alpha, 3) == mean_ratio


def _shapes(scatter, rng):
    """Eight shapes whose capacity is 3.6 * P * (1 + scatter * noise), each with three seeds that agree
    exactly at each of two dataset sizes (the smaller one below capacity)."""
    params = np.geomspace(1e5, 7e6, 8)
    capacities = 3.6 * params * (1 + scatter * rng.standard_normal(params.size))
    seeds = [[np.full(3, 0.5 * c), np.full(3, c)] for c in capacities]
    return params, seeds


def test_the_alpha_interval_widens_with_scatter_between_shapes_when_seeds_agree():
    rng = np.random.default_rng(4)
    on_the_line = fit_alpha(*_shapes(0.0, rng), n_boot=500)
    scattered = fit_alpha(*_shapes(0.1, rng), n_boot=500)
    for statistic in ("slope", "mean_ratio"):
        exact, spread = on_the_line[statistic], scattered[statistic]
        assert exact.alpha == pytest.approx(3.6)
        assert exact.ci_high - exact.ci_low < 1e-9  # no scatter, no seed noise: nothing to show
        assert spread.ci_low < spread.alpha < spread.ci_high
        assert spread.ci_high - spread.ci_low > 0.05 * 3.6, statistic  # seeds agree: all of it is shapes


def test_the_bootstrap_retakes_each_capacity_from_resampled_seeds():
    # One shape: size A's seeds are 1 and 3 bits, size B's 2 and 2. A resampled capacity is the larger
    # of A's resampled mean (1, 2 or 3) and 2: never 1, sometimes 3.
    params, capacities = bootstrap_capacities([10.0], [[np.array([1.0, 3.0]), np.array([2.0, 2.0])]], n_boot=400)
    assert params.shape == capacities.shape == (400, 1)
    assert set(np.unique(capacities)) == {2.0, 3.0}


def test_one_shape_gives_alpha_without_an_interval():
    fits = fit_alpha([1e5], [[np.array([3.4e5, 3.6e5])]], n_boot=100)
    for fit in fits.values():
        assert fit.alpha == pytest.approx(3.5) and fit.ci_low is None and fit.ci_high is None
        assert fit.n_models == 1


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


def test_a_law_without_a_transition_is_not_identifiable():
    x = np.linspace(0.001, 0.02, 12)
    assert mia_law_unidentifiable(mia_law(x, 1.0, -40.0, 2.0)) is None  # falls from ~0.94 to ~0.88
    saturated = np.clip(1.0 - 0.01 * np.random.default_rng(5).random(x.size), 0, 1)
    assert "within 0.02 of 1" in mia_law_unidentifiable(saturated)
    assert "within 0.02 of 0.5" in mia_law_unidentifiable(0.5 + 0.015 * np.sin(x * 1e3))
    assert mia_law_unidentifiable([0.5, 0.75, 1.0]) is None


def test_fit_mia_law_needs_three_points():
    with pytest.raises(ValueError, match="at least 3"):
        fit_mia_law([0.1, 0.2], [0.6, 0.55])


def test_prediction_error_is_signed_and_relative():
    np.testing.assert_allclose(mem_prediction_error([90.0, 120.0], [100.0, 100.0]), [-0.1, 0.2])
