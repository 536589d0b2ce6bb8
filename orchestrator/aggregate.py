"""Pull every run of a sweep into Parquet tables and fit capacity, alpha and the MIA law.

    memsweep aggregate SWEEP [OVERRIDES...] [--out DIR] [--from PATH] [--no-curves] [--no-plan]

Writes `<out>/cells.parquet` (one row per cell: its current run, or PENDING for a grid cell of the
latest launch that never started), `<out>/curves.parquet` (the step metrics of every cell, long form)
and `<out>/fits.json`, and logs the fits to the sweep's latest launch run. `<out>` defaults to
`<root_dir>/aggregate/<sweep>/`. This module only moves data: runs into a typed table, the table into
measure.sweep (every fit, docs/science.md), the results into files and the launch run. The fits read
FINISHED rows only: an unfinished run's metric columns hold what MLflow holds for it, the latest logged
value (a failed cell's last evaluation of mem_bits), never a final measurement.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from measure.metrics import STEP_METRICS, SYNTHETIC, metric_names
from measure.sweep import N_BOOT, fit_metrics, fit_sweep, grouping
from models.spec import DataSpec, ModelSpec, TrainSpec
from orchestrator.compose import ConfigError, load_sweep, sweep_config

log = logging.getLogger(__name__)

# -- the tables' columns --------------------------------------------------------------------------------
# The final metrics a synthetic cell logs (measure/metrics.py), all float64: the table's fixed metric
# columns. Metrics a run holds beyond these (a text cell's, the latest step value of
# `train_loss_bits_per_token`) follow as extra float64 columns, null where a run lacks them.
FINAL_METRICS = metric_names(SYNTHETIC)
CURVE_KEYS = tuple(m.name for m in STEP_METRICS)  # step metrics, logged at evaluation steps
PENDING = "PENDING"  # a cell of the latest launch's grid with no run at all

IDENTITY_SCHEMA = pa.schema([
    pa.field("cell_id", pa.string(), nullable=False),
    pa.field("run_id", pa.string()),  # null for PENDING cells
    pa.field("status", pa.string(), nullable=False),  # FINISHED, FAILED, KILLED, RUNNING, SCHEDULED, PENDING
    pa.field("error", pa.string()),  # the memsweep.error tag of a failed or killed run
    pa.field("code_version", pa.string()),
    pa.field("launch_run_id", pa.string()),  # the parent (launch) run that last ran the cell
    pa.field("start_time", pa.timestamp("ms", tz="UTC")),
    pa.field("end_time", pa.timestamp("ms", tz="UTC")),
    pa.field("planned", pa.bool_()),  # in the latest launch's grid; null when no grid was rebuilt
])

_ARROW_TYPES = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_()}


def _spec_column_types() -> dict[str, pa.DataType]:
    """The typed configuration of a cell, from the frozen specs: `model.n_layer` int64, ..."""
    types = {}
    for section, cls in (("model", ModelSpec), ("data", DataSpec), ("train", TrainSpec)):
        hints = typing.get_type_hints(cls)
        for spec_field in dataclasses.fields(cls):
            types[f"{section}.{spec_field.name}"] = _ARROW_TYPES[hints[spec_field.name]]
    types["precision.name"] = pa.string()
    types["seed"] = pa.int64()
    return types


SPEC_COLUMNS = _spec_column_types()
GROUPING = grouping(SPEC_COLUMNS)  # what the cells of a capacity group (and of a text group) share

# The fixed leading columns of cells.parquet. Params beyond these (a text cell's data.* and
# data.reference.*; runs recorded before issue 17 also logged tracking.*, cluster.*, sweep.grid.*, ...)
# and metrics beyond FINAL_METRICS follow, each sorted by name.
CELLS_SCHEMA = pa.schema(
    list(IDENTITY_SCHEMA)
    + [pa.field(name, kind) for name, kind in SPEC_COLUMNS.items()]
    + [pa.field(name, pa.float64()) for name in FINAL_METRICS]
)
CURVES_SCHEMA = pa.schema([
    pa.field("cell_id", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("step", pa.int64(), nullable=False),  # optimizer step
    pa.field("value", pa.float64(), nullable=False),  # bits (mem_bits) or bits per token (train loss)
])
METADATA_KEY = b"memsweep"  # cells.parquet's schema metadata: JSON describing the sweep


# -- building the cells table -----------------------------------------------------------------------------
def current_runs(runs) -> dict:
    """The current run of each cell, by cell id (tracking.replaces): the FINISHED one if there is one
    (the first, as `status` shows), else the newest (a retry continues that one)."""
    from orchestrator.tracking import TAG_CELL, replaces, tag  # MLflow loads only when a store is read

    chosen: dict = {}
    for run in runs:
        cell_id = tag(run.tags, TAG_CELL)
        if cell_id and replaces(run, chosen.get(cell_id)):
            chosen[cell_id] = run
    return chosen


def _is_null(value) -> bool:
    return value is None or value == "None"


def _parse(value: str, kind: pa.DataType):
    if kind == pa.int64():
        number = float(value) if ("." in value or "e" in value.lower()) else int(value)
        if isinstance(number, float):
            if not number.is_integer():
                raise ValueError(f"{value!r} is not an integer")
            number = int(number)
        return number
    if kind == pa.float64():
        return float(value)
    if kind == pa.bool_():
        if value not in ("True", "False", "true", "false"):
            raise ValueError(f"{value!r} is not a boolean")
        return value in ("True", "true")
    return value


def _infer_type(values: list) -> pa.DataType:
    """The narrowest of bool, int64, float64, string that parses every non-null value."""
    present = [v for v in values if not _is_null(v)]
    for kind in (pa.bool_(), pa.int64(), pa.float64()):
        try:
            for value in present:
                _parse(value, kind)
        except ValueError:
            continue
        if present:
            return kind
    return pa.string()


def config_column(name: str, values: list) -> pa.Array:
    """One configuration column from MLflow's string params ('None' and missing are null), typed as
    the spec declares it, else by inference from the values."""
    kind = SPEC_COLUMNS.get(name) or _infer_type(values)
    try:
        return pa.array([None if _is_null(v) else _parse(v, kind) for v in values], type=kind)
    except ValueError as err:  # a run logged by other code: keep its values rather than fail
        log.warning("aggregate: column %s is not %s as the spec says (%s); inferring its type", name, kind, err)
        kind = _infer_type(values)
        return pa.array([None if _is_null(v) else _parse(v, kind) for v in values], type=kind)


@dataclass
class PlannedCell:
    """A cell of the latest launch's grid: its id and its flattened configuration as params strings."""

    cell_id: str
    params: dict[str, str]


