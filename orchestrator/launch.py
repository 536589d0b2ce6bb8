"""A sweep's life: plan, launch, status, resume.

    memsweep launch sweep=smoke [OVERRIDES] [--dry-run] [--force]
    memsweep status smoke
    memsweep resume smoke [--failed]

`launch` validates the whole grid, asks the tracker which cells already FINISHED (skipped unless
`--force`), opens a parent run for this launch that records the launch's overrides and its plan (every
cell, typed: orchestrator/plan.py) before any cell runs, and runs the rest on Ray. `status` and
`resume` read the recorded plans of the sweep's launches, so they see exactly the cells those launches
planned, including those that never started, whatever `conf/` or the code says today.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from models.spec import Cell, SpecError
from orchestrator.compose import (ConfigError, grid_fingerprint, load_sweep, sweep_config, sweep_runtime,
                                  typed_options)
from orchestrator.corpus import REFERENCE_EXPERIMENT, reference_cells
from orchestrator.plan import RecordedPlan, read_plan, record_plan
from orchestrator.resources import GiB, ClusterOptions, PackOptions, check_fits_memory, machine_memory_bytes
from orchestrator.tracking import TAG_OVERRIDES, CellRecord, Tracker, code_version, latest_launch_run, redact


@dataclass
class Plan:
    name: str
    cells: list[Cell]
    records: dict[str, CellRecord]  # the tracker's current run of each cell that has one
    cluster: ClusterOptions
    tracker: Tracker | None  # None: a read-only plan (make_plan) whose store does not exist yet
    overrides: list[str]
    pack: PackOptions = PackOptions()
    recorded: RecordedPlan | None = None  # read back from the launches (status, resume); None: composed now
    fingerprint: str | None = None  # of what a plan composed now was composed from (compose.grid_fingerprint)

    def state(self, cell: Cell) -> str:
        record = self.records.get(cell.cell_id)
        return record.status if record else "PENDING"


def make_plan(overrides: list[str], *, read_only: bool = False) -> Plan:
    """Expand and validate every cell, then read the tracker. Nothing is written but the store; with
    `read_only` (the dry run) not even that: a store that does not exist yet is not created, and the
    plan has no tracker and no records."""
    fingerprint = grid_fingerprint(overrides)  # before composing: a file changed meanwhile gives another
    sweep = load_sweep(overrides)
    first = sweep.cells[0]
    for cell in sweep.cells:
        if (cell.options.tracking_uri, cell.options.experiment) != (first.options.tracking_uri, first.options.experiment):
            raise ConfigError(f"cell [{' '.join(cell.overrides)}]: tracking must be the same for every cell of a sweep")
    cluster, pack = cluster_options(first.config), pack_options(first.config)  # checked before any write
    if cluster.kind == "local":  # an embedded Ray on this machine: every cell must fit it
        check_fits_this_machine(sweep.cells, cluster)
    tracker, records = None, {}
    if not read_only or store_exists(first.options.tracking_uri):
        tracker = Tracker(first.options.tracking_uri, first.options.artifact_root)
        if not read_only:
            tracker.ensure_store()
        records = tracker.cell_records(first.options.experiment)
    text = any(cell.spec.is_text for cell in sweep.cells)  # composing them reads a corpus too
    return Plan(sweep.name, sweep.cells, records, cluster, tracker, list(overrides), pack,
                fingerprint=None if text else fingerprint)


def store_exists(uri: str) -> bool:
    """Whether the tracking store at `uri` is there to be read without creating it: a local SQLite
    file or a local folder (a file store) must exist; a server (http, postgresql, ...) is asked."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).exists()
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path or uri).exists()
    return True


def check_fits_this_machine(cells: list[Cell], cluster: ClusterOptions) -> None:
    """A cell of an embedded cluster's sweep whose memory estimate exceeds this machine (or, on GPUs,
    one GPU) is refused before anything is written. (A remote cluster's nodes are checked when the
    driver joins it.)"""
    on_gpu = cluster.declares_gpus
    have, where = ((cluster.gpu_memory_gb * GiB, "one GPU (cluster.gpu_memory_gb)") if on_gpu
                   else (machine_memory_bytes(), "this machine"))
    for cell in cells:
        try:
            check_fits_memory(cell.spec, cell.options.eval_batch_size, on_gpu, have, where)
        except SpecError as err:
            raise ConfigError(f"cell [{' '.join(cell.overrides)}]: {err}" if cell.overrides else str(err)) from None


