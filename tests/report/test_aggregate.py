"""`memsweep aggregate`: one typed row per cell from a real sweep's MLflow record, the same numbers the
runs hold, curves from the metric histories, PENDING and failed cells kept, and a pinned schema."""

from __future__ import annotations

import json
import math

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.aggregate import (
    CELLS_SCHEMA,
    CURVE_KEYS,
    CURVES_SCHEMA,
    FINAL_METRICS,
    aggregate,
    build_cells_table,
    config_column,
    current_runs,
)
from orchestrator.tracking import RunRecord

pytestmark = pytest.mark.slow  # the module's sweep trains four tiny models on Ray (about 40 s)

# The fixed leading columns of cells.parquet. Changing them changes every reader's contract: update
# this list on purpose, never to make a test pass.
GOLDEN_CELLS_SCHEMA = [
    ("cell_id", "string"), ("run_id", "string"), ("status", "string"), ("error", "string"),
    ("code_version", "string"), ("launch_run_id", "string"), ("start_time", "timestamp[ms, tz=UTC]"),
    ("end_time", "timestamp[ms, tz=UTC]"), ("planned", "bool"),
    ("model.name", "string"), ("model.n_layer", "int64"), ("model.n_head", "int64"), ("model.n_embd", "int64"),
    ("data.vocab_size", "int64"), ("data.seq_len", "int64"), ("data.num_sequences", "int64"),
    ("data.num_nonmembers", "int64"), ("data.kind", "string"),
    ("train.max_steps", "int64"), ("train.batch_size", "int64"), ("train.lr", "double"),
    ("train.schedule", "string"), ("train.warmup_steps", "int64"), ("train.min_lr_ratio", "double"),
    ("train.weight_decay", "double"), ("train.beta1", "double"), ("train.beta2", "double"),
    ("train.grad_clip", "double"), ("train.eval_interval", "int64"), ("train.converge_tol", "double"),
    ("train.trigger_tol", "double"), ("train.cooldown_fraction", "double"), ("train.checkpoint_interval", "int64"),
    ("train.first_branch", "int64"), ("train.asymptote_from", "int64"),  # the branches schedule (issue 25)
    ("precision.name", "string"), ("seed", "int64"),
    *[(name, "double") for name in (
        "params", "params_paper", "entropy_bits", "mem_bits", "mem_bits_unclipped", "mem_fraction",
        "bits_per_param", "predicted_mem_bits", "sequences_per_param", "train_nll_bits_per_token",
        "test_nll_bits_per_token", "loss_auc", "loss_tpr_at_1pct_fpr", "loss_tpr_at_0p1pct_fpr", "loss_f1",
        "mem_bits_floor", "steps", "steps_trained", "exposures", "num_branches", "last_horizon_steps",
        "converged", "converged_step", "mem_gain_last_doubling", "asymptote_extrapolable", "mem_bits_asymptote",
        "mem_bits_asymptote_ci_low", "mem_bits_asymptote_ci_high", "asymptote_exponent", "fraction_of_asymptote",
        "decay_start_step", "resumed_from_step", "wall_s", "tokens_per_s")],
]


def test_cells_schema_is_pinned():
    assert [(f.name, str(f.type)) for f in CELLS_SCHEMA] == GOLDEN_CELLS_SCHEMA
    assert [(f.name, str(f.type)) for f in CURVES_SCHEMA] == [
        ("cell_id", "string"), ("run_id", "string"), ("key", "string"), ("step", "int64"), ("value", "double")]


def test_config_columns_are_typed_from_the_spec_else_from_the_values():
    assert config_column("model.n_layer", ["1", "2", None]).to_pylist() == [1, 2, None]
    assert config_column("train.lr", ["0.01", "1e-3"]).type == pa.float64()
    assert config_column("seed", ["3"]).type == pa.int64()
    assert config_column("cluster.use_gpus", ["True", "False"]).to_pylist() == [True, False]
    assert config_column("cluster.num_gpus", ["None", "2"]).to_pylist() == [None, 2]
    assert config_column("sweep.grid.seed", ["0,1", "0,1,2"]).type == pa.string()
    assert config_column("eval_batch_size", ["1024"]).type == pa.int64()
    assert config_column("cluster.address", ["None", None]).null_count == 2