def build_cells_table(runs, planned: list[PlannedCell] | None = None, metadata: dict | None = None) -> pa.Table:
    """One row per cell: the current run of every cell found in `runs` (tracking RunRecords of kind
    cell, oldest first), and a PENDING row for each planned cell without a run. Rows follow the
    grid's order, then cells outside the grid by id. `planned` None means no grid is known."""
    from orchestrator.tracking import TAG_CODE, TAG_PARENT, tag

    chosen = current_runs(runs)
    order = [p.cell_id for p in planned or []]
    order += sorted(set(chosen) - set(order))
    planned_ids = None if planned is None else {p.cell_id for p in planned}
    planned_params = {p.cell_id: p.params for p in planned or []}

    rows_params, identity = [], {f.name: [] for f in IDENTITY_SCHEMA}
    metrics_by_row = []
    for cell_id in order:
        run = chosen.get(cell_id)
        identity["cell_id"].append(cell_id)
        identity["planned"].append(None if planned_ids is None else cell_id in planned_ids)
        if run is None:
            for name in ("run_id", "error", "code_version", "launch_run_id", "start_time", "end_time"):
                identity[name].append(None)
            identity["status"].append(PENDING)
            rows_params.append(planned_params[cell_id])
            metrics_by_row.append({})
            continue
        identity["run_id"].append(run.run_id)
        identity["status"].append(run.status)
        identity["error"].append(run.tags.get("memsweep.error"))
        identity["code_version"].append(tag(run.tags, TAG_CODE))
        identity["launch_run_id"].append(run.tags.get(TAG_PARENT))
        identity["start_time"].append(run.start_time_ms)
        identity["end_time"].append(run.end_time_ms)
        # A run that failed before logging its params still has a configuration: its grid cell's.
        rows_params.append(run.params or planned_params.get(cell_id, {}))
        metrics_by_row.append(run.metrics)

    columns = {f.name: pa.array(identity[f.name], type=f.type) for f in IDENTITY_SCHEMA}
    all_keys = set().union(*rows_params) if rows_params else set()
    extra_config = sorted(all_keys - set(SPEC_COLUMNS))
    all_metrics = set().union(*metrics_by_row) if metrics_by_row else set()
    extra_metrics = sorted(all_metrics - set(FINAL_METRICS))
    for name in list(SPEC_COLUMNS):
        columns[name] = config_column(name, [p.get(name) for p in rows_params])
    for name in FINAL_METRICS:
        columns[name] = pa.array([m.get(name) for m in metrics_by_row], type=pa.float64())
    taken = set(columns)
    for name in extra_config:
        column = config_column(name, [p.get(name) for p in rows_params])
        columns[f"config.{name}" if name in taken else name] = column
    taken = set(columns)
    for name in extra_metrics:
        column = pa.array([m.get(name) for m in metrics_by_row], type=pa.float64())
        columns[f"metric.{name}" if name in taken else name] = column
    table = pa.table(columns)
    if metadata is not None:
        metadata = {**metadata, "metric_columns": [n for n in columns if n in FINAL_METRICS or n in extra_metrics
                                                   or n.startswith("metric.")]}
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()})
    return table


