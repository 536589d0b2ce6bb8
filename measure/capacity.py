"""Capacity, bits per parameter and the membership-inference scaling law over a sweep.

docs/science.md, "Capacity (sweep)", "Alpha" and "The MIA law": a model's capacity is its plateau of
memorized bits as the dataset grows, in two forms: measured (from each cell's mem_bits; a lower bound
unless its plateau cells converged) and extrapolated (from each cell's asymptote A of a(T) = A - B T^-c,
capped at H(X), with an interval that draws each A within its own); alpha (bits per parameter) is given
by two statistics over the shapes of one (precision, V, S, recipe) group, the slope through the origin
of capacity against params and the mean of capacity / params, each with a two-level bootstrap interval
(shapes, then seeds, plus each cell's asymptote uncertainty for the extrapolated form) that is called a
range below MIN_SHAPES_FOR_CI shapes; the MIA law ties balanced F1 to sequences per parameter and is
identifiable only with a cell inside its transition. Inputs are plain arrays taken from the sweep's table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy.optimize import curve_fit
from scipy.special import expit, logit


@dataclass(frozen=True)
class CapacityEstimate:
    """One (model shape, precision)'s capacity, in bits."""

    capacity_bits: float  # seed-mean mem_bits at the dataset size where that mean is largest
    seed_std_bits: float  # sample std (ddof=1) of mem_bits over seeds at that size; 0 for one seed
    num_sequences_at_max: int  # the dataset size N of the maximum
    lower_bound: bool  # True when a plateau cell had not converged: capacity may be higher
    unconverged_plateau_cells: tuple[int, ...]  # input positions of those cells (H(X) > capacity)


def capacity(dataset_sizes, mem_bits, converged, entropy_bits) -> CapacityEstimate:
    """Capacity of one (model shape, precision) from its cells, each argument shape (num_cells,).

    `dataset_sizes` holds each cell's N (number of training sequences), `mem_bits` its dataset
    memorization, `converged` whether its mem_bits had settled, `entropy_bits` its H(X). Cells
    sharing N are the seeds of that size and are averaged first; the capacity is the largest of
    those means (the smallest N wins a tie).

    It is a lower bound when any cell whose H(X) exceeds the capacity had not converged, wherever
    its N: those cells hold more bits than the capacity, so training one longer could lift its size's
    mean above the maximum. A cell with H(X) <= capacity cannot, whatever its state.
    """
    sizes = np.asarray(dataset_sizes).ravel()
    bits = np.asarray(mem_bits, dtype=np.float64).ravel()
    done = np.asarray(converged, dtype=bool).ravel()
    entropy = np.asarray(entropy_bits, dtype=np.float64).ravel()
    if not sizes.size == bits.size == done.size == entropy.size:
        raise ValueError(
            f"dataset_sizes, mem_bits, converged and entropy_bits differ in length: "
            f"{sizes.size}, {bits.size}, {done.size}, {entropy.size}"
        )
    if sizes.size == 0:
        raise ValueError("no cells: capacity needs at least one (dataset size, mem_bits) pair")
    if not (np.all(np.isfinite(bits)) and np.all(np.isfinite(entropy))):
        raise ValueError("mem_bits or entropy_bits contains NaN or infinite values")

    unique_sizes, cell_to_size = np.unique(sizes, return_inverse=True)  # sorted ascending
    mean_bits = np.bincount(cell_to_size, weights=bits) / np.bincount(cell_to_size)
    best = int(np.argmax(mean_bits))
    seeds = bits[cell_to_size == best]
    unconverged = np.flatnonzero((entropy > mean_bits[best]) & ~done)
    return CapacityEstimate(
        capacity_bits=float(mean_bits[best]),
        seed_std_bits=float(seeds.std(ddof=1)) if seeds.size > 1 else 0.0,
        num_sequences_at_max=int(unique_sizes[best]),
        lower_bound=bool(unconverged.size),
        unconverged_plateau_cells=tuple(int(i) for i in unconverged),
    )


Z95 = 1.959963984540054  # the standard normal's 97.5th percentile: a 95% interval is +- Z95 sigma


