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

from models.spec import (Cell, ReferenceOptions, RunOptions, SpecError, field_names, flatten, plain_dict,
                         spec_from_dict)
from orchestrator.tracking import TAG_CODE, Tracker, read_runs, tag

PLAN_ARTIFACT = "plan.parquet"
TAG_PLAN = "memsweep.plan_sha256"  # on a launch run whose plan.parquet was recorded whole
TAG_GRID = "memsweep.grid_sha256"  # ... and what it was composed from (orchestrator.compose.grid_fingerprint)
COLUMNS = ("cell_id", "spec", "overrides", "config", "reference_options", "params")


SCHEMA = pa.schema([(name, pa.string()) for name in COLUMNS])
BATCH_ROWS = 10_000  # rows encoded at a time: a 100,000-cell plan never holds all its strings twice


def plan_table(cells: list[Cell]) -> pa.Table:
    """One row per cell, every value a JSON string (a spec's nesting and a config's free shape)."""
    encode = _SharedJson()
    batches = [_plan_batch(cells[start:start + BATCH_ROWS], encode) for start in range(0, len(cells), BATCH_ROWS)]
    return pa.Table.from_batches(batches, schema=SCHEMA)


def _plan_batch(cells: list[Cell], encode: _SharedJson) -> pa.RecordBatch:
    rows = {
        "cell_id": [c.cell_id for c in cells],
        "spec": [encode.spec(c.spec) for c in cells],
        "overrides": [_json(list(c.overrides)) for c in cells],
        "config": [encode.mapping(c.config) for c in cells],
        "reference_options": [None if c.reference_options is None else encode.value(c.reference_options)
                              for c in cells],
        "params": [encode.params(c) for c in cells],
    }
    return pa.RecordBatch.from_arrays([pa.array(rows[name], pa.string()) for name in COLUMNS], schema=SCHEMA)


def _json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


class _SharedJson:
    """`_json` of many cells' columns, byte for byte, with what cells share encoded once: a planned
    grid's cells share their spec sections and config sections (GridComposer builds each distinct one
    once and copies only the dicts on an override's path), so 100,000 rows hold a few hundred distinct
    sections, and a few thousand distinct scalars."""

    def __init__(self):
        self.shared: dict[int, tuple[object, str]] = {}  # id -> (the object, kept alive; its JSON)
        self.scalars: dict[tuple, str] = {}  # (key, type, value) -> '"key":value'
        self.keys: dict[str, str] = {}  # key -> its JSON
        self.param_sections: dict[int, tuple[object, str]] = {}  # id(spec section) -> (it, its params' JSON items)

    def value(self, value) -> str:
        """A section (a dict or a spec's dataclass) by identity; anything else as it is."""
        if not isinstance(value, dict) and not field_names(type(value)):
            return _json(value)
        found = self.shared.get(id(value))
        if found is None:
            found = self.shared[id(value)] = (value, _json(plain_dict(value)))
        return found[1]

    def item(self, key: str, value) -> str:
        """'"key":value' of a top-level entry."""
        if isinstance(value, (str, int, float, bool, type(None))):
            scalar = (key, type(value), repr(value) if isinstance(value, float) else value)  # -0.0 is not 0.0
            if scalar not in self.scalars:
                self.scalars[scalar] = f"{_json(key)}:{_json(value)}"
            return self.scalars[scalar]
        if key not in self.keys:
            self.keys[key] = _json(key)
        return f"{self.keys[key]}:{self.value(value)}"

    def mapping(self, mapping: dict) -> str:
        """`_json(mapping)` for a dict of str keys."""
        return "{" + ",".join(self.item(key, mapping[key]) for key in sorted(mapping)) + "}"

    def spec(self, spec) -> str:
        """`_json(to_dict(spec))`."""
        top = {name: getattr(spec, name) for name in field_names(type(spec))}
        if spec.reference is None and not spec.is_text:
            top.pop("reference")
        return self.mapping(top)

    def params(self, cell: Cell) -> str:
        """`_json` of the cell's recorded params (every value as `str(v)[:6000]`). A text cell's data
        params depend on its reference: those are encoded whole."""
        spec = cell.spec
        if spec.is_text:
            return _json({k: str(v)[:6000] for k, v in cell.recorded_params().items()})
        # flatten() keys sorted: the sections' prefixes sort as data < model < precision < seed < train.
        parts = [self._param_section("data", spec.data), self._param_section("model", spec.model),
                 self.item("precision.name", str(spec.precision)[:6000]), self.item("seed", str(spec.seed)[:6000]),
                 self._param_section("train", spec.train)]
        return "{" + ",".join(p for p in parts if p) + "}"

    def _param_section(self, name: str, section) -> str:
        found = self.param_sections.get(id(section))
        if found is None:
            flat = {f"{name}.{k}": str(v)[:6000] for k, v in flatten(plain_dict(section)).items()}
            found = self.param_sections[id(section)] = (section, _json(flat)[1:-1])
        return found[1]