def build_curves_table(points, run_to_cell: dict[str, str], cell_order: list[str]) -> pa.Table:
    """Long-form step metrics from (run_id, key, step, value, timestamp_ms) points. A step logged
    twice (the last evaluation and the final metrics share a step; a resumed run re-logs) keeps
    its most recent value. Sorted by cell (in `cell_order`), key, step."""
    latest: dict[tuple[str, str, int], tuple[int, float]] = {}
    for run_id, key, step, value, timestamp in points:
        ident = (run_id, key, int(step))
        if ident not in latest or timestamp >= latest[ident][0]:
            latest[ident] = (timestamp, value)
    rank = {cell_id: i for i, cell_id in enumerate(cell_order)}
    idents = sorted(latest, key=lambda k: (rank.get(run_to_cell.get(k[0], ""), len(rank)), k[1], k[2]))
    return pa.table({
        "cell_id": pa.array([run_to_cell[k[0]] for k in idents], type=pa.string()),
        "run_id": pa.array([k[0] for k in idents], type=pa.string()),
        "key": pa.array([k[1] for k in idents], type=pa.string()),
        "step": pa.array([k[2] for k in idents], type=pa.int64()),
        "value": pa.array([latest[k][1] for k in idents], type=pa.float64()),
    }, schema=CURVES_SCHEMA)


def table_metadata(table: pa.Table) -> dict:
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}



# -- the sweep --------------------------------------------------------------------------------------------
@dataclass
class AggregateResult:
    out_dir: Path
    cells_path: Path
    curves_path: Path | None
    fits_path: Path
    cells: pa.Table
    curves: pa.Table | None
    fits: dict
    launch_run_id: str | None = None
    logged: bool = False
    timings_s: dict[str, float] = field(default_factory=dict)