def cluster_options(config: dict) -> ClusterOptions:
    return _options(ClusterOptions, config["cluster"], "cluster")


def pack_options(config: dict) -> PackOptions:
    """The `pack` section (a runtime option: never part of a cell id); absent: the defaults."""
    return _options(PackOptions, config.get("pack") or {}, "pack")


def _options(cls, node, section: str):
    """A runtime section, with a bad value reported as a configuration error naming the field."""
    try:
        return typed_options(cls, node, section)
    except SpecError as err:
        raise ConfigError(str(err)) from None


def pending_references(plan: Plan, cells: list[Cell]) -> list[Cell]:
    """The reference cells that `cells` need and that have not FINISHED in the store (any sweep of
    the store may have trained one: references live in their own experiment)."""
    needed = reference_cells(cells)
    if not needed or plan.tracker is None:  # no store yet: none has finished
        return needed
    finished = plan.tracker.finished_cells(REFERENCE_EXPERIMENT)
    return [r for r in needed if r.cell_id not in finished]


def run_plan(plan: Plan, cells: list[Cell], *, force: bool = False, display=None, runner: str | None = None) -> list:
    """Run `cells` of `plan`, and the reference cells they need that have not finished, on Ray under a
    new parent run; returns their outcomes (references included). The cluster makes room for the cells
    first (an autoscaler brings up the first wave): a request no node can ever hold is refused before
    any run exists. `runner`: what runs a cell in its task (orchestrator.scheduler.cell_runner)."""
    from orchestrator.console import SweepProgress, console
    from orchestrator.scheduler import prepare, ray_cluster, run_cells

    to_run = pending_references(plan, cells) + list(cells)
    with ray_cluster(plan.cluster):
        tasks = prepare(to_run, plan.cluster, plan.pack, say=lambda line: console.print(line, highlight=False))
        parent = _start_launch(plan, cells, force)
        outcomes, status = [], "FAILED"
        try:
            with (display or SweepProgress(len(to_run))) as shown:
                outcomes = run_cells(to_run, cluster=plan.cluster, tracker=plan.tracker,
                                     parent_run_id=parent, display=shown, pack=plan.pack, tasks=tasks,
                                     runner=runner)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            done = sum(o.status == "FINISHED" for o in outcomes)
            plan.tracker.log_metrics(parent, [("cells_finished", done, 0),
                                              ("cells_failed", len(outcomes) - done, 0)])
            plan.tracker.finish(parent, status)
    return outcomes


def _start_launch(plan: Plan, cells: list[Cell], force: bool) -> str:
    """The launch's parent run, with the plan recorded on it before any cell runs (a driver killed
    from here on leaves a plan `resume` reads); cells rerun with --force are superseded."""
    experiment = cells[0].options.experiment if cells else plan.name
    parent = plan.tracker.start_launch(experiment, plan.name, {"overrides": " ".join(plan.overrides),
                                                                "num_cells": len(plan.cells),
                                                                "num_submitted": len(cells)},
                                       description=sweep_description(plan))
    plan.tracker.set_tags(parent, {TAG_OVERRIDES: json.dumps([redact(o) for o in plan.overrides]), **driver_tags()})
    if plan.recorded is None:  # a plan composed now (resume runs cells already recorded)
        record_plan(plan.tracker, parent, plan.cells, plan.fingerprint)  # before any cell runs
    if force:
        for cell in cells:
            record = plan.records.get(cell.cell_id)
            if record and record.status == "FINISHED":
                plan.tracker.supersede(record.run_id, f"rerun with --force under launch {parent}")
    return parent


TAG_DRIVER_HOST, TAG_DRIVER_PID = "memsweep.driver.host", "memsweep.driver.pid"
TAG_RAY_JOB = "memsweep.ray_job_id"  # on a launch run whose driver runs as a Ray Job (`--submit`)


