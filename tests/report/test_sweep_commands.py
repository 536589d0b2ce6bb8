"""`memsweep status`, `show` and `stop` on a real store: the session's damaged smoke sweep (conftest's
`broken_root`: four FINISHED cells, one FAILED with an error, one RUNNING with a curve up to step 200,
two PENDING, under a launch run left RUNNING by a driver that recorded no Ray Job).

They live beside the report tests because they read the same session store; each calls the command
in this process."""

from __future__ import annotations

import json

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.console import STATES, STATUS_SCHEMA

pytestmark = pytest.mark.slow  # the session's smoke sweep (about 40 s, shared with the report tests)

CELL_KEYS = {"cell_id", "state", "run_id", "mlflow_url", "error", "step", "mem_bits", "stale", "overrides"}


@pytest.fixture
def broken(broken_root, monkeypatch):
    monkeypatch.setenv("MEMSWEEP_ROOT", str(broken_root["runs"]))
    return broken_root


def status_json(capsys, *args: str) -> dict:
    assert main(["status", "smoke", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_status_json_follows_its_schema(broken, capsys):
    doc = status_json(capsys)
    assert doc["schema"] == STATUS_SCHEMA and doc["sweep"] == "smoke"
    assert set(doc) == {"schema", "sweep", "tracking_uri", "mlflow_url", "browse", "total", "counts", "axes",
                        "cells", "note"}
    assert doc["counts"] == {"FINISHED": 4, "FAILED": 1, "KILLED": 0, "RUNNING": 1, "PENDING": 2}
    assert doc["total"] == 8 and len(doc["cells"]) == 8
    assert doc["tracking_uri"].startswith("sqlite:") and doc["mlflow_url"] is None  # a local store
    assert "memsweep ui" in doc["browse"]
    # the summary per swept axis: seeds 0-3 and the two dataset sizes, each value's cells by state
    assert set(doc["axes"]) == {"seed", "data.num_sequences"}
    assert doc["axes"]["seed"]["2"] == {"FINISHED": 0, "FAILED": 1, "KILLED": 0, "RUNNING": 0, "PENDING": 1}
    assert doc["axes"]["seed"]["3"] == {"FINISHED": 0, "FAILED": 0, "KILLED": 0, "RUNNING": 1, "PENDING": 1}
    assert sum(sum(v.values()) for v in doc["axes"]["data.num_sequences"].values()) == 8
    cells = {c["cell_id"]: c for c in doc["cells"]}
    assert all(set(c) == CELL_KEYS and c["state"] in STATES for c in cells.values())
    running = cells[broken["running"]]
    assert (running["state"], running["step"], running["mem_bits"]) == ("RUNNING", 200, 480.0)  # its latest point
    failed = cells[broken["failed"]]
    assert failed["state"] == "FAILED" and "CUDA out of memory" in failed["error"] and failed["step"] is None
    for cell_id in broken["pending"]:
        assert cells[cell_id]["run_id"] is None and cells[cell_id]["state"] == "PENDING"
    assert cells[broken["finished"][0]]["overrides"]["seed"] in ("0", "1")


def test_status_filters_by_state(broken, capsys):
    doc = status_json(capsys, "--state", "failed,running")
    assert {c["cell_id"] for c in doc["cells"]} == {broken["failed"], broken["running"]}
    assert doc["counts"]["FINISHED"] == 4  # the counts stay the sweep's

    assert main(["status", "smoke", "--state", "pending"]) == 0
    printed = capsys.readouterr().out
    assert all(cell_id in printed for cell_id in broken["pending"])
    assert broken["failed"] not in printed and broken["finished"][0] not in printed


def test_status_shows_axes_and_only_the_cells_that_need_attention(broken, capsys):
    assert main(["status", "smoke"]) == 0
    captured = capsys.readouterr()
    assert "by axis" in captured.out and "data.num_sequences" in captured.out
    rows = {line.split()[1]: line for line in captured.out.splitlines() if line.startswith("│ l")}
    assert set(rows) == {broken["failed"], broken["running"]}, captured.out  # not the finished or pending ones
    assert "200" in rows[broken["running"]] and "480" in rows[broken["running"]]
    assert "CUDA out of memory" in rows[broken["failed"]]
    assert "8 cells: finished 4, failed 1, running 1, pending 2" in captured.err
    assert "MLflow:" in captured.err and "memsweep ui" in captured.err

    assert main(["status", "smoke", "--cells"]) == 0
    listed = capsys.readouterr().out
    assert all(c in listed for c in broken["order"])


def test_show_lists_the_ids_and_prints_a_cells_recorded_config(broken, capsys):
    assert main(["show", "smoke"]) == 0
    ids = capsys.readouterr().out.split()
    assert ids == broken["order"]

    cell_id = broken["pending"][0]
    assert main(["show", "smoke", cell_id[:-3]]) == 0  # a unique start of the id is enough
    printed = capsys.readouterr().out
    assert printed.startswith(f"# cell {cell_id} of sweep smoke: PENDING")
    config = yaml.safe_load(printed)
    assert config["seed"] == 2 and config["data"]["num_sequences"] == 64 and config["model"]["name"] == "l1_d16"


@pytest.mark.parametrize("args, words", [
    (["show", "smoke", "l9_nope"], ("l9_nope", "no such cell", "memsweep show smoke")),
    (["show", "smoke", "l"], ("cells of sweep smoke start with it",)),
    (["show", "nosuch"], ("sweep=nosuch", "no such sweep config")),
    (["show", "laptop"], ("laptop", "never been launched")),
    (["status", "laptop"], ("laptop", "never been launched")),
    (["stop", "laptop"], ("laptop", "never been launched")),
])
def test_unknown_sweeps_and_cells_are_one_line_errors(broken, capsys, args, words):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_stop_names_a_local_driver_instead_of_stopping_it(broken, capsys):
    assert main(["stop", "smoke"]) == 1  # the planted launch run is RUNNING and recorded no Ray Job
    err = capsys.readouterr().err
    assert "not a Ray Job" in err and "Ctrl-C" in err and "memsweep resume smoke" in err, err
