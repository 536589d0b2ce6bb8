"""How a cell was trained, as its metrics (measure.cell.training_metrics): exposures, and under the
branches schedule the branches and the asymptote fitted to those of horizons >= asymptote_from."""

from types import SimpleNamespace

import pytest

from measure.asymptote import fit_asymptote
from measure.cell import training_metrics


def result(branches, steps=None, converged=False):
    steps = steps if steps is not None else (branches[-1][1] if branches else 100)
    return SimpleNamespace(steps=steps, converged=converged, resumed_from_step=0, wall_s=1.0, tokens_per_s=10.0,
                           steps_trained=2 * steps, converged_step=None, gain_last_doubling=0.02,
                           decay_start_step=None, branches=branches)


def curve(t):
    return 10_000.0 - 8_000.0 * t ** -0.5


# A curve that follows A - B T^-c from 2,000 steps on, but whose early branches (the fast first phase)
# lie far off it: fitted from 2,000 steps they do not pull the asymptote.
BRANCHES = [(500, 600, 2_000.0), (1000, 1200, 5_000.0)] + [(t, int(1.2 * t), curve(t)) for t in (2000, 4000, 8000, 16000)]


def test_exposures_and_branches_are_reported():
    m = training_metrics(result(BRANCHES), num_sequences=64, batch_size=32)
    assert m["exposures"] == 19200 * 32 / 64 and m["steps_trained"] == 2 * 19200
    assert m["num_branches"] == 6 and m["last_horizon_steps"] == 16000


def test_the_asymptote_is_fitted_to_the_branches_from_asymptote_from_on():
    late = BRANCHES[2:]
    m = training_metrics(result(BRANCHES), 64, 32, asymptote_from=2000)
    expected = fit_asymptote([t for t, _, _ in late], [v for _, _, v in late])
    assert m["asymptote_extrapolable"] == 1.0 and m["mem_bits_asymptote"] == pytest.approx(expected.asymptote_bits)
    assert m["mem_bits_asymptote"] == pytest.approx(10_000.0, rel=0.01)
    everything = training_metrics(result(BRANCHES), 64, 32, asymptote_from=0)
    assert everything.get("mem_bits_asymptote") != pytest.approx(m["mem_bits_asymptote"], rel=0.01)
    assert m["fraction_of_asymptote"] == pytest.approx(curve(16000) / m["mem_bits_asymptote"])


def test_too_few_branches_past_asymptote_from_are_not_extrapolable():
    m = training_metrics(result(BRANCHES[:5]), 64, 32, asymptote_from=2000)  # 2K, 4K, 8K: three
    assert m["asymptote_extrapolable"] == 0.0 and "mem_bits_asymptote" not in m
    none = training_metrics(result(BRANCHES[:2]), 64, 32, asymptote_from=2000)  # none at all
    assert none["asymptote_extrapolable"] == 0.0


def test_a_schedule_without_branches_logs_no_asymptote():
    m = training_metrics(result([], steps=300), 64, 32)
    assert "asymptote_extrapolable" not in m and "num_branches" not in m and m["exposures"] == 300 * 32 / 64