def driver_tags() -> dict[str, str]:
    """Where this launch's driver runs, for `memsweep stop`: its host and process id, and the Ray Job's
    submission id when it was submitted as one (Ray hands a Job's driver its metadata in this variable,
    read here as a plain string so Ray stays in scheduler.py)."""
    import os
    import socket

    tags = {TAG_DRIVER_HOST: socket.gethostname(), TAG_DRIVER_PID: str(os.getpid())}
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("metadata") or {}
    if job.get("job_submission_id"):
        tags[TAG_RAY_JOB] = job["job_submission_id"]
    return tags


def sweep_description(plan: Plan) -> str:
    """The experiment's description in MLflow's UI (rewritten by each launch)."""
    overrides = " ".join(redact(o) for o in plan.overrides)
    return (f"memsweep sweep `{plan.name}`: {len(plan.cells)} cells (`memsweep launch {overrides}`, the "
            "latest launch's overrides). The latest launch run is the root of the sweep's tree: every "
            "earlier launch run hangs under the next one, and each cell's run under the launch that last "
            "ran it. A cell's params are the values that change its numbers; its config.yaml artifact and "
            f"memsweep.reproduce tag give the `memsweep run` line that reproduces it. Text cells' reference "
            f"models are in the experiment {REFERENCE_EXPERIMENT}.")


def latest_launch_overrides(tracker: Tracker, sweep: str) -> list[str]:
    """The overrides recorded by the sweep's most recent launch."""
    launch = latest_launch_run(tracker, sweep)
    if launch is None:
        raise ConfigError(f"sweep {sweep!r} has never been launched in {tracker.uri}")
    return json.loads(launch.tags[TAG_OVERRIDES])


def tracker_for(sweep: str, overrides: list[str]) -> Tracker:
    """The tracker that `sweep=NAME` plus the command line's fixed overrides points at."""
    cfg = sweep_config(sweep, overrides)
    return Tracker(str(cfg.tracking.uri), cfg.tracking.artifact_root)


def recorded_plan(sweep: str, overrides: list[str]) -> Plan:
    """The sweep's recorded plan (every launch's cells, as recorded); where and how they run follows
    the latest launch's overrides, then `overrides` (e.g. tracking=server). A sweep launched before
    plans were recorded has its grid rebuilt from the latest launch's overrides instead."""
    tracker = tracker_for(sweep, overrides)
    launched = latest_launch_overrides(tracker, sweep) + list(overrides)
    saved = read_plan(tracker, sweep)
    if saved is None:
        return make_plan(launched)
    options, config = sweep_runtime(sweep, launched)
    try:
        cells = saved.cells(options)
    except SpecError as err:
        raise ConfigError(str(err)) from None
    records = tracker.cell_records(options.experiment)
    return Plan(sweep, cells, records, cluster_options(config), tracker, launched, pack_options(config), saved)


def plan_drift(plan: Plan) -> str | None:
    """One line when today's `conf/` and code give the sweep's latest overrides cells that no launch
    recorded (None when every one of them is recorded, or nothing was recorded)."""
    if plan.recorded is None:
        return None
    if grid_fingerprint(plan.overrides) in plan.recorded.fingerprints:
        return None  # a launch recorded the cells of exactly what today's overrides, conf/ and code compose
    try:
        today = [c.cell_id for c in load_sweep(plan.overrides).cells]
    except ConfigError as err:
        return f"today's conf/ cannot compose this sweep's overrides ({err}); the recorded plan is used"
    unrecorded = [cell_id for cell_id in today if cell_id not in plan.recorded.rows]
    if not unrecorded:
        return None
    recorded_under = ", ".join(sorted(v for v in plan.recorded.code_versions if v)) or "unknown"
    return (f"the ids changed since the latest launch: today's conf/ and code (memsweep {code_version()}) "
            f"give its overrides {len(unrecorded)} of {len(today)} cells that no launch recorded (recorded "
            f"under {recorded_under}); status, resume and aggregate follow the recorded plan, and "
            f"`memsweep launch` with the same overrides would run those as new cells")


def stale_cells(cells: list[Cell]) -> list[Cell]:
    """Recorded cells whose spec this code hashes to another id: listed by status, never run."""
    return [c for c in cells if c.stale]
