"""Capacity, alpha and MIA-law fits recover constants planted in synthetic sweeps; both alpha
statistics reproduce the paper's own numbers from its table; the lower-bound flag looks at every
plateau cell; the alpha interval carries the scatter between shapes."""

import numpy as np
import pytest

from measure.capacity import (
    SizeCells,
    alpha_mean_ratio,
    alpha_slope,
    bootstrap_capacities,
    capacity,
    cell_extrapolations,
    extrapolated_capacity,
    fit_alpha,
    interval_kind,
    fit_mia_law,
    mem_prediction_error,
    mia_law,
    mia_law_unidentifiable,
    size_cells,
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


# -- the extrapolated capacity ------------------------------------------------------------------------------
def test_each_cells_extrapolated_value_follows_its_fit_its_convergence_and_its_entropy():
    # An extrapolable fit (A = 120 under H = 200), one whose A exceeds H (capped), a converged cell without
    # a fit (its measured value), an unconverged one without (none), a NaN flag (not logged: no fit).
    e = cell_extrapolations(mem_bits=[100.0, 90.0, 80.0, 70.0, 60.0], converged=[False, True, True, False, True],
                            extrapolable=[1.0, 1.0, 0.0, 0.0, np.nan], asymptote=[120.0, 300.0, np.nan, np.nan, 99.0],
                            ci_low=[110.0, 280.0, np.nan, np.nan, np.nan], ci_high=[140.0, 320.0, np.nan, np.nan, np.nan],
                            entropy_bits=[200.0, 150.0, 100.0, 100.0, 100.0])
    np.testing.assert_allclose(e.value, [120.0, 150.0, 80.0, np.nan, 60.0])
    assert list(e.from_asymptote) == [True, True, False, False, False] and list(e.capped) == [False, True, False, False, False]
    # The split normal's sigmas match the 95% interval on each side of A.
    assert e.sd_low[0] == pytest.approx(10.0 / 1.959964) and e.sd_high[0] == pytest.approx(20.0 / 1.959964)
    assert e.sd_low[2] == 0.0 and e.sd_high[2] == 0.0


def _asymptote_group(rng, unconverged_without_fit=None):
    """Sizes 100..1600 (H = 10 N), three seeds each: a true capacity of 5,000 bits; plateau cells
    reached 80% of theirs (A logged within 1% noise, a +-4% interval), the others converged."""
    sizes = np.repeat([100, 200, 400, 800, 1600], 3)
    entropy = 10.0 * sizes
    truth = np.minimum(5000.0, entropy)
    plateau = entropy > 5000.0
    mem = np.where(plateau, 0.8 * truth, truth)
    a = truth * (1 + 0.01 * rng.standard_normal(sizes.size))
    extrapolable = plateau.astype(float)
    converged = ~plateau
    if unconverged_without_fit is not None:
        extrapolable[unconverged_without_fit] = 0.0
    e = cell_extrapolations(mem, converged, extrapolable, np.where(plateau, a, np.nan), a - 0.04 * truth,
                            a + 0.04 * truth, entropy)
    return sizes, mem, entropy, e


def test_the_extrapolated_capacity_recovers_planted_asymptotes_and_its_interval_covers_them():
    rng = np.random.default_rng(11)
    sizes, mem, entropy, e = _asymptote_group(rng)
    measured = capacity(sizes, mem, ~(entropy > 5000.0), entropy)
    assert measured.capacity_bits == pytest.approx(4000.0) and measured.lower_bound  # 80% of 5,000 bits
    estimate = extrapolated_capacity(sizes, mem, entropy, e, measured.capacity_bits, n_boot=400)
    assert estimate.reason is None and estimate.capacity_bits == pytest.approx(5000.0, rel=0.02)
    assert estimate.ci_low < 5000.0 < estimate.ci_high  # the interval carries each cell's own
    assert estimate.ci_high - estimate.ci_low < 0.1 * 5000.0
    assert estimate.from_asymptote == 6 and estimate.capped == 0


def test_an_unconverged_plateau_cell_without_a_fit_makes_the_extrapolation_a_lower_bound():
    """Such a cell (its branches still climbing) has no asymptote: it is left out of the maximum, and the
    extrapolated capacity of the others is a lower bound, since its asymptote could lift the maximum; a
    group with no plateau cell left has none."""
    rng = np.random.default_rng(12)
    sizes, mem, entropy, e = _asymptote_group(rng, unconverged_without_fit=13)  # N = 1,600, a plateau cell
    complete = extrapolated_capacity(*_asymptote_group(np.random.default_rng(12))[:3],
                                     _asymptote_group(np.random.default_rng(12))[3], 4000.0, n_boot=50)
    estimate = extrapolated_capacity(sizes, mem, entropy, e, 4000.0, n_boot=50)
    assert not complete.lower_bound and complete.reason is None
    assert estimate.lower_bound and estimate.missing_plateau_cells == (13,)
    assert "a lower bound of the extrapolation" in estimate.reason
    keep = np.arange(sizes.size) != 13  # the same as the group without that cell
    alone = extrapolated_capacity(sizes[keep], mem[keep], entropy[keep], e.select(keep), 4000.0, n_boot=50)
    assert estimate.capacity_bits == alone.capacity_bits and estimate.ci_low == alone.ci_low
    plateau = entropy > 4000.0  # every plateau cell unconverged and without a fit
    nan = np.full(sizes.size, np.nan)
    none_left = cell_extrapolations(mem, ~plateau, np.zeros(sizes.size), nan, nan, nan, entropy)
    empty = extrapolated_capacity(sizes, mem, entropy, none_left, 4000.0, n_boot=20)
    assert empty.capacity_bits is None and "nothing to extrapolate" in empty.reason
    # Below the measured capacity such a cell cannot hold the maximum: it enters with its measured value.
    e2 = cell_extrapolations([10.0, 50.0], [False, True], [0.0, 0.0], [np.nan, np.nan], [np.nan] * 2, [np.nan] * 2,
                             [20.0, 60.0])
    below = extrapolated_capacity([1, 2], [10.0, 50.0], [20.0, 60.0], e2, 50.0, n_boot=20)
    assert below.capacity_bits == 50.0 and below.ci_low == below.ci_high == 50.0


def test_the_extrapolated_alpha_draws_each_asymptote_within_its_interval():
    # Eight shapes, one seed at one size each, their A exactly 3.6 * P with a +-10% interval: the point
    # is 3.6 and the interval is wide only because of the cells' own uncertainty.
    params = np.geomspace(1e5, 7e6, 8)
    exact = [[SizeCells(np.array([3.6 * p]), np.array([0.0]), np.array([0.0]), np.array([1e12]))] for p in params]
    uncertain = [[SizeCells(np.array([3.6 * p]), np.array([0.36 * p / 1.96]), np.array([0.36 * p / 1.96]),
                            np.array([1e12]))] for p in params]
    sharp, blurred = fit_alpha(params, exact, n_boot=400), fit_alpha(params, uncertain, n_boot=400)
    for statistic in ("slope", "mean_ratio"):
        assert sharp[statistic].alpha == pytest.approx(3.6) and blurred[statistic].alpha == pytest.approx(3.6)
        assert sharp[statistic].ci_high - sharp[statistic].ci_low < 1e-9
        assert blurred[statistic].ci_low < 3.6 < blurred[statistic].ci_high
        assert blurred[statistic].ci_high - blurred[statistic].ci_low > 0.03 * 3.6
    # A cap below A: every draw and the point are capped at H(X).
    capped = fit_alpha([10.0, 20.0], [[SizeCells(np.array([50.0]), np.array([5.0]), np.array([5.0]), np.array([30.0]))],
                                      [SizeCells(np.array([90.0]), np.array([5.0]), np.array([5.0]), np.array([60.0]))]],
                       n_boot=200)
    assert capped["mean_ratio"].alpha == pytest.approx(3.0) and capped["mean_ratio"].ci_high <= 3.0 + 1e-9


def test_size_cells_fill_cells_without_a_value_with_their_measured_bits():
    e = cell_extrapolations([10.0, 20.0, 30.0], [False, True, False], [0.0, 0.0, 1.0], [np.nan, np.nan, 45.0],
                            [np.nan, np.nan, 40.0], [np.nan, np.nan, 50.0], [15.0, 25.0, 40.0])
    first, second = size_cells([1, 1, 2], e, np.array([10.0, 20.0, 30.0]))
    np.testing.assert_allclose(first.value, [10.0, 20.0])
    np.testing.assert_allclose(second.value, [45.0])  # A itself: the cap applies to each draw
    np.testing.assert_allclose(second.cap, [40.0])


@pytest.mark.parametrize("shapes, kind", [(1, "none"), (2, "range"), (4, "range"), (5, "ci"), (9, "ci")])
def test_an_alpha_bootstrap_over_fewer_than_five_shapes_is_a_range(shapes, kind):
    assert interval_kind(shapes) == kind
    params = np.geomspace(1e5, 1e6, shapes)
    fits = fit_alpha(params, [[np.array([3.5 * p, 3.7 * p])] for p in params], n_boot=50)
    assert {fit.interval_kind for fit in fits.values()} == {kind}


def test_cells_only_on_the_two_tails_do_not_identify_the_law():
    tails = [1.0, 0.99, 0.98, 0.52, 0.5, 0.51]  # F1 ~1 at small x, ~0.5 at large x, nothing between
    reason = mia_law_unidentifiable(tails)
    assert reason is not None and "no cell inside the transition (0.55 < F1 < 0.95)" in reason
    assert "3 at F1 >= 0.95, 3 at F1 <= 0.55" in reason and "c2" in reason
    assert mia_law_unidentifiable(tails + [0.75]) is None  # one cell inside the transition
    assert mia_law_unidentifiable([0.96, 0.55, 0.95]) is not None  # the bounds themselves are tails
