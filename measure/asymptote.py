"""The asymptote of a cell's annealed memorization: a(T) = A - B * T^(-c) fitted to its branches.

docs/science.md, "Capacity and bits per parameter": a cell trained as a constant-rate trunk with
annealed cool-down branches at horizons T gives a(T), its annealed memorization at each; fitted by
least squares (B >= 0, c in EXPONENT_BOUNDS), A is where a(T) is heading, with a 95% interval.

The fit. T is scaled by the last horizon (x = T / T_last, so B is the gap A - a(T_last)) and a(T) by
|a(T_last)|: every cell's fit has the same conditioning. For a given c the model is linear in (A, B),
solved in closed form (B clipped at 0); c is found on a geometric grid over its bounds, refined three
times inside the bracket of the best point (the fit cannot fail to converge; its precision in c is
about 1e-7, relative). A fit whose c sits at a bound is "not extrapolable": the branches do not identify A.

The interval of A (`method`; `DEFAULT_METHOD` is the one bench/convergence.py's validation chose,
bench/README.md "Extrapolating to the asymptote: validation"):

- "profile" (the default): the profile likelihood. A is in the interval when the least squares with A
  held there, minimized over B >= 0 and c, exceed the best by at most s^2 F(0.95; 1, d). The noise
  variance s^2 pools the fit's own residuals (n - 3 degrees of freedom) with a prior of NOISE_FLOOR
  (0.3% of a(T_last), the pooled rms residual of the 64K-step truth runs about their fits) worth
  NOISE_PRIOR_DOF degrees of freedom: with 4 branches the residuals alone have 1 degree of freedom,
  and a curve that happens to pass through its 4 points would otherwise claim an interval of a few
  bits. d = n - 3 + NOISE_PRIOR_DOF. The interval is asymmetric, longer above (small c, large A).
- "profile-own": the same with the residuals' variance only (d = n - 3: F(1, 1) = 161 with 4 branches).
- "t" and "t-own": A +- t(0.975; d) * se(A), se from the fit's Jacobian, with the pooled or own s^2.
- "bootstrap": a residual bootstrap over the branches (the fit's residuals, inflated by
  sqrt(n / (n - 3)), resampled onto the fitted curve, refitted; the 2.5 and 97.5 percentiles).

Not extrapolable (`extrapolable` False, `reason` a sentence): fewer than MIN_BRANCHES branches,
non-finite or non-positive horizons, repeated horizons, non-finite values, a(T_last) <= 0, a curve that
does not rise (the best B is 0 and the curve is not flat), c at a bound (but see a flat curve), a
fit or interval that is not finite, and a curve still in its rise: its last branch below MIN_REACHED
(0.7) of the fitted A. bench.convergence validated the fit on cells whose last fitted branch held
0.75-0.92 of their fitted A; a cell far past capacity, early in its saturation (the laptop's 4,096
sequences at 16K steps: 0.46 and 0.63), extrapolates several times its measured value with an interval
to match, which the validation never tested.

Which branches. The fit assumes one power law through every branch it is given. On the CPU recipe
(lr 1e-2, batch 64) branches before 2K steps do not follow the later ones' law and bias A by up to 27%
(bench/README.md, "Extrapolating to the asymptote: validation"): give it the branches from 2K on
(`from_steps=2000`).

A flat curve. When every branch lies within FLAT_TOLERANCE (0.1%) of a(T_last), as in a cell that
memorized its whole dataset (a(T) == H(X)), B is about 0 and c is not identified: the cell is already
at its asymptote. Such a fit is extrapolable, with A = a(T_last), its interval the range of the
branches (of zero width when they are equal), and no exponent (`exponent` None, and
`asymptote_metrics` leaves 'asymptote_exponent' out). So is a curve that rose and then went flat
(c at its upper bound, 4: it saturated faster than the law allows, and its last two branches agree
within FLAT_TOLERANCE, as in a small cell that reached H(X) after a few branches): A = a(T_last), the
interval the range of the branches within FLAT_TOLERANCE of it. c at its lower bound, or at the upper
one with a last step larger than that, is not extrapolable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

MIN_BRANCHES = 4
EXPONENT_BOUNDS = (0.05, 4.0)  # of c; at a bound, A is not identified by the branches
LEVEL = 0.95
MIN_REACHED = 0.7  # a(T_last) / A below this lies beyond what the validation covered: not extrapolable
NOISE_FLOOR = 0.003  # prior noise of a branch, relative to |a(T_last)| (the truth runs' pooled rms residual)
NOISE_PRIOR_DOF = 3  # what that prior is worth, in degrees of freedom (one 6-branch fit's)
FLAT_TOLERANCE = 1e-3  # a curve whose branches all lie within this of a(T_last) (relative) is flat
INTERVAL_METHODS = ("profile", "profile-own", "t", "t-own", "bootstrap")
DEFAULT_METHOD = "profile"
BOOTSTRAP_DRAWS = 400
_GRID = np.geomspace(*EXPONENT_BOUNDS, 241)  # the first search for c; then two finer ones in its bracket
_FINE = 41


@dataclass(frozen=True)
class AsymptoteFit:
    extrapolable: bool
    reason: str | None  # why not extrapolable (None when it is); a readable sentence
    asymptote_bits: float | None  # A
    ci_low_bits: float | None  # interval of A (95%)
    ci_high_bits: float | None
    exponent: float | None  # c (None for a flat curve, where it is not identified)
    num_branches: int
    rms_residual_bits: float | None


def saturating(x, asymptote: float, gap: float, exponent: float):
    """a = A - gap * x^-c, with x = T / T_last: `gap` is A - a(T_last)."""
    return asymptote - gap * np.asarray(x, dtype=float) ** -exponent


def _not_extrapolable(reason: str, num_branches: int, rms: float | None = None) -> AsymptoteFit:
    return AsymptoteFit(False, reason, None, None, None, None, num_branches, rms)


def _linear(z: np.ndarray, y: np.ndarray):
    """For each row of z (..., n) against y (..., n): the least squares of y = A - B z with B >= 0."""
    zm, ym = z.mean(-1), y.mean(-1)
    dz, dy = z - zm[..., None], y - ym[..., None]
    gap = np.maximum(-(dz * dy).sum(-1) / np.maximum((dz * dz).sum(-1), 1e-300), 0.0)
    asymptote = ym + gap * zm
    sse = ((y - asymptote[..., None] + gap[..., None] * z) ** 2).sum(-1)
    return asymptote, gap, sse


def _refine(x: np.ndarray, sse_of):
    """The c (one per row) minimizing `sse_of(z)` (z = x^-c, shape (rows, grid, n)): the grid, then
    three finer grids, each inside the bracket of the previous one's best point."""
    cs = np.broadcast_to(_GRID, (sse_of.rows, len(_GRID)))
    for level in range(4):
        sse = sse_of(x ** -cs[..., None])
        best = np.argmin(sse, axis=-1)
        rows = np.arange(cs.shape[0])
        if level == 3:
            return cs[rows, best]
        low, high = cs[rows, np.maximum(best - 1, 0)], cs[rows, np.minimum(best + 1, cs.shape[1] - 1)]
        cs = np.geomspace(low, high, _FINE, axis=-1)


