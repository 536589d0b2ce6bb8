"""A sweep's plan as data: recorded when it is launched, read back by status, resume and aggregate.

`launch` records every cell it planned on its launch run, before any cell runs: a Parquet artifact
(`plan.parquet`, a row per cell: its id, its typed spec, the overrides and resolved config it was
composed from, its reference options and the params recorded for it) and the table's content hash as
a tag. Nothing is ever rewritten: a relaunch that grows the sweep records its own cells on its own
launch run, and the sweep's plan is the union of every launch's cells.

Reading the plan back never re-composes `conf/`: a default changed in `conf/`, or a new version of
memsweep, cannot move a recorded cell to another id or make it look pending. Where and how cells run
(tracking, storage, device, cluster, packing) still follows the command at hand.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

from models.spec import Cell, ReferenceOptions, RunOptions, SpecError, spec_from_dict, to_dict
from orchestrator.tracking import TAG_CODE, Tracker, read_runs, tag

PLAN_ARTIFACT = "plan.parquet"
TAG_PLAN = "memsweep.plan_sha256"  # on a launch run whose plan.parquet was recorded whole
COLUMNS = ("cell_id", "spec", "overrides", "config", "reference_options", "params")


def plan_table(cells: list[Cell]) -> pa.Table:
    """One row per cell, every value a JSON string (a spec's nesting and a config's free shape)."""
    rows = {
        "cell_id": [c.cell_id for c in cells],
        "spec": [_json(to_dict(c.spec)) for c in cells],
        "overrides": [_json(list(c.overrides)) for c in cells],
        "config": [_json(c.config) for c in cells],
        "reference_options": [None if c.reference_options is None else _json(vars(c.reference_options))
                              for c in cells],
        "params": [_json({k: str(v)[:6000] for k, v in c.recorded_params().items()}) for c in cells],
    }
    return pa.table({name: pa.array(rows[name], pa.string()) for name in COLUMNS})


def _json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def content_hash(table: pa.Table) -> str:
    digest = hashlib.sha256()
    for name in COLUMNS:
        for value in table.column(name).to_pylist():
            digest.update((value or "").encode() + b"\x1f")
    return digest.hexdigest()


def record_plan(tracker: Tracker, launch_run_id: str, cells: list[Cell]) -> None:
    """Record `cells` on the launch run; the hash tag comes last, so a tagged run has the whole table."""
    table = plan_table(cells)
    tracker.log_table(launch_run_id, table, PLAN_ARTIFACT)
    tracker.set_tags(launch_run_id, {TAG_PLAN: content_hash(table)})


class RecordedPlan:
    """The union of a sweep's recorded launch plans, rows by cell id: the latest launch's cells in its
    order, then the cells only earlier launches planned (newest launch first)."""

    def __init__(self, rows: dict[str, dict], code_versions: set[str]):
        self.rows = rows
        self.code_versions = code_versions  # of the launches that recorded it

    def params(self) -> dict[str, dict]:
        """Each cell's recorded params, for aggregate's PENDING rows."""
        return {cell_id: json.loads(row["params"]) for cell_id, row in self.rows.items()}

    def cells(self, options: RunOptions) -> list[Cell]:
        """The recorded cells with today's `options` (where and how they run); a recorded spec this
        code cannot build is a SpecError naming the cell."""
        cells = []
        for cell_id, row in self.rows.items():
            try:
                spec = spec_from_dict(json.loads(row["spec"]))
            except SpecError as err:
                raise SpecError(f"recorded cell {cell_id}: {err}") from None
            reference = json.loads(row["reference_options"]) if row["reference_options"] else None
            cells.append(Cell(spec=spec, options=options, overrides=tuple(json.loads(row["overrides"])),
                              config=json.loads(row["config"]), recorded_id=cell_id,
                              reference_options=ReferenceOptions(**reference) if reference else None))
        return cells


def read_plan(tracker: Tracker, sweep: str) -> RecordedPlan | None:
    """The sweep's recorded plan, or None when no launch recorded one (launched before plans were
    recorded: the caller falls back to rebuilding the grid from the recorded overrides)."""
    launches = [run for run in read_runs(tracker, sweep, kind="launch") if TAG_PLAN in run.tags]
    if not launches:
        return None
    rows: dict[str, dict] = {}
    for run in reversed(launches):  # newest first: its grid in its order, then what only older ones planned
        for row in tracker.load_table(run.run_id, PLAN_ARTIFACT).to_pylist():
            rows.setdefault(row["cell_id"], row)
    return RecordedPlan(rows, {tag(run.tags, TAG_CODE, "") for run in launches})
