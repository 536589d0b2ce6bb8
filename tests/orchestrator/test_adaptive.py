"""Adaptive sweeps (orchestrator/adaptive.py): `sweep.adaptive` checked before anything runs, rounds
decided by the rules and the budget, and, through the real scheduler and store with planted cells
(tests/orchestrator/planted_cells.py: mem_bits = min(2 * params, H(X))), rounds that add exactly the
cells the rules call for, are recorded append-only, and resume after the driver is killed between them.

With the planted alpha of 2 bits per parameter, sweep=laptop_adaptive with round 1 at the shared sizes
64, 128, 256 (sequences of 192 bits; its file sizes each shape by capacity multiples instead) goes: l1_d16 (9,728 bits, 50.7 sequences) holds only 79% of its smallest dataset: +32, then
its knee 32..64 spans 2: +45; l2_d16 (16,288 bits, 84.8 sequences) has its knee between 64 and 128:
+91. Both plateaus are flat from the start.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.adaptive import Measured, decide_round, drive, expected_rounds, plan_options, recorded_rounds
from orchestrator.compose import ConfigError, load_sweep
from tests.orchestrator.planted_cells import ALPHA, planted_measure, run_batches
from tests.orchestrator.test_sweeps import assert_one_finished_run_each, on_cluster

SWEEP = "laptop_adaptive"
SIZES = "data.num_sequences=64,128,256"  # round 1, the same for both shapes
REPO = Path(__file__).resolve().parents[2]
ROUND_2 = {("l1_d16", 32), ("l2_d16", 91)}
ROUND_3 = {("l1_d16", 45)}


def sizes(cells) -> set[tuple[str, int]]:
    return {(c.spec.model.name, c.spec.data.num_sequences) for c in cells}


def planted(cells) -> dict[str, Measured]:
    """What the planted runner would record for `cells`."""
    measured = {}
    for cell in cells:
        metrics = planted_measure(cell)[0].metrics
        measured[cell.cell_id] = Measured(metrics["mem_bits"], True, metrics["entropy_bits"])
    return measured


# -- configuration ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("sweep.adaptive.max_cells=many", "sweep.adaptive.max_cells='many' must be int"),
    ("sweep.adaptive.max_rounds=0", "sweep.adaptive.max_rounds=0 must be at least 1"),
    ("sweep.adaptive.max_cells=5", "sweep.adaptive.max_cells=5 is below the 6 cells planned already"),
    ("+sweep.adaptive.knee_factor=1", "sweep.adaptive.knee_factor=1.0 must be greater than 1"),
    ("+sweep.adaptive.near_entropy=2", "sweep.adaptive.near_entropy=2.0 must lie in (0, 1]"),
    ("+sweep.adaptive.tolerance=0.1", "sweep.adaptive.tolerance: unknown field; sweep.adaptive has max_cells, "),
])
def test_bad_adaptive_fields_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as caught:
        plan_options(load_sweep([f"sweep={SWEEP}", override]).cells)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_launch_refuses_a_bad_field_before_anything_runs(memsweep_root, capsys):
    from orchestrator.cli import main

    assert main(["launch", f"sweep={SWEEP}", "sweep.adaptive.max_rounds=-1"]) != 0
    err = capsys.readouterr().err.strip()
    assert err == "error: sweep.adaptive.max_rounds=-1 must be at least 1"
    from orchestrator.tracking import Tracker

    if (memsweep_root / "mlflow.db").exists():  # the store may be opened; no run of the sweep exists
        assert Tracker(f"sqlite:///{memsweep_root}/mlflow.db").experiment_id(SWEEP, create=False) is None


def test_a_fixed_sweep_has_no_adaptive_options():
    assert plan_options(load_sweep(["sweep=laptop"]).cells) is None


# -- deciding rounds (no store) -----------------------------------------------------------------------------
def test_rounds_follow_the_rules_and_stop():
    cells = load_sweep([f"sweep={SWEEP}", SIZES]).cells
    rounds = expected_rounds(cells, plan_options(cells), alpha={"fp32": ALPHA})
    assert [sizes(r) for r in rounds[1:]] == [ROUND_2, ROUND_3]
    decided = decide_round(cells, planted(cells), plan_options(cells), 2)
    reasons = {row["reason"] for row in decided.added}
    assert reasons == {"smallest size 64 at mem_fraction 0.79 < 0.95: add 32",
                       "knee between 64 and 128 (ratio 2.00 > 1.41): add 91"}
    assert all(group["state"] == "refining" for group in decided.groups.values())


def test_the_budget_cuts_a_round_and_flags_the_group():
    cells = load_sweep([f"sweep={SWEEP}", SIZES, "sweep.adaptive.max_cells=7"]).cells
    decided = decide_round(cells, planted(cells), plan_options(cells), 2)
    assert sizes(decided.cells) == {("l1_d16", 32)}
    l2 = next(group for label, group in decided.groups.items() if label.startswith("l2_d16"))
    assert l2["state"] == "stopped" and l2["lower_bound"]
    assert l2["notes"][-1] == ("budget spent (sweep.adaptive.max_cells=7): 1 cells it needs were not added (knee "
                               "between 64 and 128 (ratio 2.00 > 1.41): add 91); its capacity is a lower bound")


def test_past_max_rounds_nothing_is_added():
    cells = load_sweep([f"sweep={SWEEP}", SIZES]).cells
    decided = decide_round(cells, planted(cells), plan_options(cells), 5)  # max_rounds: 4
    assert decided.cells == [] and all(g["state"] == "stopped" for g in decided.groups.values())
    assert all("rounds spent (sweep.adaptive.max_rounds=4)" in g["notes"][-1] for g in decided.groups.values())


def test_a_planned_cell_is_never_added_again():
    cells = load_sweep([f"sweep={SWEEP}", SIZES]).cells
    first = decide_round(cells, planted(cells), plan_options(cells), 2)
    again = decide_round(cells + first.cells, planted(cells), plan_options(cells), 3)  # not measured yet
    assert again.cells == []


# -- through the scheduler and the store --------------------------------------------------------------------
@pytest.mark.slow
def test_rounds_add_exactly_what_the_rules_call_for_and_stop(ray_driver, sweep_root, capsys):
    from orchestrator.cli import main
    from orchestrator.launch import make_plan

    overrides = [f"sweep={SWEEP}", SIZES, *on_cluster(ray_driver)]
    plan = make_plan(overrides)
    run = run_batches(plan)
    assert drive(plan, plan_options(plan.cells), run) == 0
    by_id = {c.cell_id: c for c in plan.cells}
    assert [sizes(by_id[i] for i in batch) for batch in run.batches[1:]] == [ROUND_2, ROUND_3]
    assert_one_finished_run_each(sweep_root, SWEEP, by_id)

    rounds = recorded_rounds(plan.tracker, SWEEP)
    assert [len(r["added"]) for r in rounds] == [6, 2, 1, 0]
    assert all(g["state"] == "done" and g["plateau_established"] for g in rounds[-1]["groups"].values())
    assert main(["status", SWEEP, *on_cluster(ray_driver)]) == 0
    shown = capsys.readouterr().out
    assert "round 2: 2 cells" in shown and "add 91" in shown and "round 4: 0 cells" in shown

    again = make_plan(overrides)  # a relaunch after the last round: nothing runs, nothing is recorded
    rerun = run_batches(again)
    assert drive(again, plan_options(again.cells), rerun) == 0 and rerun.batches == []
    assert len(recorded_rounds(plan.tracker, SWEEP)) == 4


@pytest.mark.slow
def test_a_driver_killed_between_rounds_resumes_with_the_next_round(ray_driver, sweep_root):
    from orchestrator.launch import recorded_plan

    env = {**os.environ, "MEMSWEEP_ROOT": str(sweep_root)}
    killed = subprocess.run([sys.executable, "-m", "tests.orchestrator.planted_cells", "2", f"sweep={SWEEP}",
                             SIZES, *on_cluster(ray_driver)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stdout + killed.stderr  # killed as round 2's cells were about to run

    plan = recorded_plan(SWEEP, on_cluster(ray_driver))
    assert len(recorded_rounds(plan.tracker, SWEEP)) == 2
    pending = [c for c in plan.cells if plan.state(c) != "FINISHED"]
    assert sizes(pending) == ROUND_2  # read back from the round recorded on the launch run

    run = run_batches(plan)
    assert drive(plan, plan_options(plan.cells), run) == 0
    by_id = {c.cell_id: c for c in plan.cells}
    assert [sizes(by_id[i] for i in batch) for batch in run.batches] == [ROUND_2, ROUND_3]
    assert_one_finished_run_each(sweep_root, SWEEP, by_id)  # no finished cell ran twice
    assert [r["round"] for r in recorded_rounds(plan.tracker, SWEEP)] == [1, 2, 3, 4]
