"""bench/convergence.py: its ground truth's fit (measure.asymptote's) finds a planted asymptote (and
says when a curve shows none), its ground truth's long run resumed at a horizon is the run straight
through, its cool-down branches start exactly at their horizon, its validation judges the extrapolation
from a run's first branches against the run's long-run asymptote (on planted results and on the
committed truth runs, through `--validate`), and `--quick`, run as a user runs it, writes results whose
every derived figure is the one its recorded curves give."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.common import mem_bits_evaluator
from bench.convergence import (
    HORIZONS_STEPS,
    REACHED_FRACTION,
    RIGHT_TOLERANCE,
    TARGET_BIAS,
    cell,
    cooldown_train,
    handover,
    main,
    stable_train,
    truth_summary,
    validate,
)
from measure.asymptote import DEFAULT_METHOD, fit_asymptote
from models.checkpoint import CheckpointStore
from models.data import synthetic_members
from models.progress import forced_decay_start
from models.train import train

REPO = Path(__file__).resolve().parents[2]
COMMITTED_TRUTH = REPO / "bench" / "results" / "convergence-20261130T234551Z.json"  # 3 shapes x 2 seeds, 2K..64K


def planted(asymptote: float, gap: float, exponent: float, noise: float, seed: int) -> list[float]:
    steps = np.array(HORIZONS_STEPS, dtype=float)
    clean = asymptote - gap * (steps / steps.max()) ** -exponent
    return list(clean * (1 + noise * np.random.default_rng(seed).standard_normal(len(steps))))


def test_the_ground_truth_fit_recovers_a_planted_asymptote():
    truth = truth_summary(truth_runs([planted(12_000, 3_000, 0.6, 0.0, 0)] * 2))
    assert truth["asymptote_bits"] == pytest.approx(12_000, rel=1e-6)
    assert truth["fit"]["exponent"] == pytest.approx(0.6, rel=1e-4)
    for seed in range(3):  # 0.3% noise, about the scatter of one annealed point
        noisy = fit_asymptote(list(HORIZONS_STEPS), planted(12_000, 3_000, 0.6, 0.003, seed))
        assert noisy.ci_low_bits <= 12_000 <= noisy.ci_high_bits
        assert noisy.asymptote_bits == pytest.approx(12_000, rel=0.02)


def truth_runs(curves: list[list[float]], horizons=HORIZONS_STEPS, shape: str = "l1_d16") -> list[dict]:
    return [{"kind": "truth", "shape": shape, "num_sequences": 547, "params": 4864, "seed": seed,
             "annealed": [{"horizon_steps": h, "mem_bits": v, "converged": False} for h, v in zip(horizons, c)],
             "stable_mem_bits": [[h, 0.9 * v] for h, v in zip(horizons, c)]} for seed, c in enumerate(curves)]


def planted_at(horizons, asymptote: float, gap: float, exponent: float) -> list[float]:
    """A - gap (T / 64K)^-c at these horizons: one curve, whichever horizons a run branched at."""
    return [asymptote - gap * (h / HORIZONS_STEPS[-1]) ** -exponent for h in horizons]


def test_the_validation_judges_the_first_branches_against_the_long_run():
    """Planted results: two seeds to 64K steps from 2K, and seed 0 again from 500 steps to 16K (the same
    trunk: its truth is the 64K run's). Exact curves: every extrapolation has no bias and covers A."""
    early = (500, 1000, 2000, 4000, 8000, 16000)
    long = truth_runs([planted_at(HORIZONS_STEPS, 15_000, 900, 0.45), planted_at(HORIZONS_STEPS, 14_000, 700, 0.4)])
    short = truth_runs([planted_at(early, 15_000, 900, 0.45)], horizons=early)
    v = validate([("long.json", {"runs": long}), ("short.json", {"runs": short})],
                 methods=(DEFAULT_METHOD, "t"), planted_draws=10)
    assert [t["asymptote_bits"] for t in v["truths"]] == pytest.approx([15_000, 14_000], rel=1e-5)
    assert {t["file"] for t in v["truths"]} == {"long.json"}
    keys = [(r["first_branch_steps"], r["k"], r["seed"]) for r in v["rows"]]
    assert keys == [(500, 3, 0), (500, 4, 0), (500, 5, 0), (500, 6, 0), (1000, 3, 0), (1000, 4, 0), (1000, 5, 0),
                    (2000, 3, 0), (2000, 3, 1), (2000, 4, 0), (2000, 4, 1), (2000, 5, 0), (2000, 5, 1)]  # once each
    for row in v["rows"]:
        assert row["last_horizon_steps"] == row["first_branch_steps"] * 2 ** (row["k"] - 1)
        if row["k"] == 3:  # fewer than MIN_BRANCHES: said, not faked
            assert not row["extrapolable"] and "at least 4" in row["reason"] and row["bias"] is None
            continue
        assert row["extrapolable"] and abs(row["bias"]) < 1e-4 and row["covers"]
        assert row["last_branch_bias"] < 0  # the measured a(T_k) falls short of A: the curve still rises
    by_k = {(g["first_branch_steps"], g["k"]): g for g in v["by_k"]}
    assert by_k[(2000, 3)]["extrapolable"] == 0 and by_k[(2000, 4)]["runs"] == 2
    assert by_k[(2000, 4)]["coverage"] == 1.0 and by_k[(2000, 4)]["max_abs_bias"] < TARGET_BIAS
    assert set(by_k[(2000, 4)]["by_method"]) == {DEFAULT_METHOD, "t"}
    target = v["targets"]["2000"]
    assert target["coverage_met"] and target["bias_met"] and target["bias_k"] == 4 and target["bias_cells"] == 2
    assert v["targets"]["500"]["bias_k"] == 6
    assert set(v["method_choice"]) == {"500", "1000", "2000"} and v["method_choice"]["2000"]["chosen"] in (DEFAULT_METHOD, "t")


def test_validate_reads_results_files_and_writes_its_own(tmp_path, capsys):
    """`--validate` on the committed truth runs (3 shapes x 2 seeds, 2K..64K): per run and k = 3, 4, 5."""
    v = main(["--validate", str(COMMITTED_TRUTH), "--planted-draws", "20", "--out", str(tmp_path)])
    (written,) = tmp_path.glob("convergence-validation-*.json")
    assert json.loads(written.read_text())["rows"] == json.loads(json.dumps(v["rows"]))
    assert len(v["truths"]) == 6 and len(v["rows"]) == 18
    assert not any(r["extrapolable"] for r in v["rows"] if r["k"] == 3)  # fewer than MIN_BRANCHES: said so
    still_rising = [r for r in v["rows"] if r["k"] > 3 and not r["extrapolable"]]  # l1_d32 seed 0 at 2K..32K
    assert [(r["shape"], r["seed"], r["k"]) for r in still_rising] == [("l1_d32", 0, 5)]
    assert "still in its rise" in still_rising[0]["reason"]
    assert v["method_choice"]["2000"]["shipped_default"] == DEFAULT_METHOD
    printed = capsys.readouterr().out
    assert "not extrapolable: 3 branches" in printed and "interval method chosen" in printed


def test_the_asymptote_interval_holds_the_fit_and_every_seed():
    truth = truth_summary(truth_runs([planted(12_000, 3_000, 0.6, 0.003, s) for s in (1, 2)]))
    assert truth["asymptote_kind"] == "fit"
    low, high = truth["interval_bits"]
    assert low <= truth["asymptote_bits"] <= high
    assert all(low <= a <= high for a in truth["per_seed_asymptote_bits"])


def test_a_curve_that_never_saturates_gives_a_lower_bound_not_an_asymptote():
    climbing = [10_000 * 1.05 ** math.log2(h / HORIZONS_STEPS[0]) for h in HORIZONS_STEPS]  # +5% per doubling
    truth = truth_summary(truth_runs([climbing, climbing]))
    assert truth["asymptote_kind"].startswith("longest horizon, a lower bound")
    assert truth["asymptote_bits"] == pytest.approx(climbing[-1]) and truth["interval_bits"][1] is None


@pytest.mark.parametrize("horizon", [250, 999, 1001, *HORIZONS_STEPS])
def test_a_cool_down_branch_starts_at_its_horizon_and_lasts_a_fifth_of_it(horizon):
    branch = cooldown_train(horizon)
    assert branch.schedule == "wsd" and forced_decay_start(branch) == horizon
    assert branch.max_steps - horizon == pytest.approx(branch.cooldown_fraction * horizon, abs=1)


def test_the_long_run_resumed_at_a_horizon_equals_one_run_straight_through(tmp_path):
    torch.set_num_threads(1)
    straight = cell("l1_d16", 64, stable_train(240), 0)
    members = synthetic_members(straight.data, 0)
    evaluate = mem_bits_evaluator(straight.data, members)
    whole = train(straight, members, device=torch.device("cpu"), evaluate=evaluate)
    first = cell("l1_d16", 64, stable_train(120), 0)
    first_store = CheckpointStore(str(tmp_path), first.cell_id)
    train(first, members, device=torch.device("cpu"), evaluate=evaluate, checkpoints=first_store)
    store = CheckpointStore(str(tmp_path), straight.cell_id)
    handover(first_store, store)
    resumed = train(straight, members, device=torch.device("cpu"), evaluate=evaluate, checkpoints=store)
    assert resumed.resumed_from_step == 120 and resumed.steps == whole.steps == 240
    assert resumed.mem_history[-1] == whole.mem_history[-1]
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_the_quick_study_writes_results_its_curves_give(tmp_path):
    subprocess.run([sys.executable, "-m", "bench.convergence", "--quick", "--out", str(tmp_path)], cwd=REPO,
                   check=True, timeout=600)
    (written,) = tmp_path.glob("convergence-*.json")
    results = json.loads(written.read_text())
    assert not results["failed"] and results["stage"] == "4/4 jobs"
    (truth,) = results["truth"]
    assert truth["seeds"] == [0, 1] and truth["horizons_steps"] == [250, 500, 1000, 2000]
    low, high = truth["interval_bits"]
    assert low <= truth["asymptote_bits"] and (high is None or truth["asymptote_bits"] <= high)
    runs = {r["recipe"]: r for r in results["runs"] if r["kind"] == "recipe"}
    assert set(runs) == {"cosine_4k", "wsd_lr1e-2"} and len(results["rows"]) == 2
    for row in results["rows"]:
        curve, a = runs[row["recipe"]]["mem_history"], truth["asymptote_bits"]
        assert row["asymptote_bits"] == a and row["final_mem_bits"] == curve[-1][1]
        assert row["fraction_of_asymptote"] == pytest.approx(curve[-1][1] / a)
        reached = [step for step, bits in curve if bits >= REACHED_FRACTION * a]
        assert row["steps_to_98pct"] == (reached[0] if reached else None)
        within = abs(curve[-1][1] - a) <= RIGHT_TOLERANCE * a
        assert row["within_2pct"] == within and row["converged_right"] == (row["converged"] == within)
        assert row["unconverged_within_2pct"] == (within and not row["converged"])
        assert row["steps"] == curve[-1][0]
        assert row["flops"] == pytest.approx(row["steps"] * runs[row["recipe"]]["flops_per_step"])
    assert results["summary"]["wsd_lr1e-2"]["runs"] == 1