class _Fit:
    """sse_of for the full fit of rows of y."""

    def __init__(self, y: np.ndarray):
        self.y, self.rows = y, y.shape[0]

    def __call__(self, z):
        return _linear(z, self.y[:, None, :])[2]


class _Profile:
    """sse_of for the fit with A held at `asymptote`: y = A - B z, B >= 0 (one row)."""

    def __init__(self, y: np.ndarray, asymptote: float):
        self.r, self.rows = asymptote - y, 1

    def __call__(self, z):
        gap = np.maximum((z * self.r).sum(-1) / (z * z).sum(-1), 0.0)
        return ((self.r - gap[..., None] * z) ** 2).sum(-1)


def _fit_rows(x: np.ndarray, y: np.ndarray):
    """(A, B, c, sse) arrays, one per row of y (rows, n)."""
    c = _refine(x, _Fit(y))
    asymptote, gap, sse = _linear(x[None, :] ** -c[:, None], y)
    return asymptote, gap, c, sse


def _profile_sse(x: np.ndarray, y: np.ndarray, asymptote: float) -> float:
    profile = _Profile(y, asymptote)
    c = _refine(x, profile)
    return float(profile(x[None, None, :] ** -c[:, None, None])[0, 0])


def _noise(sse: float, n: int, method: str) -> tuple[float, int]:
    """(s^2, its degrees of freedom) in the scaled units (a(T_last) = 1)."""
    if method.endswith("-own"):
        return sse / (n - 3), n - 3
    return (NOISE_PRIOR_DOF * NOISE_FLOOR**2 + sse) / (NOISE_PRIOR_DOF + n - 3), NOISE_PRIOR_DOF + n - 3


