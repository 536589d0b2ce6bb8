"""Pull every run of a sweep into Parquet tables and fit capacity, alpha and the MIA law.

    memsweep aggregate SWEEP [OVERRIDES...] [--out DIR] [--from PATH] [--no-curves] [--no-plan]

Writes `<out>/cells.parquet` (one row per cell: its current run, or PENDING for a grid cell of the
latest launch that never started), `<out>/curves.parquet` (the step metrics of every cell, long form)
and `<out>/fits.json`, and logs the fits to the sweep's latest launch run. `<out>` defaults to
`<root_dir>/aggregate/<sweep>/`. Every fit follows SCIENCE.md and calls measure.capacity; this module
only groups rows and feeds them in, and only FINISHED rows: an unfinished run's metric columns hold
what MLflow holds for it, the latest logged value (a failed cell's last evaluation of mem_bits), never
a final measurement.

Capacity, alpha, the MIA law and the predictions are fits over synthetic cells only (`data.kind` is
"synthetic", or absent in an older table): a text cell's mem_bits is unintended memorization against a
reference model, not information stored out of H(X). Text cells are summarised on their own in the
fits' `text` section (seed means per model, precision and pool size N).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from measure.capacity import (
    capacity,
    fit_alpha,
    fit_mia_law,
    mem_prediction_error,
    published_mia_law_as_printed,
    published_mia_law_corrected,
)
from measure.memorization import PAPER_ALPHA_BITS_PER_PARAM, predicted_mem_bits
from models.spec import DataSpec, ModelSpec, TrainSpec
from orchestrator.compose import ConfigError, load_sweep, sweep_config

log = logging.getLogger(__name__)

# -- the tables' columns --------------------------------------------------------------------------------
# Final metrics a synthetic cell logs (orchestrator/cell.py), all float64 in the table. Metrics a run
# holds beyond these (a text cell's `reference_*` attack, the latest step value of
# `train_loss_bits_per_token`) follow as extra float64 columns.
FINAL_METRICS = (
    "params", "params_paper", "entropy_bits", "mem_bits", "mem_bits_unclipped", "mem_fraction",
    "bits_per_param", "predicted_mem_bits", "sequences_per_param", "train_nll_bits_per_token",
    "test_nll_bits_per_token", "loss_auc", "loss_tpr_at_1pct_fpr", "loss_tpr_at_0p1pct_fpr", "loss_f1",
    "steps", "converged", "resumed_from_step", "wall_s", "tokens_per_s",
)
# Final metrics a text cell logs beyond those (it logs no mem_bits_unclipped, mem_fraction or
# predicted_mem_bits); they are extra float64 columns, null in synthetic rows. The prefixes of the
# extraction rates are 8, 16 and 32 tokens; a prefix of at least seq_len tokens is not logged.
TEXT_METRICS = (
    "mem_bits_per_sequence", "capacity_ratio", "nonmember_nll_bits_per_token",
    "reference_train_nll_bits_per_token", "reference_test_nll_bits_per_token",
    "reference_auc", "reference_tpr_at_1pct_fpr", "reference_tpr_at_0p1pct_fpr", "reference_f1",
    *(f"extract_{split}_p{prefix}" for split in ("train", "test") for prefix in (8, 16, 32)),
)
SYNTHETIC, TEXT = "synthetic", "text"  # the values of data.kind
CURVE_KEYS = ("mem_bits", "train_loss_bits_per_token")  # step metrics, logged at evaluation steps
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

# The fixed leading columns of cells.parquet. Configuration keys outside the spec (tracking.*,
# cluster.*, sweep.grid.*, ...) and metrics beyond FINAL_METRICS follow, each sorted by name.
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
    """The current run of each cell, by cell id, from runs sorted oldest first: the FINISHED one if
    there is one (the first, as `status` shows), else the newest (a retry continues that one)."""
    chosen: dict = {}
    for run in runs:
        cell_id = run.tags.get("cell_id")
        if cell_id and (cell_id not in chosen or chosen[cell_id].status != "FINISHED"):
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
        identity["code_version"].append(run.tags.get("code_version"))
        identity["launch_run_id"].append(run.tags.get("mlflow.parentRunId"))
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


# -- fits -------------------------------------------------------------------------------------------------
# A capacity is taken over cells that share everything but the dataset size and the seed (and the
# number of non-members, which changes only the MIA metrics): one model shape, one precision, one
# data shape (V, S) and one training recipe.
_NOT_IN_CAPACITY_GROUP = {"data.num_sequences", "seed", "data.num_nonmembers"}
CAPACITY_GROUP_KEYS = tuple(k for k in SPEC_COLUMNS if k not in _NOT_IN_CAPACITY_GROUP)
# A text summary groups like a capacity, and never averages across corpora, tokenizers, splits or
# reference models either (text params, which a table may lack: grouping uses those it has). A text
# cell without a reference (data.reference.enabled false) measures against the uniform code instead.
TEXT_GROUP_KEYS = tuple(dict.fromkeys((
    *CAPACITY_GROUP_KEYS, "data.corpus_uri", "data.tokenizer", "data.tokenizer_hash", "data.split_seed",
    "data.num_test", "data.max_sequences", "data.reference.enabled", "data.reference.num_sequences",
    "data.reference.n_layer", "data.reference.n_head", "data.reference.n_embd", "data.reference.seed",
)))
PRECISION_ORDER = ("fp32", "bf16", "amp_bf16")
N_BOOT = 1000
MIN_MIA_CELLS = 3  # the law has three constants


def column_arrays(table: pa.Table, names) -> dict[str, np.ndarray]:
    """Plain numpy columns: floats with NaN for null, everything else as object arrays."""
    arrays = {}
    for name in names:
        if name not in table.column_names:
            continue
        column = table.column(name)
        if pa.types.is_floating(column.type) or pa.types.is_integer(column.type):
            arrays[name] = np.array([np.nan if v is None else v for v in column.to_pylist()], dtype=np.float64)
        else:
            arrays[name] = np.array(column.to_pylist(), dtype=object)
    return arrays


def _clean(value):
    """JSON-safe: numpy scalars to Python, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def data_kinds(cols: dict[str, np.ndarray]) -> np.ndarray:
    """Each row's `data.kind` as an object array; a null, or a table without the column (one
    aggregated before text cells existed), is synthetic."""
    n = len(cols["status"])
    kinds = cols.get("data.kind", np.full(n, None, dtype=object))
    return np.array([SYNTHETIC if k is None else k for k in kinds], dtype=object)