def content_hash(table: pa.Table) -> str:
    digest = hashlib.sha256()
    for name in COLUMNS:
        for value in table.column(name).to_pylist():
            digest.update((value or "").encode() + b"\x1f")
    return digest.hexdigest()


def record_plan(tracker: Tracker, launch_run_id: str, cells: list[Cell], fingerprint: str | None = None,
                artifact: str = PLAN_ARTIFACT) -> None:
    """Record `cells` on the launch run; the hash tag comes last, so a tagged run has the whole table
    (with `fingerprint`, what the cells were composed from: TAG_GRID). Another `artifact`
    (`plan-round-002.parquet`: an adaptive sweep's round) adds cells to the launch's plan under a tag of
    its own; nothing recorded before is rewritten."""
    table = plan_table(cells)
    tracker.log_table(launch_run_id, table, artifact)
    tracker.set_tags(launch_run_id, {_hash_tag(artifact): content_hash(table),
                                     **({TAG_GRID: fingerprint} if fingerprint else {})})


def _hash_tag(artifact: str) -> str:
    return TAG_PLAN if artifact == PLAN_ARTIFACT else f"{TAG_PLAN}.{artifact}"


def plan_artifacts(tags: dict) -> list[str]:
    """The plan tables a launch run recorded whole: its plan.parquet, then the added ones by name (a
    resumed launch records no plan.parquet of its own, but an adaptive sweep may add rounds to it)."""
    added = sorted(key[len(TAG_PLAN) + 1:] for key in tags if key.startswith(f"{TAG_PLAN}."))
    return [PLAN_ARTIFACT] * (TAG_PLAN in tags) + added


class RecordedPlan:
    """The union of a sweep's recorded launch plans, rows by cell id: the latest launch's cells in its
    order, then the cells only earlier launches planned (newest launch first)."""

    def __init__(self, rows: dict[str, dict], code_versions: set[str], fingerprints: frozenset[str] = frozenset()):
        self.rows = rows
        self.code_versions = code_versions  # of the launches that recorded it
        self.fingerprints = fingerprints  # of what those launches composed their cells from (TAG_GRID)

    def params(self) -> dict[str, dict]:
        """Each cell's recorded params, for aggregate's PENDING rows."""
        return {cell_id: json.loads(row["params"]) for cell_id, row in self.rows.items()}

    def cells(self, options: RunOptions) -> list[Cell]:
        """The recorded cells with today's `options` (where and how they run); a recorded spec this
        code cannot build is a SpecError naming the cell. What the cells share (spec sections, config
        sections, reference options) is built once and shared, as it was when they were planned."""
        specs, sections, references = {}, {}, {}
        cells = []
        for cell_id, row in self.rows.items():
            try:
                spec = spec_from_dict(json.loads(row["spec"]), specs)
            except SpecError as err:
                raise SpecError(f"recorded cell {cell_id}: {err}") from None
            reference = row["reference_options"]
            if reference and reference not in references:
                references[reference] = ReferenceOptions(**json.loads(reference))
            cells.append(Cell(spec=spec, options=options, overrides=tuple(json.loads(row["overrides"])),
                              config=_shared_sections(json.loads(row["config"]), sections),
                              recorded_id=cell_id, reference_options=references.get(reference)))
        return cells


def _shared_sections(config: dict, seen: dict) -> dict:
    """`config` with each section (a top-level dict) replaced by an equal one `seen` before: a sweep's
    configs differ in a few values, so 100,000 parsed configs hold a few hundred distinct sections."""
    for key, value in config.items():
        if isinstance(value, dict):
            try:  # a flat section (most are): its items, with their types (1, 1.0 and true differ)
                config[key] = seen.setdefault((key, tuple(value.items()), tuple(map(type, value.values()))), value)
            except TypeError:  # a nested one (the sweep's grid) as canonical JSON
                config[key] = seen.setdefault((key, _json(value)), value)
    return config


def read_plan(tracker: Tracker, sweep: str) -> RecordedPlan | None:
    """The sweep's recorded plan, or None when no launch recorded one (launched before plans were
    recorded: the caller falls back to rebuilding the grid from the recorded overrides)."""
    launches = [run for run in read_runs(tracker, sweep, kind="launch") if plan_artifacts(run.tags)]
    if not launches:
        return None
    rows: dict[str, dict] = {}
    for run in reversed(launches):  # newest first: its grid in its order, then what only older ones planned
        for artifact in plan_artifacts(run.tags):
            for row in tracker.load_table(run.run_id, artifact).to_pylist():
                rows.setdefault(row["cell_id"], row)
    return RecordedPlan(rows, {tag(run.tags, TAG_CODE, "") for run in launches},
                        frozenset(run.tags[TAG_GRID] for run in launches if TAG_GRID in run.tags))