@dataclass(frozen=True)
class CellExtrapolations:
    """Each cell's extrapolated memorization (bits) and the spread its draws take, arrays (num_cells,).

    `value` is min(A, H(X)) for a cell with an extrapolable asymptote A, its measured mem_bits for a
    converged cell without one (it is at its asymptote), NaN for an unconverged cell without one (its
    asymptote is unknown). `sd_low` / `sd_high` are the standard deviations, below and above A, of the
    split normal whose 2.5th and 97.5th percentiles are the cell's 95% interval for A (0 where no
    interval is known); `cap` is H(X): no draw exceeds it.
    """

    value: np.ndarray
    asymptote: np.ndarray  # A itself (uncapped), NaN where the cell has none
    sd_low: np.ndarray
    sd_high: np.ndarray
    cap: np.ndarray
    from_asymptote: np.ndarray  # bool: the value is the cell's (capped) asymptote
    capped: np.ndarray  # bool: A exceeded H(X), so the value is H(X)

    def select(self, rows: np.ndarray) -> CellExtrapolations:
        """The cells at `rows` (a bool mask or indices)."""
        return CellExtrapolations(*(np.asarray(field)[rows] for field in dataclasses.astuple(self)))


def cell_extrapolations(mem_bits, converged, extrapolable, asymptote, ci_low, ci_high,
                        entropy_bits) -> CellExtrapolations:
    """The extrapolated memorization of each cell (bits) from its logged asymptote fit, arrays of shape
    (num_cells,): `extrapolable` 0/1 (NaN: not logged, counted as 0), `asymptote` A and its 95% interval
    `ci_low`, `ci_high` (NaN where absent), `entropy_bits` H(X). See CellExtrapolations."""
    mem = np.asarray(mem_bits, dtype=np.float64).ravel()
    done = np.asarray(converged, dtype=bool).ravel()
    a = np.asarray(asymptote, dtype=np.float64).ravel()
    fitted = (np.nan_to_num(np.asarray(extrapolable, dtype=np.float64).ravel(), nan=0.0) > 0.5) & np.isfinite(a)
    cap = np.asarray(entropy_bits, dtype=np.float64).ravel()
    low = np.asarray(ci_low, dtype=np.float64).ravel()
    high = np.asarray(ci_high, dtype=np.float64).ravel()
    value = np.where(fitted, np.minimum(a, cap), np.where(done, mem, np.nan))
    sd_low = np.where(fitted & np.isfinite(low), np.maximum(a - low, 0.0) / Z95, 0.0)
    sd_high = np.where(fitted & np.isfinite(high), np.maximum(high - a, 0.0) / Z95, 0.0)
    return CellExtrapolations(value, np.where(fitted, a, np.nan), sd_low, sd_high, cap, fitted, fitted & (a > cap))


def _draw(value: np.ndarray, sd_low: np.ndarray, sd_high: np.ndarray, cap: np.ndarray, rng) -> np.ndarray:
    """One draw of each value from its split normal (sd_low below, sd_high above), kept in [0, cap]."""
    z = rng.standard_normal(value.shape)
    return np.clip(value + z * np.where(z < 0, sd_low, sd_high), 0.0, cap)


@dataclass(frozen=True)
class SizeCells:
    """One dataset size's seeds of one shape for the extrapolated bootstrap: each seed's extrapolated
    value (bits, the asymptote where it has one: uncapped, so a draw is capped once), its split-normal
    spreads and its cap H(X)."""

    value: np.ndarray
    sd_low: np.ndarray
    sd_high: np.ndarray
    cap: np.ndarray


def size_cells(dataset_sizes, extrapolations: CellExtrapolations, fill: np.ndarray) -> list[SizeCells]:
    """A shape's cells split by dataset size (ascending) for the extrapolated bootstrap; `fill` gives the
    value of a cell with no extrapolated one (its measured mem_bits, for cells off the plateau)."""
    sizes = np.asarray(dataset_sizes).ravel()
    e = extrapolations
    centre = np.where(e.from_asymptote, e.asymptote, np.where(np.isfinite(e.value), e.value, fill))
    return [SizeCells(centre[sizes == n], e.sd_low[sizes == n], e.sd_high[sizes == n], e.cap[sizes == n])
            for n in np.unique(sizes)]


def _point_capacity(sizes: list) -> float:
    """A shape's capacity from its per-size seeds: the maximum over sizes of the seed means (of the
    capped extrapolated values, for SizeCells)."""
    if isinstance(sizes[0], SizeCells):
        return float(max(np.minimum(s.value, s.cap).mean() for s in sizes))
    return float(max(seeds.mean() for seeds in sizes))