def sweep_settings(sweep: str, overrides) -> tuple[str, Path, object]:
    """(tracking URI, root_dir, tracker) for `sweep=NAME` plus the command line's fixed overrides.
    A local store that does not exist is an error, not created (opening one creates it)."""
    from orchestrator.tracking import Tracker  # MLflow loads only when a store is read, never for --from

    cfg = sweep_config(sweep, overrides)
    uri = str(cfg.tracking.uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise ConfigError(f"sweep {sweep!r}: no tracking store at {uri}: launch it first "
                          f"(memsweep launch sweep={sweep}), or pass the overrides it was launched with")
    return uri, Path(str(cfg.root_dir)).resolve(), Tracker(uri, cfg.tracking.artifact_root)


def planned_cells(tracker, sweep: str, launch_overrides: list[str], overrides) -> list[PlannedCell]:
    """Every cell the sweep's launches recorded in their plans (orchestrator/plan.py), with the params
    recorded for it. A sweep launched before plans were recorded has its latest launch's grid rebuilt
    from its overrides instead: composing costs about 12 ms a cell, so a 10,000-cell grid takes a
    couple of minutes (`--no-plan` skips it)."""
    from orchestrator.plan import read_plan

    saved = read_plan(tracker, sweep)
    if saved is not None:
        return [PlannedCell(cell_id, params) for cell_id, params in saved.params().items()]
    cells = load_sweep(list(launch_overrides) + list(overrides)).cells
    return [PlannedCell(c.cell_id, {k: str(v)[:6000] for k, v in c.recorded_params().items()})
            for c in cells]


def aggregate(
    sweep: str,
    overrides=(),
    out: str | Path | None = None,
    *,
    curves: bool = True,
    plan: bool = True,
    log_to_launch: bool = True,
    n_boot: int = N_BOOT,
) -> AggregateResult:
    """Read each cell's current run of `sweep` from its tracking store, write cells.parquet,
    curves.parquet and fits.json under `out` (default `<root_dir>/aggregate/<sweep>/`), and log the
    fits to the sweep's latest launch run. `plan=False` skips rebuilding the grid (no PENDING rows; Hydra composes every
    cell of the grid otherwise)."""
    from orchestrator.tracking import (TAG_OVERRIDES, code_version, latest_launch_run, log_to_run, read_cell_runs,
                                       read_metric_histories)

    timings = {}
    started = time.perf_counter()
    uri, root_dir, tracker = sweep_settings(sweep, overrides)
    if tracker.experiment_id(sweep, create=False) is None:
        raise ConfigError(f"sweep {sweep!r} has no runs in {uri}: launch it first (memsweep launch sweep={sweep})")
    out_dir = Path(out) if out is not None else root_dir / "aggregate" / sweep
    launch = latest_launch_run(tracker, sweep)
    runs, num_runs = read_cell_runs(tracker, sweep)  # each cell's current run only
    timings["read_runs_s"] = time.perf_counter() - started

    notes, planned = [], None
    if plan and launch is not None:
        t0 = time.perf_counter()
        try:
            planned = planned_cells(tracker, sweep, json.loads(launch.tags[TAG_OVERRIDES]), overrides)
        except (ConfigError, KeyError, ValueError) as err:
            notes.append(f"the sweep's plan could not be read or rebuilt, so PENDING cells are not listed: {err}")
        timings["plan_s"] = time.perf_counter() - t0
    elif launch is None:
        notes.append("the sweep has no launch run: PENDING cells are not listed")
    else:
        notes.append("grid not rebuilt (--no-plan): PENDING cells are not listed")

    metadata = {
        "sweep": sweep, "tracking_uri": uri, "aggregated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "aggregator_code_version": code_version(), "num_runs_read": num_runs,
        "launch_run_id": launch.run_id if launch else None,
        "launch_overrides": json.loads(launch.tags.get(TAG_OVERRIDES, "null")) if launch else None,
        "launch_params": launch.params if launch else None,
        "planned": planned is not None, "notes": notes,
    }
    t0 = time.perf_counter()
    cells = build_cells_table(runs, planned, metadata)
    timings["build_table_s"] = time.perf_counter() - t0

    curves_table = None
    if curves:
        t0 = time.perf_counter()
        run_to_cell = {run.run_id: cell_id for cell_id, run in current_runs(runs).items()}
        points = read_metric_histories(tracker, list(run_to_cell), CURVE_KEYS)
        curves_table = build_curves_table(points, run_to_cell, cells.column("cell_id").to_pylist())
        timings["curves_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fits = fit_sweep(cells, GROUPING, n_boot=n_boot)
    fits["notes"] = notes + fits["notes"]
    fits["sweep"] = sweep
    fits["launch_run_id"] = metadata["launch_run_id"]
    timings["fits_s"] = time.perf_counter() - t0

    result = write_aggregate(out_dir, cells, curves_table, fits)
    result.launch_run_id = metadata["launch_run_id"]
    if log_to_launch and launch is not None:
        t0 = time.perf_counter()
        files = [result.fits_path, result.cells_path] + ([result.curves_path] if result.curves_path else [])
        log_to_run(tracker, launch.run_id, fit_metrics(fits), files, artifact_path="aggregate")
        result.logged = True
        timings["log_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started
    result.timings_s = timings
    return result


def write_aggregate(out_dir: Path, cells: pa.Table, curves: pa.Table | None, fits: dict) -> AggregateResult:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells_path, fits_path = out_dir / "cells.parquet", out_dir / "fits.json"
    pq.write_table(cells, cells_path)
    curves_path = out_dir / "curves.parquet"
    if curves is not None:
        pq.write_table(curves, curves_path)
    else:  # never leave an older sweep state's curves beside the new table
        curves_path.unlink(missing_ok=True)
        curves_path = None
    fits_path.write_text(json.dumps(fits, indent=1, allow_nan=False) + "\n")
    return AggregateResult(out_dir, cells_path, curves_path, fits_path, cells, curves, fits)


def load_aggregate(path: str | Path) -> tuple[pa.Table, pa.Table | None]:
    """A cells.parquet (or the folder holding it) and the curves.parquet beside it, if any."""
    path = Path(path)
    if path.is_dir():
        path = path / "cells.parquet"
    if not path.is_file():
        raise ConfigError(f"--from {path}: no such file (aggregate the sweep first: memsweep aggregate SWEEP)")
    try:
        cells = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ConfigError(f"--from {path}: not a readable Parquet file ({err})") from None
    missing = [f.name for f in IDENTITY_SCHEMA if f.name not in cells.column_names]
    if missing:
        raise ConfigError(f"--from {path}: not a memsweep cells table (no column {missing[0]})")
    curves_path = path.with_name("curves.parquet")
    curves = pq.read_table(curves_path) if curves_path.is_file() else None
    return cells, curves


def aggregate_from(sweep: str, path: str | Path, out: str | Path | None = None, n_boot: int = N_BOOT) -> AggregateResult:
    """Refit a saved cells table offline (no tracking store); writes fits.json (and copies of the
    tables when `out` is elsewhere)."""
    cells, curves = load_aggregate(path)
    recorded = table_metadata(cells).get("sweep")
    if recorded and recorded != sweep:
        raise ConfigError(f"--from {path}: the table is of sweep {recorded!r}, not {sweep!r}")
    cells_path = Path(path) / "cells.parquet" if Path(path).is_dir() else Path(path)
    source_dir = cells_path.parent
    out_dir = Path(out) if out is not None else source_dir
    fits = fit_sweep(cells, GROUPING, n_boot=n_boot)
    fits["notes"] = table_metadata(cells).get("notes", []) + fits["notes"]
    fits["sweep"] = sweep
    fits["launch_run_id"] = table_metadata(cells).get("launch_run_id")
    if out_dir.resolve() == source_dir.resolve():
        out_dir.mkdir(parents=True, exist_ok=True)
        fits_path = out_dir / "fits.json"
        fits_path.write_text(json.dumps(fits, indent=1, allow_nan=False) + "\n")
        curves_path = cells_path.with_name("curves.parquet")
        return AggregateResult(out_dir, cells_path, curves_path if curves is not None else None,
                               fits_path, cells, curves, fits, launch_run_id=fits["launch_run_id"])
    result = write_aggregate(out_dir, cells, curves, fits)
    result.launch_run_id = fits["launch_run_id"]
    return result

