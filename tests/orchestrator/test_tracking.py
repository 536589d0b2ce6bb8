"""The tracking layer against real MLflow stores."""

from __future__ import annotations

import subprocess
import sys

from orchestrator.tracking import Tracker

OPEN_STORE = """
import sys
from orchestrator.tracking import Tracker
Tracker(sys.argv[1]).experiment_id("concurrent")
print("ok")
"""


def test_processes_opening_a_new_sqlite_store_at_once_do_not_crash(tmp_path):
    """MLflow migrates a new SQLite store's schema when a client is built; eight bare clients doing it
    at once crash (seven of eight did here). memsweep's driver, workers and `status` may do exactly
    that, so Tracker builds its client under a file lock."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    processes = [subprocess.Popen([sys.executable, "-c", OPEN_STORE, uri], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(8)]
    results = [p.communicate(timeout=120) for p in processes]
    assert [out.strip() for out, _ in results] == ["ok"] * 8, [err[-500:] for _, err in results]
    assert len(Tracker(uri).client.search_experiments(filter_string="name = 'concurrent'")) == 1


def test_a_cell_run_is_found_by_tag_and_reopened(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "artifacts"))
    run_id, finished = tracker.open_cell_run("exp", "cell-a", "cell-a", tags={"sweep": "exp"})
    assert not finished
    tracker.fail(run_id, "RuntimeError: boom")
    assert tracker.cell_records("exp")["cell-a"].error == "RuntimeError: boom"
    again, finished = tracker.open_cell_run("exp", "cell-a", "cell-a", tags={"sweep": "exp"})
    assert (again, finished) == (run_id, False)  # the same run, RUNNING again, error cleared
    record = tracker.cell_records("exp")["cell-a"]
    assert (record.status, record.error) == ("RUNNING", None)
    tracker.finish(run_id)
    assert tracker.open_cell_run("exp", "cell-a", "cell-a", tags={}) == (run_id, True)
    assert tracker.finished_cells("exp") == {"cell-a"}