@dataclass(frozen=True)
class ExtrapolatedCapacity:
    """One group's extrapolated capacity (bits), or why it has none."""

    capacity_bits: float | None  # max over sizes of the seed means of the cells' extrapolated values
    ci_low: float | None  # 95% percentile interval of the bootstrap (seeds resampled, each A drawn)
    ci_high: float | None
    num_sequences_at_max: int | None
    reason: str | None  # None when there is a value and it is not a lower bound
    missing_plateau_cells: tuple[int, ...]  # unconverged plateau cells without an extrapolable fit
    lower_bound: bool  # missing plateau cells were left out: their asymptotes could lift the maximum
    from_asymptote: int  # cells whose value is their asymptote (the others: converged, at theirs)
    capped: int  # of those, cells whose A exceeded H(X) and count as H(X)


def extrapolated_capacity(dataset_sizes, mem_bits, entropy_bits, extrapolations: CellExtrapolations,
                          measured_capacity_bits: float, *, n_boot: int = 1000, seed: int = 0,
                          ci: float = 0.95) -> ExtrapolatedCapacity:
    """The extrapolated capacity of one (model shape, precision) group: the maximum over dataset sizes
    of the seed means of each cell's extrapolated value (cell_extrapolations), with a percentile
    interval from `n_boot` replicates that resample each size's seeds and draw each cell's A from its
    split normal (capped at H(X)), then retake the maximum.

    An unconverged cell without an extrapolable asymptote (its branches still climbing at the last
    horizon, as on data far past capacity) has no extrapolated value. Below the measured capacity (it
    cannot reach the maximum) it enters with its measured mem_bits. On the plateau, where the maximum
    could lie, it is left out and the extrapolated capacity is a **lower bound** (its asymptote could
    lift the maximum), with the reason naming those cells; a group with no plateau cell left has none.
    """
    sizes = np.asarray(dataset_sizes).ravel()
    mem = np.asarray(mem_bits, dtype=np.float64).ravel()
    entropy = np.asarray(entropy_bits, dtype=np.float64).ravel()
    e = extrapolations
    missing = np.flatnonzero(~np.isfinite(e.value) & (entropy > measured_capacity_bits))
    counts = dict(from_asymptote=int(e.from_asymptote.sum()), capped=int(e.capped.sum()))
    keep = np.ones(sizes.size, dtype=bool)
    keep[missing] = False
    if not (keep & (entropy > measured_capacity_bits)).any():
        return ExtrapolatedCapacity(None, None, None, None,
                                    f"{missing.size} unconverged plateau cell(s) without an extrapolable asymptote "
                                    "and no plateau cell with one: nothing to extrapolate the maximum from",
                                    tuple(int(i) for i in missing), bool(missing.size), **counts)
    per_size = size_cells(sizes[keep], e.select(keep), mem[keep])
    point = [_point_capacity([s]) for s in per_size]
    best = int(np.argmax(point))
    replicates = _resampled_extrapolated(per_size, np.random.default_rng(seed), (n_boot,))
    tail = (1.0 - ci) / 2.0
    low, high = (float(q) for q in np.quantile(replicates, [tail, 1.0 - tail]))
    reason = None
    if missing.size:
        reason = (f"a lower bound of the extrapolation: {missing.size} unconverged plateau cell(s) have no "
                  "extrapolable asymptote (their branches still climbing) and are left out; theirs could lift "
                  "the maximum")
    return ExtrapolatedCapacity(point[best], low, high, int(np.unique(sizes[keep])[best]), reason,
                                tuple(int(i) for i in missing), bool(missing.size), **counts)


def _resampled_extrapolated(sizes: list[SizeCells], rng, shape: tuple[int, ...]) -> np.ndarray:
    """Extrapolated capacities of one shape, an array of `shape`: at every dataset size the seeds are
    drawn with replacement, each drawn seed's value drawn from its split normal and capped at its
    H(X), and averaged; then the maximum over sizes."""
    means = []
    for s in sizes:
        picks = rng.integers(0, s.value.size, size=(*shape, s.value.size))
        means.append(_draw(s.value[picks], s.sd_low[picks], s.sd_high[picks], s.cap[picks], rng).mean(axis=-1))
    return np.max(means, axis=0)


def alpha_slope(params, capacity_bits) -> np.ndarray:
    """Least-squares slope through the origin of capacity against params along the last axis,
    sum(P * C) / sum(P^2), in bits per parameter. It weights each shape by P^2, so the largest
    shapes dominate (the paper's largest fp32 shape carries 65% of the weight)."""
    p = np.asarray(params, dtype=np.float64)
    c = np.asarray(capacity_bits, dtype=np.float64)
    return (p * c).sum(axis=-1) / (p * p).sum(axis=-1)