def select_rows(cols: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {name: values[mask] for name, values in cols.items()}


def _finished(table: pa.Table) -> dict[str, np.ndarray]:
    """Columns of the FINISHED cells that carry the numbers every fit needs: mem_bits, params and N,
    and for a synthetic cell H(X) (`entropy_bits`). A text cell without mem_bits (a reference model,
    which has nothing to be measured against) is left out."""
    names = ["cell_id", "status", *CAPACITY_GROUP_KEYS, *TEXT_GROUP_KEYS, "data.num_sequences", "seed",
             *FINAL_METRICS, *TEXT_METRICS]
    names += [n for n in table.column_names if n.endswith("_f1") or n.endswith("_auc")]
    cols = column_arrays(table, dict.fromkeys(names))
    keep = cols["status"] == "FINISHED"
    for name in ("mem_bits", "params", "data.num_sequences"):
        keep &= np.isfinite(cols[name]) if name in cols else False
    entropy = cols.get("entropy_bits", np.full(len(keep), np.nan))
    keep &= np.isfinite(entropy) | (data_kinds(cols) != SYNTHETIC)
    return select_rows(cols, keep)


def _plain(value):
    """A group-key value as JSON would want it: integral floats (int columns read as float64) as int,
    NaN (a null: a key that some runs lack) as None, so that equal keys compare equal."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return int(value)
    return value


def _group_label(key: dict, varying: list[str]) -> str:
    label = f"{key.get('model.name')} {key.get('precision.name')}"
    extras = [f"{k}={key[k]:g}" if isinstance(key[k], float) else f"{k}={key[k]}" for k in varying]
    return label + (f" ({', '.join(extras)})" if extras else "")


@dataclass(frozen=True)
class CapacityGroup:
    key: dict  # grouping column -> value
    label: str  # shape and precision, plus any other grouping key that varies in the sweep
    rows: np.ndarray  # bool mask over the cells
    varying: dict  # the grouping keys beyond shape and precision that vary, with this group's values


def capacity_groups(cols: dict[str, np.ndarray], keys=CAPACITY_GROUP_KEYS) -> list[CapacityGroup]:
    """The capacity groups of the cells in `cols` (or the groups over other `keys`), in table order."""
    n = len(cols.get("cell_id", []))
    group_keys = [k for k in keys if k in cols]
    keys = [tuple(_plain(cols[k][i]) for k in group_keys) for i in range(n)]
    varying = [k for j, k in enumerate(group_keys)
               if not k.startswith("model.") and k != "precision.name" and len({key[j] for key in keys}) > 1]
    groups = []
    for key in dict.fromkeys(keys):
        key_dict = dict(zip(group_keys, key))
        rows = np.array([k == key for k in keys], dtype=bool)
        groups.append(CapacityGroup(key_dict, _group_label(key_dict, varying), rows,
                                    {k: key_dict[k] for k in varying}))
    return groups


PLATEAU_TOL = 0.05  # relative change of seed-mean mem_bits between the two largest sizes


def plateau_reached(sizes, mem_bits, entropy_bits, capacity_bits: float) -> bool:
    """Whether the sweep saw memorization stop growing: at least two dataset sizes hold more
    information than the capacity, and the seed means of the two largest differ by under 5%.
    Otherwise the capacity may grow with more data (beside the not-converged lower bound)."""
    levels = np.unique(sizes)
    means = np.array([mem_bits[sizes == n].mean() for n in levels])
    entropy = np.array([entropy_bits[sizes == n][0] for n in levels])
    beyond = means[entropy > capacity_bits]
    return bool(beyond.size >= 2 and abs(beyond[-1] - beyond[-2]) <= PLATEAU_TOL * abs(beyond[-2]))


def fit_capacities(cols: dict[str, np.ndarray]) -> list[dict]:
    """Capacity per (model shape, precision, data shape, recipe) group of finished cells."""
    results = []
    for group in capacity_groups(cols):
        key_dict, rows = group.key, group.rows
        sizes = cols["data.num_sequences"][rows].astype(np.int64)
        mem = cols["mem_bits"][rows]
        converged = np.nan_to_num(cols["converged"][rows], nan=0.0) > 0.5
        estimate = capacity(sizes, mem, converged)
        at_max = sizes == estimate.num_sequences_at_max
        params = float(cols["params"][rows][0])
        results.append({
            "label": group.label,
            "model": key_dict.get("model.name"),
            "precision": key_dict.get("precision.name"),
            "n_layer": key_dict.get("model.n_layer"),
            "n_embd": key_dict.get("model.n_embd"),
            "vocab_size": key_dict.get("data.vocab_size"),
            "seq_len": key_dict.get("data.seq_len"),
            "group": group.varying,
            "params": params,
            "params_paper": float(cols["params_paper"][rows][0]),
            "capacity_bits": estimate.capacity_bits,
            "seed_std_bits": estimate.seed_std_bits,
            "num_sequences_at_max": estimate.num_sequences_at_max,
            "entropy_bits_at_max": float(cols["entropy_bits"][rows][at_max][0]),
            "lower_bound": estimate.lower_bound,
            "plateau_reached": plateau_reached(sizes, mem, cols["entropy_bits"][rows], estimate.capacity_bits),
            "bits_per_param": estimate.capacity_bits / params,
            "seed_capacities_bits": [float(v) for v in mem[at_max]],
            "num_cells": int(rows.sum()),
            "num_dataset_sizes": int(np.unique(sizes).size),
        })
    return results


def fit_alphas(capacities: list[dict], n_boot: int = N_BOOT) -> dict[str, dict]:
    """Alpha (bits per parameter) per precision, fitted through the origin over its capacities."""
    alphas = {}
    precisions = sorted({c["precision"] for c in capacities},
                        key=lambda p: (PRECISION_ORDER.index(p) if p in PRECISION_ORDER else 99, p))
    for precision in precisions:
        models = [c for c in capacities if c["precision"] == precision]
        fit = fit_alpha([c["params"] for c in models], [c["seed_capacities_bits"] for c in models],
                        n_boot=n_boot, seed=0)
        multi_seed = any(len(c["seed_capacities_bits"]) > 1 for c in models)
        alphas[precision] = {
            "alpha": fit.alpha, "ci_low": fit.ci_low, "ci_high": fit.ci_high, "ci": 0.95,
            "n_models": fit.n_models,
            "bootstrap": "seeds" if multi_seed else ("models" if len(models) > 1 else "none"),
            "lower_bound": any(c["lower_bound"] for c in models),
            "plateaus_reached": all(c["plateau_reached"] for c in models),
            "paper_alpha": PAPER_ALPHA_BITS_PER_PARAM.get(precision),
        }
        if alphas[precision]["bootstrap"] == "none":
            alphas[precision]["note"] = "one model with one seed: the interval is the point"
    return alphas


def alpha_for(precision: str, alphas: dict) -> tuple[float, str]:
    """The alpha used to predict a cell: the sweep's own fit for its precision, else the paper's."""
    if precision in alphas:
        return alphas[precision]["alpha"], "fitted"
    return PAPER_ALPHA_BITS_PER_PARAM.get(precision, 3.6), "paper"


def mia_attacks(names) -> list[str]:
    return sorted({n[: -len("_f1")] for n in names if n.endswith("_f1") and n != "_f1"})


def published_constants() -> dict:
    return {
        "as_printed": {
            "formula": "F1 = 1/2 * (1 + c1 * sigmoid(c2 * (Capacity/|D| + c3)))",
            "c1": 1.34, "c2": -0.034, "c3": -33.14,
            "note": "tends to about 1.0, not 0.5, as |D| grows (reference/README.md)",
        },
        "corrected": {
            "formula": "F1 = 1/2 * (1 + c1 * sigmoid(c2 * x + c3)), x = |D|/P",
            "c1": 1.34, "c2": -33.14, "c3": 33.14 * 0.0337,
            "note": "reproduces the paper's Table 2 (reference/mia_validation.csv)",
        },
    }


def fit_mia(cols: dict[str, np.ndarray], alphas: dict, why_none: str | None = None) -> dict[str, dict]:
    """The MIA law per attack (every `<attack>_f1` column) against x = N / params, beside both
    published forms evaluated on the same cells. `why_none`: the reason to give for an attack that
    no cell in `cols` measured (the law is fitted on synthetic cells only)."""
    results = {}
    for attack in mia_attacks(cols):
        f1 = cols[f"{attack}_f1"]
        x = cols["sequences_per_param"]
        ok = np.isfinite(f1) & np.isfinite(x)
        x, f1 = x[ok], f1[ok]
        entry = {"attack": attack, "num_cells": int(ok.sum()), "x": "sequences_per_param (N / params)"}
        alpha = np.array([alpha_for(p, alphas)[0] for p in cols["precision.name"][ok]])
        params, sizes = cols["params"][ok], cols["data.num_sequences"][ok]
        if ok.any():
            entry["x_min"], entry["x_max"] = float(x.min()), float(x.max())
            corrected = published_mia_law_corrected(sizes, params)
            printed = published_mia_law_as_printed(alpha * params, sizes)
            entry["published"] = {
                "corrected": {"rmse": float(np.sqrt(np.mean((f1 - corrected) ** 2)))},
                "as_printed": {"rmse": float(np.sqrt(np.mean((f1 - printed) ** 2))),
                               "capacity": "alpha * params with the sweep's alpha of each cell's precision"},
            }
        distinct = int(np.unique(x).size)
        if not ok.any() and why_none:
            entry["skipped"] = why_none.format(metric=f"{attack}_f1")
        elif ok.sum() < MIN_MIA_CELLS or distinct < MIN_MIA_CELLS:
            entry["skipped"] = (f"the law's 3 constants need at least {MIN_MIA_CELLS} cells at "
                                f"{MIN_MIA_CELLS} distinct sequences-per-parameter values; "
                                f"have {int(ok.sum())} cells at {distinct}")
        else:
            try:
                fit = fit_mia_law(x, f1)
            except (RuntimeError, ValueError) as err:  # curve_fit did not converge
                entry["skipped"] = f"the fit failed: {err}"
            else:
                entry.update({
                    "c1": fit.c1, "c2": fit.c2, "c3": fit.c3,
                    "c1_std": fit.c1_std, "c2_std": fit.c2_std, "c3_std": fit.c3_std,
                    "rmse": fit.rmse, "c1_at_bound": bool(fit.c1 >= 10.0 - 1e-9),
                })
        results[attack] = entry
    return results


def predict_cells(cols: dict[str, np.ndarray], alphas: dict) -> dict:
    """Measured against predicted min(alpha * params, H(X)) per finished cell, alpha its precision's."""
    records = []
    for i, cell_id in enumerate(cols.get("cell_id", [])):
        alpha, source = alpha_for(cols["precision.name"][i], alphas)
        predicted = float(predicted_mem_bits(alpha, cols["params"][i], cols["entropy_bits"][i]))
        records.append({
            "cell_id": cell_id, "precision": cols["precision.name"][i], "alpha": alpha, "alpha_source": source,
            "params": float(cols["params"][i]), "entropy_bits": float(cols["entropy_bits"][i]),
            "capacity_ratio": float(cols["entropy_bits"][i] / (alpha * cols["params"][i])),
            "mem_bits": float(cols["mem_bits"][i]), "predicted_mem_bits": predicted,
            "error": float(mem_prediction_error(cols["mem_bits"][i], predicted)),
        })
    errors = np.array([r["error"] for r in records])
    summary = {"num_cells": len(records)}
    if records:
        summary.update({"mean_abs_error": float(np.mean(np.abs(errors))),
                        "median_abs_error": float(np.median(np.abs(errors))),
                        "max_abs_error": float(np.max(np.abs(errors)))})
    return {"summary": summary, "cells": records,
            "error": "(measured - predicted) / predicted, a signed fraction"}


# The text section: seed means (and seed spreads) of these final metrics of text cells, per group and
# pool size N. A metric the table lacks (an extraction prefix >= seq_len, never logged) is left out.
TEXT_SUMMARY_METRICS = (
    "mem_bits_per_sequence", "loss_f1", "reference_f1",
    *(f"extract_{split}_p{prefix}" for split in ("train", "test") for prefix in (8, 16, 32)),
    "test_nll_bits_per_token", "capacity_ratio",
)


def seed_stats(sizes: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(levels, means, stds, counts) of `values` over the cells of each distinct size, ignoring NaN:
    the mean and sample std (ddof=1; 0 for one value) of the seeds at each size, NaN where none
    has a value. Levels ascend."""
    levels = np.unique(sizes)
    means, stds, counts = [], [], []
    for level in levels:
        seeds = values[(sizes == level) & np.isfinite(values)]
        counts.append(seeds.size)
        means.append(seeds.mean() if seeds.size else np.nan)
        stds.append(seeds.std(ddof=1) if seeds.size > 1 else (0.0 if seeds.size else np.nan))
    return levels, np.array(means), np.array(stds), np.array(counts, dtype=np.int64)


def summarise_text(cols: dict[str, np.ndarray]) -> dict:
    """The FINISHED text cells in `cols`, per (model shape, precision) group (also split by any
    other configuration that varies: corpus, tokenizer, reference model, recipe): for each pool size
    N ascending, the number of seeds and the seed mean and seed std of TEXT_SUMMARY_METRICS."""
    metrics = [m for m in TEXT_SUMMARY_METRICS if m in cols]
    groups = []
    for group in capacity_groups(cols, TEXT_GROUP_KEYS):
        rows = group.rows
        sizes = cols["data.num_sequences"][rows].astype(np.int64)
        entry = {
            "label": group.label, "model": group.key.get("model.name"),
            "precision": group.key.get("precision.name"), "group": group.varying,
            "vocab_size": group.key.get("data.vocab_size"), "seq_len": group.key.get("data.seq_len"),
            "params": float(cols["params"][rows][0]), "num_cells": int(rows.sum()),
            "num_sequences": [int(n) for n in np.unique(sizes)], "num_seeds": [], "mean": {}, "std": {},
        }
        for metric in metrics:
            _, means, stds, counts = seed_stats(sizes, cols[metric][rows])
            entry["mean"][metric], entry["std"][metric] = list(means), list(stds)
        entry["num_seeds"] = [int(c) for c in seed_stats(sizes, cols["mem_bits"][rows])[3]]
        groups.append(entry)
    return {
        "num_cells": int(len(cols["cell_id"])),
        "metrics": metrics,
        "statistics": "per group and pool size N (num_sequences, ascending): the mean over seeds (mean) and "
                      "the sample std over seeds (std, 0 for one seed) of each metric; null where no seed has it",
        "groups": groups,
    }


def fit_sweep(table: pa.Table, n_boot: int = N_BOOT) -> dict:
    """Every sweep-level fit of SCIENCE.md from a cells table; degenerate sweeps give partial results
    with the reason for what was skipped, never an exception. Capacity, alpha, the MIA law and the
    predictions use synthetic cells only; `skipped` gives the reason for each that could not be
    fitted, and `text` summarises the text cells."""
    statuses = table.column("status").to_pylist() if table.num_rows else []
    finished = _finished(table)
    kinds = data_kinds(finished)
    cols, text = select_rows(finished, kinds == SYNTHETIC), select_rows(finished, kinds == TEXT)
    num_text = len(text["cell_id"])
    notes, skipped, why_none = [], {}, None
    capacities = fit_capacities(cols)
    if not capacities:
        if num_text:
            reason = (f"no FINISHED synthetic cells (the sweep has {num_text} FINISHED text cells): capacity, "
                      "alpha, the MIA law and predictions are fitted on synthetic cells only (SCIENCE.md); "
                      "the text cells are summarised under `text`")
            notes.append(reason)
        else:
            reason = "no FINISHED cells with mem_bits"
            notes.append(f"{reason}: no capacity, alpha or prediction")
        skipped = {"capacity": reason, "alpha": reason, "prediction": reason}
    elif num_text:
        notes.append(f"{num_text} FINISHED text cells are left out of capacity, alpha, the MIA law and predictions "
                     "(synthetic cells only) and summarised under `text`")
    if num_text:
        why_none = "no FINISHED synthetic cell has {metric}: the law is fitted on synthetic cells only"
    others = sorted(set(kinds) - {SYNTHETIC, TEXT})
    if others:
        notes.append(f"{int(np.isin(kinds, others).sum())} FINISHED cells of data.kind {', '.join(others)} "
                     "are in no fit")
    alphas = fit_alphas(capacities, n_boot=n_boot)
    prediction = predict_cells(cols, alphas)
    if "prediction" in skipped:
        prediction["skipped"] = skipped["prediction"]
    return _clean({
        "cells": {"total": len(statuses), "finished": int(len(finished["cell_id"])),
                  "by_status": {s: statuses.count(s) for s in sorted(set(statuses))}},
        "capacity": capacities,
        "alpha": alphas,
        "mia": fit_mia(cols, alphas, why_none),
        "mia_published": published_constants(),
        "prediction": prediction,
        "skipped": skipped,
        "text": summarise_text(text),
        "notes": notes,
    })


def fit_metrics(fits: dict) -> dict[str, float]:
    """The fits as flat MLflow metrics for the launch run (finite values only)."""
    metrics = {"cells_total": fits["cells"]["total"], "cells_finished": fits["cells"]["finished"]}
    for precision, fit in fits["alpha"].items():
        for name in ("alpha", "ci_low", "ci_high"):
            metrics[f"alpha_{precision}" + ("" if name == "alpha" else f"_{name}")] = fit[name]
    for attack, fit in fits["mia"].items():
        for name in ("c1", "c2", "c3", "c1_std", "c2_std", "c3_std", "rmse"):
            metrics[f"mia_{attack}_{name}"] = fit.get(name)
    for c in fits["capacity"]:
        metrics["capacity_bits/" + re.sub(r"[^A-Za-z0-9_.\- ]", "_", c["label"]).replace(" ", "/")] = c["capacity_bits"]
    summary = fits["prediction"]["summary"]
    metrics["mem_prediction_mean_abs_error"] = summary.get("mean_abs_error")
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}


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


def planned_cells(launch_overrides: list[str], overrides) -> list[PlannedCell]:
    """The grid of the sweep's latest launch, as `recorded_plan` rebuilds it (its recorded overrides,
    then the command line's), without re-reading the tracker: composing costs about 12 ms a cell,
    so a 10,000-cell grid takes a couple of minutes (`--no-plan` skips it)."""
    from models.spec import flatten, to_dict

    cells = load_sweep(list(launch_overrides) + list(overrides)).cells
    return [PlannedCell(c.cell_id, {k: str(v)[:6000] for k, v in flatten(c.config or to_dict(c.spec)).items()})
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
    """Read every cell run of `sweep` from its tracking store, write cells.parquet, curves.parquet and
    fits.json under `out` (default `<root_dir>/aggregate/<sweep>/`), and log the fits to the sweep's
    latest launch run. `plan=False` skips rebuilding the grid (no PENDING rows; Hydra composes every
    cell of the grid otherwise)."""
    from orchestrator.launch import TAG_OVERRIDES
    from orchestrator.tracking import code_version, latest_launch_run, log_to_run, read_metric_histories, read_runs

    timings = {}
    started = time.perf_counter()
    uri, root_dir, tracker = sweep_settings(sweep, overrides)
    if tracker.experiment_id(sweep, create=False) is None:
        raise ConfigError(f"sweep {sweep!r} has no runs in {uri}: launch it first (memsweep launch sweep={sweep})")
    out_dir = Path(out) if out is not None else root_dir / "aggregate" / sweep
    launch = latest_launch_run(tracker, sweep)
    runs = read_runs(tracker, sweep, kind="cell")
    timings["read_runs_s"] = time.perf_counter() - started

    notes, planned = [], None
    if plan and launch is not None:
        t0 = time.perf_counter()
        try:
            planned = planned_cells(json.loads(launch.tags[TAG_OVERRIDES]), overrides)
        except (ConfigError, KeyError, ValueError) as err:
            notes.append(f"the latest launch's grid could not be rebuilt, so PENDING cells are not listed: {err}")
        timings["plan_s"] = time.perf_counter() - t0
    elif launch is None:
        notes.append("the sweep has no launch run: PENDING cells are not listed")
    else:
        notes.append("grid not rebuilt (--no-plan): PENDING cells are not listed")

    metadata = {
        "sweep": sweep, "tracking_uri": uri, "aggregated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "aggregator_code_version": code_version(), "num_runs_read": len(runs),
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
        chosen = current_runs(runs)
        run_to_cell = {run.run_id: cell_id for cell_id, run in chosen.items()}
        points = read_metric_histories(tracker, list(run_to_cell), CURVE_KEYS)
        curves_table = build_curves_table(points, run_to_cell, cells.column("cell_id").to_pylist())
        timings["curves_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fits = fit_sweep(cells, n_boot=n_boot)
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
    fits = fit_sweep(cells, n_boot=n_boot)
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

