"""bench/scale.py at its smallest size (100 cells): every stage runs for real (the plan, the launch on a
local Ray with the no-op runner, the bulk insert, the `memsweep status` command, aggregate), and the
table and results file show exactly the figures each stage timed."""

import json

import pytest

from bench.scale import growth, main, overrides, table_row
from orchestrator.tracking import Tracker


@pytest.mark.slow
def test_every_stage_runs_and_the_table_shows_what_was_timed(tmp_path):
    results = main(["--cells", "100", "--root", str(tmp_path / "stores"), "--out", str(tmp_path / "out")])
    figures = results["sizes"]["100"]
    assert list(figures) == ["plan", "submit", "status", "aggregate"]
    plan, submit, status, aggregate = (figures[s] for s in figures)
    assert plan["cells"] == 100 and aggregate["rows"] == 100
    for stage in (plan, status, aggregate):  # timed inside its process: within the process's wall time
        assert 0 < stage["seconds"] < stage["process_s"]
    assert 0 < submit["first_submitted_s"] < submit["first_outcome_s"] <= submit["total_s"] < submit["process_s"]
    for event in ("first_submitted", "first_outcome"):  # from the plan: Ray's start first
        assert submit[f"{event}_from_plan_s"] == pytest.approx(submit[f"{event}_s"] + submit["ray_start_s"], abs=0.5)
    assert 0 < submit["rss_before_mb"] <= submit["rss_peak_mb"] <= submit["peak_mb"]  # sampled, within the peak
    assert submit["rss_at_10pct_mb"] <= submit["rss_peak_mb"]
    assert all(f["peak_mb"] > 50 for f in figures.values())  # the interpreter and its imports at least
    assert table_row(figures) == {
        "plan_s": plan["seconds"], "plan_mb": plan["peak_mb"], "first_submit_s": submit["first_submitted_from_plan_s"],
        "first_outcome_s": submit["first_outcome_from_plan_s"],
        "submit_s": submit["total_s"], "submit_peak_mb": submit["rss_peak_mb"],
        "driver_mb_10pct": submit["rss_at_10pct_mb"], "driver_mb_90pct": submit["rss_at_90pct_mb"], "status_s": status["process_s"],
        "status_mb": status["peak_mb"], "aggregate_s": aggregate["seconds"], "aggregate_mb": aggregate["peak_mb"]}
    written = json.loads(next((tmp_path / "out").glob("scale-*.json")).read_text())
    assert written["sizes"] == json.loads(json.dumps(results["sizes"]))
    store = Tracker(f"sqlite:///{tmp_path}/stores/100/mlflow.db")
    assert len(store.finished_cells("smoke")) == 100  # what status and aggregate read: every cell FINISHED


def test_growth_is_per_tenfold_and_sizes_must_fill_the_grid():
    def sized(seconds: float) -> dict:
        stage = {"seconds": seconds, "process_s": seconds, "peak_mb": 100.0}
        return {"plan": stage, "status": stage, "aggregate": stage}

    ratios = growth({"1000": sized(1.0), "100000": sized(100.0)})
    assert ratios["plan_s"]["1000->100000"] == pytest.approx(10.0)  # linear: 10x per 10x
    assert ratios["plan_mb"]["1000->100000"] == pytest.approx(1.0)
    assert "submit_s" not in ratios  # a stage not run has no ratio
    assert len([o for o in overrides(1000) if o.startswith("seed=range(0,10)")]) == 1
    with pytest.raises(SystemExit, match="multiple of 100"):
        overrides(150)
