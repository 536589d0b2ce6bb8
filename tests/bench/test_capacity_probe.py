"""bench/capacity_probe.py runs where CI has no GPU: `--device cpu --quick` runs the same code on toy sizes.
Checked: its three runs and their cells on the branches schedule, each run's horizon cap (the largest
doubling of first_branch whose trunk, branches and evaluations fit the budget, never above what was
wanted) and whether it leaves 4 branches to extrapolate from, and per cell the measured value (the last
branch), the annealed rule's verdict, every branch, and the asymptote or why there is none."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.capacity_probe import (
    asymptote_plan,
    cap_within,
    cell_record,
    extrapolated,
    paper_row,
    run_seconds,
    stopped,
    with_cap,
)
from bench.common import model_spec, train_recipe
from measure.asymptote import asymptote_metrics
from models.spec import CellSpec, DataSpec

REPO = Path(__file__).resolve().parents[2]
COSTS = {"step_s": 0.01, "eval_s": 0.01}


def paper_cell(cap: int = 10**6) -> CellSpec:
    return with_cap(CellSpec(model_spec("l1_d32"), DataSpec(2048, 64, 966, 256), train_recipe("paper"), "fp32", 0), cap)


def test_the_paper_row_is_l1_d32_at_its_published_bits_per_param():
    row = paper_row()
    assert (row["bits_per_param_fp32"], row["bits_per_param_bf16"]) == (4.23, 3.93)


def test_the_cap_is_the_largest_horizon_whose_trunk_branches_and_evaluations_fit_the_budget():
    spec = paper_cell()
    cap = cap_within(120.0, COSTS, 1, spec, 10**6)
    capped = with_cap(spec, cap).train
    assert cap == 8000 and capped.horizons == (1000, 2000, 4000, 8000)  # doublings of the recipe's first_branch
    recipe = (capped.schedule, capped.first_branch, capped.asymptote_from, capped.warmup_steps)
    assert recipe == ("branches", 1000, 2000, 1000)
    assert capped.eval_interval == 8000 // 16 and capped.steps_at_cap == 8000 + 200 + 400 + 800 + 1600
    # 11,000 steps and 4 + 16 evaluations fit 120 s; the next horizon's 22,200 steps do not
    assert run_seconds(capped, COSTS, 1) == pytest.approx(11000 * 0.01 + 20 * 0.01)
    assert run_seconds(capped, COSTS, 1) <= 120.0 < run_seconds(with_cap(spec, 16000).train, COSTS, 1)
    assert cap_within(120.0, COSTS, 2, spec, 10**6) == 8000 and cap_within(50.0, COSTS, 1, spec, 10**6) == 2000
    assert cap_within(10**6, COSTS, 1, spec, 5000) == 4000  # never beyond what was wanted
    short = cap_within(3.0, COSTS, 1, spec, 10**6)  # not even the first horizon: one branch at the cap
    assert short < 1000 and run_seconds(with_cap(spec, short).train, COSTS, 1) <= 3.0
    assert with_cap(spec, short).train.horizons == (short,) and with_cap(spec, short).train.warmup_steps == short // 10


def test_a_budget_short_of_four_branches_from_asymptote_from_says_the_asymptote_will_not_extrapolate():
    plan = asymptote_plan(paper_cell(8000).train, COSTS, 1, paper_cell())
    assert plan["fitted_horizons"] == [2000, 4000, 8000] and not plan["extrapolable_at_cap"]
    assert plan["needed_cap_steps"] == 16000 and plan["needed_steps"] == 22200
    assert "not extrapolable" in plan["note"] and "lower bound" in plan["note"]
    assert asymptote_plan(paper_cell(16000).train, COSTS, 1, paper_cell())["note"] is None


def result(branches, converged=False):
    return SimpleNamespace(branches=branches, steps=branches[-1][1], steps_trained=sum(e for _, e, _ in branches),
                           converged=converged, gain_last_doubling=0.02, mem_history=[(500, 100.0)])


def test_a_cell_reports_its_last_branch_every_branch_and_the_asymptote_of_those_from_asymptote_from():
    spec = paper_cell(16000)
    horizons = [1000, 2000, 4000, 8000, 16000]
    values = [30000.0 - 30000.0 * (t / 1000) ** -0.5 + (2000.0 if t == 1000 else 0.0) for t in horizons]  # a(16K) = 0.75 A
    branches = [(t, t + spec.train.branch_length(t), a) for t, a in zip(horizons, values)]
    cell = cell_record(spec, result(branches))
    assert cell["mem_bits"] == values[-1] and cell["bits_per_param"] == pytest.approx(values[-1] / spec.params)
    assert [b["horizon"] for b in cell["branches"]] == horizons
    assert cell["branches"][-1]["exposures"] == pytest.approx(19200 * 2048 / 966)
    expected = asymptote_metrics(horizons, values, values[-1], from_steps=2000)  # as training_metrics calls it
    assert cell["asymptote_extrapolable"] and cell["asymptote_branches"] == 4 and cell["asymptote_reason"] is None
    assert cell["mem_bits_asymptote"] == pytest.approx(expected["mem_bits_asymptote"])
    assert cell["mem_bits_asymptote"] == pytest.approx(30000.0, rel=1e-3)  # the 1,000-step branch is left out
    assert cell["mem_bits_asymptote_ci_low"] <= cell["mem_bits_asymptote"] <= cell["mem_bits_asymptote_ci_high"]
    assert cell["bits_per_param_asymptote"] == pytest.approx(cell["mem_bits_asymptote"] / spec.params)
    assert cell["fraction_of_asymptote"] == pytest.approx(values[-1] / cell["mem_bits_asymptote"])
    assert "extrapolated" in extrapolated(cell) and "unconverged at the cap (T=16,000" in stopped(cell)


def test_a_cell_short_of_four_branches_reports_why_and_its_measured_value_as_a_lower_bound():
    spec = paper_cell(4000)
    cell = cell_record(spec, result([(1000, 1200, 900.0), (2000, 2400, 1000.0), (4000, 4800, 1005.0)], converged=True))
    assert cell["converged"] and cell["converged_horizon"] == 4000 and "converged at T=4,000" in stopped(cell)
    assert not cell["asymptote_extrapolable"] and "at least 4" in cell["asymptote_reason"]
    assert cell["mem_bits_lower_bound"] == 1005.0 and "mem_bits_asymptote" not in cell
    assert "not extrapolable" in extrapolated(cell) and "lower bound" in extrapolated(cell)


@pytest.mark.slow
def test_the_probe_runs_on_the_cpu_and_writes_what_its_cells_measured_and_extrapolated(tmp_path):
    subprocess.run([sys.executable, "-m", "bench.capacity_probe", "--device", "cpu", "--quick", "--out",
                    str(tmp_path)], cwd=REPO, check=True, timeout=300)
    (written,) = tmp_path.glob("capacity_probe-*.json")
    results = json.loads(written.read_text())
    assert results["schedule"] == "branches"
    runs = {run["name"]: run for run in results["runs"]}
    assert list(runs) == ["paper_l1_d32_fp32", "paper_l1_d32_bf16", "laptop_l1_d16"]
    assert [runs[n]["paper_bits_per_param"] for n in runs] == [4.23, 3.93, None]
    assert [c["precision"] for c in runs["paper_l1_d32_bf16"]["cells"]] == ["bf16"]
    small, large = runs["laptop_l1_d16"]["cells"]
    assert large["num_sequences"] == pytest.approx(4 * small["num_sequences"], abs=2)  # 8x and 2x past capacity
    # the laptop run keeps the CPU recipe's asymptote_from (2,000): 8 s holds no 4 branches from there
    laptop = runs["laptop_l1_d16"]["asymptote_plan"]
    assert laptop["asymptote_from"] == 2000 and not laptop["extrapolable_at_cap"] and "lower bound" in laptop["note"]
    for run in runs.values():
        assert 1 <= run["cap_steps"] <= run["target_steps"] and run["step_s"] > 0
        assert run["asymptote_plan"]["horizons"][-1] == run["cap_steps"]
        for cell in run["cells"]:
            hp = cell["train"]
            assert hp["schedule"] == "branches" and hp["max_steps"] == run["cap_steps"]
            horizons = [b["horizon"] for b in cell["branches"]]
            assert horizons == run["asymptote_plan"]["horizons"][:len(horizons)] and horizons
            last = cell["branches"][-1]
            assert cell["mem_bits"] == last["mem_bits"] and cell["steps"] == last["end_step"]
            assert cell["bits_per_param"] == pytest.approx(cell["mem_bits"] / cell["params"])
            assert all(b["exposures"] == pytest.approx(b["end_step"] * hp["batch_size"] / cell["num_sequences"])
                       for b in cell["branches"])
            assert cell["converged"] == (cell["converged_horizon"] is not None)
            assert cell["converged"] or horizons[-1] == run["cap_steps"]  # stopped by the rule or at the cap
            if cell["asymptote_extrapolable"]:
                low, high = cell["mem_bits_asymptote_ci_low"], cell["mem_bits_asymptote_ci_high"]
                assert low <= cell["mem_bits_asymptote"] <= high
                assert cell["fraction_of_asymptote"] == pytest.approx(cell["mem_bits"] / cell["mem_bits_asymptote"])
            else:
                assert cell["asymptote_reason"] and cell["mem_bits_lower_bound"] == cell["mem_bits"]
    # --quick shrinks the paper recipe's horizons so that its fit runs (4 branches from asymptote_from take
    # 110 steps); on a machine too loaded for even that, the plan says so
    for name in ("paper_l1_d32_fp32", "paper_l1_d32_bf16"):
        plan = runs[name]["asymptote_plan"]
        assert plan["asymptote_from"] == 10 and (plan["extrapolable_at_cap"] or "lower bound" in plan["note"])