def alpha_mean_ratio(params, capacity_bits) -> np.ndarray:
    """Mean over shapes of capacity / params along the last axis, in bits per parameter: every shape
    weighs the same (the paper's "3.83 / 3.51" is this statistic)."""
    return (np.asarray(capacity_bits, dtype=np.float64) / np.asarray(params, dtype=np.float64)).mean(axis=-1)


# The two alpha statistics of docs/science.md, by their name in fits.json.
ALPHA_STATISTICS = {"slope": alpha_slope, "mean_ratio": alpha_mean_ratio}


MIN_SHAPES_FOR_CI = 5  # a bootstrap over fewer shapes is a range, not a confidence interval


def interval_kind(n_models: int) -> str:
    """What an alpha bootstrap over `n_models` shapes gives: "none" (one shape: nothing to resample),
    "range" (fewer than MIN_SHAPES_FOR_CI: its percentiles show the shapes' spread but cannot claim 95%
    coverage) or "ci" (a 95% percentile confidence interval)."""
    return "none" if n_models <= 1 else "range" if n_models < MIN_SHAPES_FOR_CI else "ci"


@dataclass(frozen=True)
class AlphaFit:
    """One alpha statistic over the shapes of a group, bits per parameter, with its interval."""

    alpha: float
    ci_low: float | None  # None with one shape: resampling shapes cannot show their scatter
    ci_high: float | None
    n_models: int
    interval_kind: str = "ci"  # interval_kind(n_models): "none", "range" or "ci"


def _check_shapes(params: np.ndarray, per_shape: list[list[np.ndarray]]) -> None:
    if params.size == 0 or params.size != len(per_shape):
        raise ValueError(f"need one entry per shape and at least one shape: "
                         f"{params.size} params, {len(per_shape)} mem_bits entries")
    if not (np.all(np.isfinite(params)) and np.all(params > 0)):
        raise ValueError("params must be positive and finite")
    for sizes in per_shape:
        values = [s.value if isinstance(s, SizeCells) else s for s in sizes]
        if not sizes or any(seeds.size == 0 for seeds in values):
            raise ValueError("every shape needs at least one dataset size with at least one seed")
        if not all(np.all(np.isfinite(seeds)) for seeds in values):
            raise ValueError("mem_bits contains NaN or infinite values")


def _resampled_capacity(sizes: list, rng, shape: tuple[int, ...]) -> np.ndarray:
    """Capacities of one model shape with its seeds resampled, an array of `shape`: at every dataset
    size the seeds are drawn with replacement and averaged, then the maximum over sizes is taken.
    SizeCells (the extrapolated form) also draw each seed's value within its interval."""
    if isinstance(sizes[0], SizeCells):
        return _resampled_extrapolated(sizes, rng, shape)
    means = [seeds[rng.integers(0, seeds.size, size=(*shape, seeds.size))].mean(axis=-1) for seeds in sizes]
    return np.max(means, axis=0)


def _per_size(sizes) -> list:
    return [s if isinstance(s, SizeCells) else np.asarray(s, dtype=np.float64).ravel() for s in sizes]


def bootstrap_capacities(params, mem_bits_by_size, *, n_boot: int = 1000, seed: int = 0):
    """Two-level bootstrap replicates of a precision's shapes: (params, capacity_bits), each of shape
    (n_boot, M) for M shapes.

    Each replicate draws M shapes with replacement; within each drawn shape it resamples the seeds
    at each dataset size and retakes the capacity (maximum over sizes of the seed means). A shape
    drawn twice gets two independent seed resamples. The replicates thus carry the scatter between
    shapes as well as the seed noise. `mem_bits_by_size[m]` is shape m's list of per-size arrays of
    seed mem_bits (bits), or of SizeCells for the extrapolated form (each drawn seed's asymptote is
    then also drawn within its interval, capped at H(X)).
    """
    p = np.asarray(params, dtype=np.float64).ravel()
    per_shape = [_per_size(sizes) for sizes in mem_bits_by_size]
    _check_shapes(p, per_shape)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, p.size, size=(n_boot, p.size))  # (n_boot, M) shape indices
    # Shape m's resampled capacity in every (replicate, slot), of which the slots that drew m keep
    # theirs: one shape's draws at a time, not all M shapes' (M^2 x n_boot values) at once.
    capacities = np.empty(picks.shape)
    for m, sizes in enumerate(per_shape):
        drawn = picks == m
        capacities[drawn] = _resampled_capacity(sizes, rng, picks.shape)[drawn]
    return p[picks], capacities


