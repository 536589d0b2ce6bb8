"""The fast readers of a sweep's state (orchestrator/tracking.py: `cell_records`, `read_cell_heads`,
`read_cell_runs`) give exactly what MLflow's plain run search gives, on a local SQLite store (SQL
through MLflow's tables) and on an `mlflow server` (the run search split into start-time ranges read
in parallel): the same current run per cell (FINISHED first, else newest; ties by run id), the same
params, tags and latest metrics, soft-deleted runs left out, old tag names read. The pages are made
tiny so that every reader crosses page boundaries. `aggregate` builds the same cells table and fits
from them as from the plain search."""

from __future__ import annotations

import math
import sys

import pytest
from mlflow.entities import Metric, Param, RunTag

from orchestrator import tracking
from orchestrator.aggregate import GROUPING, build_cells_table, current_runs
from orchestrator.tracking import TAG_CELL, TAG_ERROR, TAG_KIND, CellRecord, Tracker, read_cell_runs, read_runs
from tests.cluster.conftest import free_port, http_ok, start, stop, wait_for

T0 = 1_700_000_000_000  # start times, ms: the cells' runs are spread over hours, so ranges split them
HOUR = 3_600_000
# cell -> its runs as (start offset in hours, final status, deleted); None as the offset: a run that
# starts at the same moment as the cell's previous one (a tie MLflow breaks by run id).
RUNS = {
    "one-finished": [(0, "FINISHED", False)],
    "failed-then-finished": [(1, "FAILED", False), (2, "FINISHED", False)],
    "finished-then-reopened": [(3, "FINISHED", False), (4, "RUNNING", False)],
    "two-finished": [(5, "FINISHED", False), (6, "FINISHED", False)],
    "tied-finished": [(7, "FINISHED", False), (None, "FINISHED", False)],
    "tied-failed": [(8, "FAILED", False), (None, "KILLED", False)],
    "failed-then-killed": [(9, "FAILED", False), (10, "KILLED", False)],
    "running": [(11, "RUNNING", False)],
    "superseded": [(12, "FINISHED", True), (13, "RUNNING", False)],
    "only-deleted": [(14, "FINISHED", True)],
    "finished-late": [(40, "FAILED", False), (41, "FINISHED", False)],
}
OLD_TAG_CELL = "old-tag-name"  # a cell of a store written before tags moved under `memsweep.`


def make_run(client, exp_id: str, cell_id: str, start_ms: int, status: str, deleted: bool, number: int,
             cell_tag: str = TAG_CELL) -> str:
    """A cell run like a worker's: tags, params, final metrics (one NaN), its status, maybe deleted."""
    run = client.create_run(exp_id, start_time=start_ms, tags={TAG_KIND: "cell", cell_tag: cell_id})
    run_id = run.info.run_id
    metrics = [Metric("mem_bits", 100.0 + number, start_ms, 10), Metric("mem_bits", 50.0, start_ms, 5),
               Metric("loss_f1", math.nan, start_ms, 10), Metric("params", 1000.0, start_ms, 0)]
    params = [Param("model.n_layer", "1"), Param("seed", str(number)), Param("precision.name", "fp32")]
    tags = [RunTag(TAG_ERROR, f"boom {number}")] if status in ("FAILED", "KILLED") else []
    client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
    if status != "RUNNING":
        client.set_terminated(run_id, status, end_time=start_ms + 60_000)
    if deleted:
        client.delete_run(run_id)
    return run_id


def fill(tracker: Tracker, experiment: str) -> None:
    """Every case of RUNS, one old-tag cell, and runs no reader may take: a launch run, an untagged one."""
    client, exp_id = tracker.client, tracker.experiment_id(experiment)
    number = 0
    for cell_id, runs in RUNS.items():
        start_ms = None
        for offset, status, deleted in runs:
            start_ms = start_ms if offset is None else T0 + offset * HOUR
            make_run(client, exp_id, cell_id, start_ms, status, deleted, number)
            number += 1
    make_run(client, exp_id, OLD_TAG_CELL, T0 + 20 * HOUR, "FINISHED", False, number, cell_tag="cell_id")
    client.create_run(exp_id, start_time=T0 + 21 * HOUR, tags={TAG_KIND: "launch"})
    client.create_run(exp_id, start_time=T0 + 22 * HOUR, tags={TAG_CELL: "no-kind-tag"})


def plain_cell_records(tracker: Tracker, experiment: str) -> dict[str, CellRecord]:
    """What `cell_records` gave before the fast readers: MLflow's run search, oldest first, each run
    replacing a cell's run that is not FINISHED."""
    exp_id = tracker.experiment_id(experiment, create=False)
    records, token = {}, None
    while True:
        page = tracker.client.search_runs([exp_id], filter_string=f"tags.`{TAG_KIND}` = 'cell'", max_results=3,
                                          order_by=["attributes.start_time ASC"], page_token=token)
        for run in page:
            cell_id = run.data.tags.get(TAG_CELL) or run.data.tags.get("cell_id")
            if cell_id not in records or records[cell_id].status != "FINISHED":
                records[cell_id] = CellRecord(cell_id, run.info.run_id, run.info.status, run.data.tags.get(TAG_ERROR))
        token = page.token
        if not token:
            return records


