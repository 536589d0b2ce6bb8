"""The plan is data: what a launch planned is recorded on its launch run before any cell runs, and
status, resume and aggregate read that record, never today's `conf/` (orchestrator/plan.py).

Each test drives the real `memsweep` command on the shared multi-node Ray cluster (127.0.0.1) into a
real MLflow store; `conf/` is changed the way a user changes it, in a copy named by MEMSWEEP_CONF.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orchestrator.plan import PLAN_ARTIFACT, TAG_PLAN
from orchestrator.tracking import Tracker, read_runs
from tests.orchestrator.conftest import finish, memsweep, wait_until
from tests.orchestrator.test_sweeps import assert_one_finished_run_each, cell_runs, on_cluster

pytestmark = pytest.mark.slow

CONF = Path(__file__).resolve().parents[2] / "conf"


def run(args, root, cwd, timeout_s: float = 300) -> str:
    process = memsweep(args, root, cwd)
    output = finish(process, timeout_s)
    assert process.returncode == 0, output
    return output


def aggregated(root, cwd, out: str) -> list[dict]:
    run(["aggregate", "smoke", "--out", str(cwd / out), "--no-curves"], root, cwd)
    rows = pq.read_table(cwd / out / "cells.parquet").to_pylist()
    return sorted(({k: row[k] for k in ("cell_id", "status", "mem_bits", "run_id")} for row in rows),
                  key=lambda r: r["cell_id"])


def test_a_changed_default_moves_no_recorded_cell_and_a_relaunch_grows_the_plan(
        ray_cluster, sweep_root, tmp_path, monkeypatch):
    cluster = on_cluster(ray_cluster)
    run(["launch", "sweep=smoke", "seed=0", *cluster], sweep_root, tmp_path)
    first = {c for c, runs in cell_runs(sweep_root, "smoke").items() if runs[0].info.status == "FINISHED"}
    assert len(first) == 2
    before = aggregated(sweep_root, tmp_path, "before")

    conf = tmp_path / "conf"  # a colleague's change to a default: every cell id of the grid moves
    shutil.copytree(CONF, conf)
    recipe = conf / "train" / "cpu.yaml"
    recipe.write_text(re.sub(r"(?m)^lr: .*$", "lr: 2.0e-2", recipe.read_text()))
    monkeypatch.setenv("MEMSWEEP_CONF", str(conf))
    # ... and another version of the code: memsweep's code version is the commit git finds for it,
    # which GIT_DIR moves to a checkout at another commit (as an upgrade or a pull would).
    other = tmp_path / "other-checkout"
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    subprocess.run(["git", "-C", str(other), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "another version"], check=True)
    commit = subprocess.run(["git", "-C", str(other), "rev-parse", "--short=12", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    monkeypatch.setenv("GIT_DIR", str(other / ".git"))

    status = run(["status", "smoke"], sweep_root, tmp_path)
    assert "2 cells: finished 2" in status, status
    assert status.count("note:") == 1 and "follow the recorded plan" in status, status
    assert f"+g{commit})" in status, status  # the note names today's code, not the recorded one
    resumed = run(["resume", "smoke", *cluster], sweep_root, tmp_path)
    assert "nothing to run (finished 2)" in resumed, resumed
    assert aggregated(sweep_root, tmp_path, "after") == before

    grown = run(["launch", "sweep=smoke", "seed=0", *cluster], sweep_root, tmp_path)
    assert "2 of these 2 cells are new to its recorded plan of 2 cells" in grown, grown
    status = run(["status", "smoke"], sweep_root, tmp_path)
    assert "4 cells: finished 4" in status and "note:" not in status, status
    runs = assert_one_finished_run_each(sweep_root, "smoke", cell_runs(sweep_root, "smoke"))
    assert first < set(runs), "the first launch's cells stay in the sweep"
    assert len(aggregated(sweep_root, tmp_path, "grown")) == 4


def test_a_driver_killed_once_the_plan_is_recorded_leaves_a_plan_that_resume_reads(
        ray_cluster, sweep_root, tmp_path):
    cluster = on_cluster(ray_cluster)
    overrides = ["sweep=smoke", "seed=0,1", "train.max_steps=600", *cluster]
    driver = memsweep(["launch", *overrides], sweep_root, tmp_path)
    tracker = Tracker(f"sqlite:///{sweep_root}/mlflow.db")

    def recorded_launch():
        if not (sweep_root / "mlflow.db").exists():
            return None
        launches = [r for r in read_runs(tracker, "smoke", kind="launch") if TAG_PLAN in r.tags]
        return launches[0] if launches else None

    launch = wait_until(recorded_launch, 240, interval_s=0.2, what="the launch's plan recorded")
    driver.kill()  # SIGKILL: no chance to clean up
    driver.wait(30)
    planned = [row["cell_id"] for row in tracker.load_table(launch.run_id, PLAN_ARTIFACT).to_pylist()]
    assert len(planned) == 4
    finished = {c for c, r in cell_runs(sweep_root, "smoke").items() if r[0].info.status == "FINISHED"}
    assert len(finished) < 4, "killed before the sweep could finish"

    # resume reads the recorded plan, not the launch's overrides against today's conf/
    output = run(["resume", "smoke", *cluster], sweep_root, tmp_path)
    submitted = int(re.search(r"submitting (\d+)", output).group(1))
    assert submitted == 4 - len(finished)
    assert_one_finished_run_each(sweep_root, "smoke", planned)
    assert json.loads(launch.tags["memsweep.overrides"])[:2] == ["sweep=smoke", "seed=0,1"]