def _profile_interval(x, y, asymptote: float, sse: float, method: str) -> tuple[float, float]:
    s2, dof = _noise(sse, len(y), method)
    allowed = s2 * stats.f.ppf(LEVEL, 1, dof)
    if allowed <= 0:
        return asymptote, asymptote
    excess = lambda a: _profile_sse(x, y, a) - sse - allowed
    ends = []
    for sign in (-1.0, 1.0):
        step = 1e-3
        while excess(asymptote + sign * step) < 0:
            step *= 2
            if step > 1e3:
                return -math.inf, math.inf
        outer = asymptote + sign * step
        ends.append(optimize.brentq(excess, *sorted((asymptote, outer)), xtol=1e-8, rtol=1e-10))
    return ends[0], ends[1]


def _t_interval(x, y, asymptote: float, gap: float, exponent: float, sse: float, method: str):
    s2, dof = _noise(sse, len(y), method)
    z = x**-exponent
    jacobian = np.stack([np.ones_like(x), -z, gap * z * np.log(x)], axis=1)  # d/dA, d/dB, d/dc
    se = math.sqrt(max(np.linalg.pinv(jacobian.T @ jacobian)[0, 0] * s2, 0.0))
    half = stats.t.ppf(0.5 + LEVEL / 2, dof) * se
    return asymptote - half, asymptote + half


