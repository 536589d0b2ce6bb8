"""Ray's home: start or join a cluster, submit cells as tasks sized by their memory, collect them as they
finish.

Each cell is one Ray task. Its request comes from `resources.request_for` (a fraction of a GPU on GPU
nodes, CPUs otherwise); a task whose worker or node dies is retried by Ray (`max_retries`) and resumes
from its checkpoint into the same MLflow run; a cell that raises is recorded FAILED by the worker and not
retried. Results are collected with `ray.wait` in completion order, never submission order. Ctrl-C
cancels every unfinished task; the workers mark their runs KILLED, and the driver marks any that could
not.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from typing import Iterable, Protocol

import ray
from ray.exceptions import RayError

from models.spec import Cell
from orchestrator.cell import CellOutcome
from orchestrator.resources import ClusterOptions, request_for
from orchestrator.tracking import Tracker

log = logging.getLogger(__name__)
CANCEL_GRACE_S = 30.0


class SchedulingError(RuntimeError):
    """The cluster cannot run a cell at all (a request no node can satisfy)."""


class SweepDisplay(Protocol):
    def update(self, done: int, failed: int, running: int, pending: int) -> None: ...
    def cell_done(self, outcome: CellOutcome, elapsed_s: float) -> None: ...


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _is_loopback(address: str | None) -> bool:
    if address in (None, "local"):
        return True
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in LOOPBACK_HOSTS


def _keep_loopback() -> None:
    """Keep a cluster on this machine on 127.0.0.1.

    Ray rewrites a loopback address (ours, or `_node_ip_address="127.0.0.1"`) to the machine's outward
    IP (`services.resolve_ip_for_localhost`) unless it believes multi-node clusters are disabled, which
    it reads from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when ray is imported. Set the variable for the
    processes Ray starts from here and the already-imported constant for this one. Only for loopback
    clusters: a driver joining a remote cluster must advertise its outward address.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


@contextmanager
def ray_cluster(cluster: ClusterOptions):
    """Connect to Ray for the duration of a sweep: reuse an existing connection, join `address`, or
    start an embedded single-node cluster bound to 127.0.0.1 (and stop it afterwards)."""
    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if _is_loopback(cluster.address if cluster.kind == "ray" else None):
        _keep_loopback()
    if cluster.kind == "local":
        # The embedded cluster listens on loopback only and lives as long as this driver; Ray's
        # token authentication (which writes a token under $HOME) adds nothing there.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            address="local",
            num_cpus=cluster.num_cpus,
            num_gpus=cluster.num_gpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            _node_ip_address="127.0.0.1",
        )
    else:
        extra = {"_node_ip_address": "127.0.0.1"} if _is_loopback(cluster.address) else {}
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False, **extra)
    try:
        yield
    finally:
        ray.shutdown()


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def check_feasible(requests: dict[str, dict]) -> None:
    """Refuse before submitting anything when some cell's request fits no alive node (Ray would
    otherwise queue it forever)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    key = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}
    for cell_id, request in requests.items():
        if not any(all(node.get(key[k], 0) >= v for k, v in request.items()) for node in nodes):
            raise SchedulingError(
                f"cell {cell_id} requests {request}, which no node of the cluster can provide "
                f"(nodes: {[{k: node.get(k, 0) for k in ('CPU', 'GPU', 'memory')} for node in nodes]})"
            )


@ray.remote
def _cell_task(cell: Cell, parent_run_id: str | None, num_threads: int) -> CellOutcome:
    import torch

    from orchestrator.cell import run_cell

    torch.set_num_threads(max(1, num_threads))  # as many threads as CPUs this task reserved
    context = ray.get_runtime_context()
    where = {"ray.node_id": context.get_node_id(), "ray.task_attempt": str(context.get_task_id())}
    return run_cell(cell, parent_run_id=parent_run_id, tags=where)


def run_cells(
    cells: Iterable[Cell],
    *,
    cluster: ClusterOptions,
    tracker: Tracker,
    parent_run_id: str | None,
    display: SweepDisplay,
) -> list[CellOutcome]:
    """Run `cells` on the connected Ray cluster; returns one outcome per cell, in completion order."""
    cells = list(cells)
    on_gpu = cluster.use_gpus and cluster_has_gpus()
    requests = {c.cell_id: request_for(c.spec, cluster, on_gpu, c.options.eval_batch_size) for c in cells}
    check_feasible(requests)
    cpus_per_cell = cluster.cpus_per_cell
    by_ref = {}
    for cell in cells:
        # SPREAD: cells are independent and compute-bound, so balance them over nodes rather than
        # packing the first node (Ray's default); fractional GPU requests still pack within a node.
        options = dict(requests[cell.cell_id], max_retries=cluster.max_retries, retry_exceptions=False,
                       name=f"cell:{cell.spec.slug}", scheduling_strategy="SPREAD")
        by_ref[_cell_task.options(**options).remote(cell, parent_run_id, int(cpus_per_cell))] = cell

    pending, outcomes, failed, start = list(by_ref), [], 0, time.monotonic()
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            for ref in done:
                outcome = _collect(ref, by_ref[ref], tracker)
                failed += outcome.status != "FINISHED"
                outcomes.append(outcome)
                display.cell_done(outcome, time.monotonic() - start)
            display.update(len(outcomes) - failed, failed, _running_estimate(len(pending), on_gpu, cpus_per_cell),
                           len(pending))
    except KeyboardInterrupt:
        _cancel(pending, [by_ref[r] for r in pending], tracker)
        raise
    return outcomes


def _collect(ref, cell: Cell, tracker: Tracker) -> CellOutcome:
    """The task's outcome; a task lost beyond its retries is recorded FAILED here, by the driver."""
    try:
        return ray.get(ref)
    except RayError as err:
        error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        record = tracker.cell_records(cell.options.experiment).get(cell.cell_id)
        if record and record.status == "RUNNING":
            tracker.fail(record.run_id, error)
        return CellOutcome(cell.cell_id, record.run_id if record else None, "FAILED", error=error)


def _running_estimate(unfinished: int, on_gpu: bool, cpus_per_cell: float) -> int:
    """Cells holding resources now: the busy share of the cluster, bounded by what is unfinished."""
    key = "GPU" if on_gpu else "CPU"
    total, free = ray.cluster_resources().get(key, 0), ray.available_resources().get(key, 0)
    per_cell = 1.0 if on_gpu else cpus_per_cell  # GPU fractions vary; count GPUs busy as a bound
    return min(unfinished, max(0, round((total - free) / per_cell)))


def _cancel(refs: list, cells: list[Cell], tracker: Tracker) -> None:
    """Cancel unfinished tasks; running workers get KeyboardInterrupt and mark their runs KILLED.
    Runs still RUNNING after a grace period (a worker that never saw the interrupt) are marked here."""
    for ref in refs:
        ray.cancel(ref, force=False)
    ray.wait(refs, num_returns=len(refs), timeout=CANCEL_GRACE_S)
    if not cells:
        return
    records = tracker.cell_records(cells[0].options.experiment)
    for cell in cells:
        record = records.get(cell.cell_id)
        if record and record.status == "RUNNING":
            tracker.fail(record.run_id, "cancelled: the driver was interrupted", status="KILLED")