def fit_alpha(params, mem_bits_by_size, *, n_boot: int = 1000, seed: int = 0,
              ci: float = 0.95) -> dict[str, AlphaFit]:
    """Both alpha statistics (ALPHA_STATISTICS) of M shapes of one precision, with percentile
    intervals from the two-level bootstrap of bootstrap_capacities (the same replicates for both).

    `params` has shape (M,); `mem_bits_by_size[m]` is shape m's list of per-size arrays of seed
    mem_bits. The point estimates use each shape's capacity, the maximum over sizes of the seed
    means. With one shape every replicate draws it again: the interval would show seed noise only,
    so it is None; with fewer than MIN_SHAPES_FOR_CI shapes it is a range (AlphaFit.interval_kind).
    Given SizeCells (the extrapolated form), the point estimates use each shape's extrapolated
    capacity and the replicates also draw each cell's asymptote within its interval.
    """
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci={ci} must lie strictly between 0 and 1")
    p = np.asarray(params, dtype=np.float64).ravel()
    per_shape = [_per_size(sizes) for sizes in mem_bits_by_size]
    _check_shapes(p, per_shape)
    capacities = np.array([_point_capacity(sizes) for sizes in per_shape])
    replicates = bootstrap_capacities(p, per_shape, n_boot=n_boot, seed=seed) if p.size > 1 else None
    tail = (1.0 - ci) / 2.0
    fits = {}
    for name, statistic in ALPHA_STATISTICS.items():
        low = high = None
        if replicates is not None:
            low, high = (float(q) for q in np.quantile(statistic(*replicates), [tail, 1.0 - tail]))
        fits[name] = AlphaFit(float(statistic(p, capacities)), low, high, int(p.size), interval_kind(int(p.size)))
    return fits


def mia_law(x, c1, c2, c3):
    """Balanced F1 predicted by the MIA law, 1/2 * (1 + c1 * sigmoid(c2 * x + c3)).

    x = N / params, training sequences per parameter (docs/science.md's form). Broadcasts over arrays.
    """
    return 0.5 * (1.0 + c1 * expit(c2 * np.asarray(x, dtype=np.float64) + c3))


@dataclass(frozen=True)
class MiaLawFit:
    """Fitted MIA-law constants, their standard errors (sqrt of the covariance diagonal), RMSE."""

    c1: float
    c2: float
    c3: float
    c1_std: float
    c2_std: float
    c3_std: float
    rmse: float  # root-mean-square residual of F1 (a fraction)


def _linearized_start(x: np.ndarray, f1: np.ndarray) -> tuple[float, float, float]:
    """Starting values from the linear form: with c1 fixed, logit((2F1 - 1) / c1) = c2*x + c3."""
    excess = 2.0 * f1 - 1.0  # = c1 * sigmoid(c2 * x + c3), in (0, c1)
    c1 = max(1.0, 1.05 * excess.max())
    z = logit(np.clip(excess / c1, 1e-3, 1 - 1e-3))
    if np.ptp(x) > 0:
        c2, c3 = np.polyfit(x, z, 1)
    else:
        c2, c3 = 0.0, float(z.mean())
    return c1, float(c2), float(c3)


def fit_mia_law(x, f1, p0=None) -> MiaLawFit:
    """Fit F1 = 1/2 * (1 + c1 * sigmoid(c2 * x + c3)) by nonlinear least squares (scipy curve_fit).

    `x` is N / params per cell, `f1` the measured balanced F1 per cell, both shape (num_cells,).
    Starting values, unless `p0` = (c1, c2, c3) is given, come from a straight-line fit of the
    logit of (2F1 - 1) / c1 against x. c1 is bounded to [0, 10]: c1 >= 0 keeps F1 >= 0.5, and the
    cap keeps c1 finite when every cell lies on the sigmoid's lower tail, where only c1 * exp(c3)
    is determined (a fit at the cap says so; its standard errors are then large). c2 and c3 are
    free. With exactly 3 cells there are no residual degrees of freedom and the standard errors
    are infinite.
    """
    xs = np.asarray(x, dtype=np.float64).ravel()
    ys = np.asarray(f1, dtype=np.float64).ravel()
    if xs.size != ys.size:
        raise ValueError(f"x and f1 differ in length: {xs.size}, {ys.size}")
    if xs.size < 3:
        raise ValueError(f"fitting the MIA law's 3 constants needs at least 3 cells, got {xs.size}")
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys))):
        raise ValueError("x or f1 contains NaN or infinite values")

    start = _linearized_start(xs, ys) if p0 is None else tuple(float(v) for v in p0)
    start = (min(max(start[0], 0.0), 10.0), start[1], start[2])  # inside the bounds
    popt, pcov = curve_fit(
        mia_law, xs, ys, p0=start,
        bounds=([0.0, -np.inf, -np.inf], [10.0, np.inf, np.inf]),
        maxfev=20000,
    )
    stds = np.sqrt(np.diag(pcov))
    rmse = float(np.sqrt(np.mean((ys - mia_law(xs, *popt)) ** 2)))
    return MiaLawFit(*(float(v) for v in popt), *(float(s) for s in stds), rmse=rmse)