def _run(run_id, cell_id, status, start, mem=None):
    return RunRecord(run_id, "1", status, start, None, {"cell_id": cell_id, "memsweep.kind": "cell"},
                     {"seed": "0"}, {} if mem is None else {"mem_bits": mem})


def test_finished_run_wins_else_the_newest():
    runs = [_run("a1", "a", "FINISHED", 1, 10.0), _run("a2", "a", "RUNNING", 2),  # a retry left behind
            _run("b1", "b", "FAILED", 1), _run("b2", "b", "RUNNING", 2)]
    chosen = current_runs(runs)
    assert chosen["a"].run_id == "a1" and chosen["b"].run_id == "b2"
    table = build_cells_table(runs)
    assert table.column("cell_id").to_pylist() == ["a", "b"]
    assert table.column("mem_bits").to_pylist() == [10.0, None]
    assert table.column("planned").null_count == 2  # no grid known


@pytest.fixture(scope="module")
def smoke_aggregate(smoke_root, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEMSWEEP_ROOT", str(smoke_root))
        return aggregate("smoke", [], tmp_path_factory.mktemp("agg"))


def test_one_row_per_cell_with_the_numbers_the_runs_hold(smoke_root, smoke_aggregate):
    table = smoke_aggregate.cells
    assert table.num_rows == 4
    leading = [(f.name, f.type) for f in list(table.schema)[: len(CELLS_SCHEMA)]]
    assert leading == [(f.name, f.type) for f in CELLS_SCHEMA]
    client = MlflowClient(f"sqlite:///{smoke_root}/mlflow.db")
    rows = table.to_pylist()
    assert len({r["cell_id"] for r in rows}) == 4
    for row in rows:
        run = client.get_run(row["run_id"])
        assert run.data.tags["memsweep.cell_id"] == row["cell_id"]
        assert row["status"] == run.info.status == "FINISHED"
        assert row["planned"] is True and row["error"] is None
        assert row["code_version"] == run.data.tags["memsweep.code_version"]
        assert row["launch_run_id"] == run.data.tags["mlflow.parentRunId"]
        for name in FINAL_METRICS:  # a metric the run did not log (converged_step of an unconverged cell) is null
            assert row[name] == run.data.metrics.get(name), name
        params = run.data.params
        assert row["model.n_layer"] == int(params["model.n_layer"])
        assert row["data.num_sequences"] == int(params["data.num_sequences"])
        assert row["train.lr"] == float(params["train.lr"])
        assert row["seed"] == int(params["seed"]) and row["precision.name"] == params["precision.name"]
        assert set(params) <= set(table.column_names)  # every param is a column


def test_curves_equal_the_metric_histories(smoke_root, smoke_aggregate):
    curves = smoke_aggregate.curves
    client = MlflowClient(f"sqlite:///{smoke_root}/mlflow.db")
    for row in smoke_aggregate.cells.to_pylist():
        histories = {}
        for key in CURVE_KEYS:
            history = histories[key] = {}
            for m in sorted(client.get_metric_history(row["run_id"], key), key=lambda m: m.timestamp):
                history[m.step] = m.value  # a step logged twice: the later value
            mine = curves.filter(pc.and_(pc.equal(curves["run_id"], row["run_id"]),
                                                 pc.equal(curves["key"], key)))
            assert mine.column("step").to_pylist() == sorted(history)
            assert mine.column("value").to_pylist() == [history[s] for s in sorted(history)]
            assert set(mine.column("cell_id").to_pylist()) == {row["cell_id"]}
        # mem_bits's last point is the final metric (logged at step = steps, the last branch's end), and
        # the annealed curve's last point is that branch's a(T), at its horizon T
        assert max(histories["mem_bits"]) == row["steps"]
        last_horizon = max(histories["annealed_mem_bits"])
        assert last_horizon == row["last_horizon_steps"]
        assert histories["annealed_mem_bits"][last_horizon] == histories["mem_bits"][row["steps"]] == row["mem_bits"]


def test_files_read_back_with_pandas_and_fits_are_logged_to_the_launch(smoke_root, smoke_aggregate):
    frame = pd.read_parquet(smoke_aggregate.cells_path)
    assert len(frame) == 4
    assert str(frame["model.n_layer"].dtype) == "int64" and str(frame["train.lr"].dtype) == "float64"
    assert str(frame["mem_bits"].dtype) == "float64"
    assert pq.read_table(smoke_aggregate.curves_path).schema.equals(CURVES_SCHEMA)
    fits = json.loads(smoke_aggregate.fits_path.read_text())
    assert fits["cells"] == {"total": 4, "finished": 4, "by_status": {"FINISHED": 4}}
    assert smoke_aggregate.logged
    client = MlflowClient(f"sqlite:///{smoke_root}/mlflow.db")
    launch = client.get_run(smoke_aggregate.launch_run_id)
    assert launch.data.tags["memsweep.kind"] == "launch"
    assert math.isclose(launch.data.metrics["alpha_fp32"], fits["alpha"]["fp32"]["alpha"])
    logged = {f.path for f in client.list_artifacts(launch.info.run_id, "aggregate")}
    assert {"aggregate/fits.json", "aggregate/cells.parquet", "aggregate/curves.parquet"} <= logged


def test_failed_running_and_pending_cells_are_kept(broken_root, tmp_path):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEMSWEEP_ROOT", str(broken_root["runs"]))
        result = aggregate("smoke", [], tmp_path)
    rows = {r["cell_id"]: r for r in result.cells.to_pylist()}
    assert list(rows) == broken_root["order"]  # the grown grid, in its order, nothing dropped
    assert {c: rows[c]["status"] for c in broken_root["finished"]} == dict.fromkeys(broken_root["finished"], "FINISHED")
    failed, running = rows[broken_root["failed"]], rows[broken_root["running"]]
    assert failed["status"] == "FAILED" and "CUDA out of memory" in failed["error"]
    assert running["status"] == "RUNNING" and running["error"] is None
    # An unfinished run's metric columns hold what MLflow holds: the latest logged value (here the
    # last evaluation's mem_bits), not a final measurement; fits read FINISHED rows only.
    assert failed["mem_bits"] == 480.0
    assert failed["loss_f1"] is None and failed["seed"] == 2
    for cell_id in broken_root["pending"]:
        pending = rows[cell_id]
        assert pending["status"] == "PENDING" and pending["run_id"] is None
        assert all(pending[name] is None for name in FINAL_METRICS)
        assert pending["data.num_sequences"] == 64 and pending["seed"] in (2, 3)  # typed config all the same
        assert pending["planned"] is True
    # The running cell's partial curve is there; fits use the FINISHED cells only.
    curves = result.curves.to_pylist()
    assert [(c["step"], c["value"]) for c in curves if c["cell_id"] == running["cell_id"] and c["key"] == "mem_bits"] \
        == [(100, 120.0), (200, 480.0)]
    assert result.fits["cells"]["by_status"] == {"FAILED": 1, "FINISHED": 4, "PENDING": 2, "RUNNING": 1}
    assert result.fits["capacity"][0]["num_cells"] == 4
    assert result.launch_run_id == broken_root["launch_run_id"]


def test_status_shows_alpha_in_both_forms_as_the_last_aggregate_logged_it(smoke_root, smoke_aggregate, monkeypatch,
                                                                          capsys):
    from orchestrator.cli import main

    fits = json.loads(smoke_aggregate.fits_path.read_text())
    monkeypatch.setenv("MEMSWEEP_ROOT", str(smoke_root))
    capsys.readouterr()
    assert main(["status", "smoke"]) == 0
    captured = capsys.readouterr()  # the tables on stdout, the lines around them on stderr
    out = " ".join((captured.out + captured.err).split())
    measured = fits["alpha"]["fp32"]
    expected = (f"alpha fp32 (slope, bits/param, from the last aggregate): measured {measured['alpha']:.3f}"
                + (" (a lower bound)" if measured["lower_bound"] else ""))
    assert expected in out
    if measured["extrapolated"]["available"]:
        assert f"extrapolated {measured['extrapolated']['alpha']:.3f}" in out