def _bootstrap_interval(x, y, asymptote: float, gap: float, exponent: float) -> tuple[float, float]:
    n = len(y)
    residuals = (y - saturating(x, asymptote, gap, exponent)) * math.sqrt(n / (n - 3))
    rng = np.random.default_rng(0)  # deterministic: the same branches give the same interval
    draws = saturating(x, asymptote, gap, exponent) + rng.choice(residuals, size=(BOOTSTRAP_DRAWS, n))
    refitted = _fit_rows(x, draws)[0]
    low, high = np.percentile(refitted, [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    return float(low), float(high)


def _check(horizons: np.ndarray, values: np.ndarray) -> str | None:
    """Why these branches cannot be fitted (None when they can)."""
    n = len(values)
    if len(horizons) != n:
        return f"{len(horizons)} horizons for {n} values"
    if n < MIN_BRANCHES:
        return f"{n} branch{'es' if n != 1 else ''}: an extrapolation needs at least {MIN_BRANCHES}"
    if not (np.all(np.isfinite(horizons)) and np.all(np.isfinite(values))):
        return "a horizon or an annealed value is not finite"
    if np.any(horizons <= 0) or len(np.unique(horizons)) != n:
        return "the horizons must be positive and distinct"
    if values[np.argmax(horizons)] <= 0:
        return "a(T) is not positive at the last branch"
    return None


def fit_asymptote(horizons_steps, annealed_bits, method: str = DEFAULT_METHOD, from_steps: float = 0) -> AsymptoteFit:
    """Fit a(T) = A - B T^-c to a cell's branches (horizons in steps, annealed memorization in bits),
    with A's 95% interval by `method` (one of INTERVAL_METHODS); only the branches at T >= `from_steps`
    enter the fit (and count in `num_branches`; "Which branches" in the module docstring). The module
    docstring says when the fit is not extrapolable, and what a flat curve gives."""
    if method not in INTERVAL_METHODS:
        raise ValueError(f"unknown interval method {method!r}; one of {INTERVAL_METHODS}")
    horizons, values = np.asarray(horizons_steps, dtype=float).ravel(), np.asarray(annealed_bits, dtype=float).ravel()
    if from_steps and len(horizons) == len(values):
        kept = ~(horizons < from_steps)  # a non-finite horizon stays, for _check to refuse
        horizons, values = horizons[kept], values[kept]
    n = len(values)
    reason = _check(horizons, values)
    if reason is not None:
        return _not_extrapolable(reason, n)
    order = np.argsort(horizons)
    horizons, values = horizons[order], values[order]
    scale = float(abs(values[-1]))
    if np.ptp(values) <= FLAT_TOLERANCE * scale:
        return AsymptoteFit(True, None, float(values[-1]), float(values.min()), float(values.max()), None, n,
                            float(np.sqrt(np.mean((values - values[-1]) ** 2))))
    x, y = horizons / horizons[-1], values / scale
    asymptote, gap, exponent, sse = (float(v[0]) for v in _fit_rows(x, y[None, :]))
    rms = math.sqrt(sse / n) * scale
    if not all(map(math.isfinite, (asymptote, gap, exponent, sse))):
        return _not_extrapolable("the fit did not converge to finite values", n)
    if gap <= 0:
        return _not_extrapolable("a(T) does not rise over the branches: there is no saturation to fit", n, rms)
    if abs(exponent / EXPONENT_BOUNDS[1] - 1) < 1e-6 and abs(values[-1] - values[-2]) <= FLAT_TOLERANCE * scale:
        tail = values[np.abs(values - values[-1]) <= FLAT_TOLERANCE * scale]  # saturated faster than c = 4
        return AsymptoteFit(True, None, float(values[-1]), float(tail.min()), float(tail.max()), None, n, rms)
    if min(abs(exponent / bound - 1) for bound in EXPONENT_BOUNDS) < 1e-6:
        return _not_extrapolable(f"the exponent c = {exponent:g} sits at its bound (bounds {EXPONENT_BOUNDS}): "
                                 "the branches do not identify A", n, rms)
    if method.startswith("profile"):
        low, high = _profile_interval(x, y, asymptote, sse, method)
    elif method.startswith("t"):
        low, high = _t_interval(x, y, asymptote, gap, exponent, sse, method)
    else:
        low, high = _bootstrap_interval(x, y, asymptote, gap, exponent)
    if not (math.isfinite(low) and math.isfinite(high)):
        return _not_extrapolable("the interval of A is unbounded", n, rms)
    if values[-1] < MIN_REACHED * asymptote * scale:
        return _not_extrapolable(f"the last branch reached {values[-1] / (asymptote * scale):.2f} of the fitted A, "
                                 f"below {MIN_REACHED:g}: the curve is still in its rise, beyond what the "
                                 "validation covered", n, rms)
    return AsymptoteFit(True, None, asymptote * scale, min(low, asymptote) * scale, max(high, asymptote) * scale,
                        exponent, n, rms)


def asymptote_metrics(horizons_steps, annealed_bits, mem_bits: float, from_steps: float = 0) -> dict[str, float]:
    """Cell metrics (floats): 'asymptote_extrapolable' (0/1) always when >=1 branch; when extrapolable also
    'mem_bits_asymptote', 'mem_bits_asymptote_ci_low', 'mem_bits_asymptote_ci_high', 'asymptote_exponent'
    (left out for a flat curve, whose c is not identified), 'fraction_of_asymptote' (= mem_bits / A).
    `from_steps`: as fit_asymptote's (the branches before it are left out of the fit)."""
    if len(np.asarray(annealed_bits, dtype=float).ravel()) == 0:
        return {}
    fit = fit_asymptote(horizons_steps, annealed_bits, from_steps=from_steps)
    metrics = {"asymptote_extrapolable": float(fit.extrapolable)}
    if not fit.extrapolable:
        return metrics
    metrics.update(mem_bits_asymptote=fit.asymptote_bits, mem_bits_asymptote_ci_low=fit.ci_low_bits,
                   mem_bits_asymptote_ci_high=fit.ci_high_bits)
    if fit.exponent is not None:
        metrics["asymptote_exponent"] = fit.exponent
    metrics["fraction_of_asymptote"] = float(mem_bits) / fit.asymptote_bits if fit.asymptote_bits else math.nan
    return metrics
