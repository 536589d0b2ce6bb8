"""Capacity, bits per parameter and the membership-inference scaling law over a sweep.

docs/science.md, "Capacity (sweep)", "Alpha" and "The MIA law": a model's capacity is its plateau of
memorized bits as the dataset grows; alpha (bits per parameter) is the slope through the origin of
capacity against params; the MIA law ties balanced F1 to sequences per parameter. Inputs are plain
arrays taken from the sweep's table, one row per cell.
"""

from __future__ import annotations

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
    lower_bound: bool  # True when a cell at that size had not converged: capacity may be higher


def capacity(dataset_sizes, mem_bits, converged) -> CapacityEstimate:
    """Capacity of one (model shape, precision) from its cells, each argument shape (num_cells,).

    `dataset_sizes` holds each cell's N (number of training sequences), `mem_bits` its dataset
    memorization, `converged` whether its mem_bits had settled. Cells sharing N are the seeds of
    that size and are averaged first; the capacity is the largest of those means (the smallest N
    wins a tie). It is flagged a lower bound when any seed at that N had not converged, since
    training longer could only have memorized more.
    """
    sizes = np.asarray(dataset_sizes).ravel()
    bits = np.asarray(mem_bits, dtype=np.float64).ravel()
    done = np.asarray(converged, dtype=bool).ravel()
    if not sizes.size == bits.size == done.size:
        raise ValueError(
            f"dataset_sizes, mem_bits and converged differ in length: "
            f"{sizes.size}, {bits.size}, {done.size}"
        )
    if sizes.size == 0:
        raise ValueError("no cells: capacity needs at least one (dataset size, mem_bits) pair")
    if not np.all(np.isfinite(bits)):
        raise ValueError("mem_bits contains NaN or infinite values")

    unique_sizes, cell_to_size = np.unique(sizes, return_inverse=True)  # sorted ascending
    mean_bits = np.bincount(cell_to_size, weights=bits) / np.bincount(cell_to_size)
    best = int(np.argmax(mean_bits))
    at_best = cell_to_size == best
    seeds = bits[at_best]
    return CapacityEstimate(
        capacity_bits=float(mean_bits[best]),
        seed_std_bits=float(seeds.std(ddof=1)) if seeds.size > 1 else 0.0,
        num_sequences_at_max=int(unique_sizes[best]),
        lower_bound=bool(not done[at_best].all()),
    )


@dataclass(frozen=True)
class AlphaFit:
    """Bits per parameter: least-squares slope through the origin, with a bootstrap interval."""

    alpha: float  # bits per parameter
    ci_low: float
    ci_high: float
    n_models: int


def _slope_through_origin(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slope of y = a * x along the last axis: sum(x*y) / sum(x*x)."""
    return (x * y).sum(axis=-1) / (x * x).sum(axis=-1)


def fit_alpha(
    params, capacity_bits_by_seed, *, n_boot: int = 1000, seed: int = 0, ci: float = 0.95
) -> AlphaFit:
    """Fit capacity_bits = alpha * params over M models of one precision.

    `params` has shape (M,). `capacity_bits_by_seed` has one entry per model: an array of that
    model's per-seed capacities (any length >= 1), or a single number. The point estimate fits the
    seed means.

    The interval is a percentile bootstrap over seeds: each of `n_boot` replicates resamples every
    model's seeds with replacement, averages them and refits the slope. A model with one seed then
    adds no spread. When every model has a single seed that interval would collapse to the point, so
    the replicates instead resample the models themselves (with replacement) and refit.
    """
    p = np.asarray(params, dtype=np.float64).ravel()
    per_model = [np.asarray(c, dtype=np.float64).ravel() for c in capacity_bits_by_seed]
    if p.size == 0 or p.size != len(per_model):
        raise ValueError(
            f"need one capacity entry per model and at least one model: "
            f"{p.size} params, {len(per_model)} capacity entries"
        )
    if any(c.size == 0 for c in per_model):
        raise ValueError("a model has no capacity values")
    if not (np.all(np.isfinite(p)) and all(np.all(np.isfinite(c)) for c in per_model)):
        raise ValueError("params or capacity_bits_by_seed contain NaN or infinite values")
    if np.any(p <= 0):
        raise ValueError("params must be positive")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci={ci} must lie strictly between 0 and 1")

    mean_bits = np.array([c.mean() for c in per_model])
    alpha = float(_slope_through_origin(p, mean_bits))

    rng = np.random.default_rng(seed)
    if all(c.size == 1 for c in per_model):
        picks = rng.integers(0, p.size, size=(n_boot, p.size))  # (n_boot, M) model indices
        boot_alpha = _slope_through_origin(p[picks], mean_bits[picks])
    else:
        # (n_boot, M): each column is one model's mean over its resampled seeds.
        boot_means = np.stack(
            [c[rng.integers(0, c.size, size=(n_boot, c.size))].mean(axis=1) for c in per_model],
            axis=1,
        )
        boot_alpha = _slope_through_origin(p, boot_means)
    tail = (1.0 - ci) / 2.0
    ci_low, ci_high = np.quantile(boot_alpha, [tail, 1.0 - tail])
    return AlphaFit(alpha=alpha, ci_low=float(ci_low), ci_high=float(ci_high), n_models=int(p.size))


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