NO_TRANSITION_TOL = 0.02  # F1 this close to 1 (or to 0.5) in every cell: the cells show no transition
TRANSITION = (0.55, 0.95)  # F1 strictly between these: a cell inside the law's transition, which fixes c2


def mia_law_unidentifiable(f1, tol: float = NO_TRANSITION_TOL,
                           transition: tuple[float, float] = TRANSITION) -> str | None:
    """Why the MIA law cannot be fitted to these F1 values (fractions, shape (num_cells,)), or None.

    When every cell sits within `tol` of 1 (all memorized) or of 0.5 (chance), the cells lie on one
    flat tail of the sigmoid: any step placed beyond the data fits them to rounding error, so the
    constants carry no information and are not reported. When no cell lies inside the transition,
    `transition[0]` < F1 < `transition[1]`, the cells sit on the two tails: they bracket the step but
    any steepness c2 that fits between them fits as well, so the law is not identifiable either.
    """
    values = np.asarray(f1, dtype=np.float64).ravel()
    for level, what in ((1.0, "1 (every cell fully distinguished)"), (0.5, "0.5 (chance in every cell)")):
        if values.size and np.all(np.abs(values - level) <= tol):
            return f"no transition: all {values.size} F1 within {tol:g} of {what}"
    low, high = transition
    if values.size and not np.any((values > low) & (values < high)):
        upper, lower = int(np.sum(values >= high)), int(np.sum(values <= low))
        return (f"no cell inside the transition ({low:g} < F1 < {high:g}): the {values.size} cells lie on its two "
                f"tails ({upper} at F1 >= {high:g}, {lower} at F1 <= {low:g}), which bracket the step but do not "
                "fix its steepness c2")
    return None


def published_mia_law_as_printed(capacity_bits, num_sequences):
    """The paper's MIA law exactly as printed, with Capacity in bits and |D| in sequences.

    F1 = 1/2 * (1 + 1.34 * sigmoid(-0.034 * (Capacity/|D| - 33.14))). Kept for comparison only: it
    tends to about 1.0, not 0.5, as |D| grows, contradicting the paper's text
    (measure/paper.py, docs/science.md).
    """
    bits_per_sequence = np.asarray(capacity_bits, dtype=np.float64) / np.asarray(
        num_sequences, dtype=np.float64
    )
    return 0.5 * (1.0 + 1.34 * expit(-0.034 * (bits_per_sequence + -33.14)))


def published_mia_law_corrected(num_sequences, params):
    """The paper's MIA law as its Table 2 was computed (c2, c3 swapped; |D|/P for Capacity/|D|).

    F1 = 1/2 * (1 + 1.34 * sigmoid(-33.14 * (|D|/P - 0.0337))), where |D| is the number of 64-token
    training sequences and P the parameter count. This form reproduces every predicted F1 of
    measure/reference/mia_validation.csv.
    """
    per_param = np.asarray(num_sequences, dtype=np.float64) / np.asarray(params, dtype=np.float64)
    return 0.5 * (1.0 + 1.34 * expit(-33.14 * (per_param - 0.0337)))


def mem_prediction_error(measured_bits, predicted_bits):
    """Signed relative error (measured - predicted) / predicted, a fraction; float64 array.

    The paper's error_pct column (measure/reference/seq_len_vocab_sweep.csv) is 100 times its
    absolute value.
    """
    measured = np.asarray(measured_bits, dtype=np.float64)
    predicted = np.asarray(predicted_bits, dtype=np.float64)
    return (measured - predicted) / predicted