def same_table(a, b) -> bool:
    """Equal schemas and values, NaN equal to NaN (Arrow's `equals` never finds two NaN equal)."""
    return a.schema == b.schema and a.to_pandas().equals(b.to_pandas())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on a SQLite store of its own, on 127.0.0.1 (one worker, no job runner)."""
    folder, port = tmp_path_factory.mktemp("mlflow-server"), free_port()
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PATH": "/usr/bin:/bin"}
    process = start([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
                     "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
                     "--port", str(port), "--workers", "1"], folder / "server.log", env=env, cwd=folder)
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 120, "the MLflow server")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


@pytest.fixture(params=["sqlite", "server"])
def store(request, tmp_path, monkeypatch) -> Tracker:
    """A filled store of each kind, read in pages of 3 runs (and 4 records per SQL chunk)."""
    monkeypatch.setattr(tracking, "HEAD_PAGE", 3)
    monkeypatch.setattr(tracking, "SEARCH_PAGE", 3)
    monkeypatch.setattr(tracking, "HISTORY_CHUNK_SQL", 4)
    uri = f"sqlite:///{tmp_path}/mlflow.db" if request.param == "sqlite" else request.getfixturevalue("server")
    tracker = Tracker(uri, str(tmp_path / "artifacts"), retry_timeout_s=10)
    experiment = f"fast-reads-{tmp_path.name}"  # the server's store is shared by both tests
    fill(tracker, experiment)
    tracker.experiment = experiment
    return tracker


def test_cell_records_are_those_of_the_plain_search(store):
    fast = store.cell_records(store.experiment)
    assert fast == plain_cell_records(store, store.experiment)
    assert set(fast) == set(RUNS) - {"only-deleted"} | {OLD_TAG_CELL}
    statuses = {cell_id: record.status for cell_id, record in fast.items()}
    assert statuses["finished-then-reopened"] == "FINISHED" and statuses["superseded"] == "RUNNING"
    assert statuses["failed-then-killed"] == "KILLED" and fast["failed-then-killed"].error.startswith("boom")
    assert store.finished_cells(store.experiment) == {c for c, s in statuses.items() if s == "FINISHED"}
    assert store.cell_records("no-such-sweep") == {}


def test_cell_runs_are_those_of_the_plain_search_and_build_the_same_table(store):
    runs, num_runs = read_cell_runs(store, store.experiment)
    everything = read_runs(store, store.experiment)
    plain = sorted(current_runs(everything).values(), key=lambda r: (r.start_time_ms, r.run_id))
    assert num_runs == len(everything) == sum(not d for runs_ in RUNS.values() for _, _, d in runs_) + 1
    assert [r.run_id for r in runs] == [r.run_id for r in plain]
    for fast, slow in zip(runs, plain):
        assert (fast.status, fast.start_time_ms, fast.end_time_ms, fast.experiment_id) == \
               (slow.status, slow.start_time_ms, slow.end_time_ms, slow.experiment_id)
        assert fast.tags == slow.tags and fast.params == slow.params
        assert fast.metrics.keys() == slow.metrics.keys() and fast.metrics["mem_bits"] == slow.metrics["mem_bits"]
        assert math.isnan(fast.metrics["loss_f1"]) and math.isnan(slow.metrics["loss_f1"])
    assert same_table(build_cells_table(runs), build_cells_table(everything))


def test_aggregate_builds_the_same_cells_table_and_fits_as_the_plain_search(tmp_path, monkeypatch):
    """On a store of real-looking runs (bench.aggregate_bench's bulk insert) with duplicates and a
    superseded run beside them: the same table and the same fits."""
    from bench.aggregate_bench import build_sql, synthetic_cells
    from measure.sweep import fit_sweep
    from models.spec import flatten
    from orchestrator.compose import compose_cell

    monkeypatch.setattr(tracking, "HEAD_PAGE", 50)
    monkeypatch.setattr(tracking, "HISTORY_CHUNK_SQL", 64)
    monkeypatch.setenv("MEMSWEEP_ROOT", str(tmp_path))
    template = {k: str(v) for k, v in flatten(compose_cell(["sweep=smoke"]).config).items()}
    cells = synthetic_cells(180, template)
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts"))
    exp_id = tracker.experiment_id("smoke")
    store = tracker.client._tracking_client.store
    build_sql(store, exp_id, "file:///nowhere", cells + retry_runs(synthetic_cells(30, template, seed=1), cells))
    tracker.client.set_terminated(cells[6]["run_id"], "FAILED")  # its newer FINISHED retry wins
    tracker.client.delete_run(cells[8]["run_id"])  # superseded: its newer retry is the cell's run

    runs, _ = read_cell_runs(tracker, "smoke")
    fast, plain = build_cells_table(runs), build_cells_table(read_runs(tracker, "smoke"))
    assert fast.num_rows == 180 and same_table(fast, plain)
    assert fit_sweep(fast, GROUPING, n_boot=20) == fit_sweep(plain, GROUPING, n_boot=20)


def retry_runs(retries: list[dict], cells: list[dict]) -> list[dict]:
    """`retries` made second FINISHED runs of the first cells: odd ones started just before the cell's
    run (so they win), even ones after every run (so the first stays)."""
    for i, retry in enumerate(retries):
        retry["tags"]["cell_id"] = cells[i]["tags"]["cell_id"]
        retry["start"] = cells[i]["start"] - 1 if i % 2 else cells[-1]["start"] + i + 1
    return retries
