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

import json
import logging
import os
import time
from contextlib import contextmanager
from typing import Iterable, Protocol

import ray
from ray.exceptions import RayError

from models.spec import Cell
from orchestrator.corpus import REFERENCE_EXPERIMENT
from orchestrator.resources import (
    ClusterOptions,
    PackOptions,
    largest_first,
    pack_request,
    plan_packs,
    request_for,
)
from orchestrator.tracking import CellOutcome, Tracker

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
    return host in LOOPBACK_HOSTS  # what Ray itself rewrites (other 127.x addresses it leaves alone)


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
        # Cells run on other machines, which do not see this shell's environment: hand them the
        # tracking and storage variables (cluster.job_env) as the job's runtime env, as --submit does.
        # A driver submitted as a Ray Job already has them in the job's runtime env (Ray refuses both).
        env_vars = {} if _inside_ray_job() else job_env(cluster.job_env)
        if env_vars:
            extra["runtime_env"] = {"env_vars": env_vars}
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
def _cell_task(cell: Cell, parent_run_id: str | None, num_threads: int,
               reference: CellOutcome | None = None) -> CellOutcome:
    """One cell. `reference` is passed as the ObjectRef of the reference cell's task: Ray starts this
    task only once that one has finished (or failed for good), and hands over its outcome."""
    import torch

    from orchestrator.cell import run_cell

    torch.set_num_threads(max(1, num_threads))  # as many threads as CPUs this task reserved
    return run_cell(cell, parent_run_id=parent_run_id, tags=_where(), reference=reference)


@ray.remote
def _pack_task(cells: list[Cell], parent_run_id: str | None, num_threads: int) -> list[CellOutcome]:
    """Cells trained as one pack (orchestrator.cell.run_pack); a retry resumes each from its checkpoint."""
    import torch

    from orchestrator.cell import run_pack

    torch.set_num_threads(max(1, num_threads))
    return run_pack(cells, parent_run_id=parent_run_id, tags={**_where(), "memsweep.pack_size": str(len(cells))})


def _where() -> dict[str, str]:
    """Tags saying where a task ran: node, attempt, worker process, and what Ray granted it (GPU ids
    and the fraction of a GPU shared with other tasks)."""
    context = ray.get_runtime_context()
    where = {"ray.node_id": context.get_node_id(), "ray.task_attempt": str(context.get_task_id()),
             "ray.worker_pid": str(os.getpid()),
             "ray.resources": json.dumps(context.get_assigned_resources(), sort_keys=True)}
    gpus = context.get_accelerator_ids().get("GPU") or []
    if gpus:
        where["ray.gpu_ids"] = ",".join(gpus)
    return where


def _slots(cluster: ClusterOptions, on_gpu: bool) -> int:
    """How many tasks the cluster runs at once: GPUs on GPU clusters, else CPUs over cpus_per_cell."""
    resources = ray.cluster_resources()
    if on_gpu:
        return max(1, int(resources.get("GPU", 1)))
    return max(1, int(resources.get("CPU", 1) // cluster.cpus_per_cell))


def run_cells(
    cells: Iterable[Cell],
    *,
    cluster: ClusterOptions,
    tracker: Tracker,
    parent_run_id: str | None,
    display: SweepDisplay,
    pack: PackOptions | None = None,
) -> list[CellOutcome]:
    """Run `cells` on the connected Ray cluster; returns one outcome per cell, in completion order.
    Compatible cells are grouped into packs (`pack`); a pack is one task with the summed request.

    A text cell whose reference cell is among `cells` depends on it through Ray: the reference's task is
    submitted first and its ObjectRef is an argument of each dependent task, so Ray starts dependents
    only after the reference finished (no polling). A reference not among `cells` has finished before;
    dependents load it from its checkpoint."""
    cells = list(cells)
    on_gpu = cluster.use_gpus and cluster_has_gpus()
    requests = {c.cell_id: request_for(c.spec, cluster, on_gpu, c.options.eval_batch_size) for c in cells}
    packs = [[cells[i] for i in group] for group in plan_packs(
        [c.spec for c in cells], pack or PackOptions(enabled=False), _slots(cluster, on_gpu),
        cells[0].options.eval_batch_size if cells else 1024, on_gpu=on_gpu)]
    packs = largest_first(packs)  # references first, then the longest: Ray starts tasks in this order
    pack_requests = {p[0].cell_id: pack_request([requests[c.cell_id] for c in p]) for p in packs}
    check_feasible(pack_requests)
    cpus_per_cell = cluster.cpus_per_cell
    by_ref, task_of = {}, {}  # ObjectRef -> its cells; cell id -> ObjectRef of its task
    for group in packs:
        # SPREAD: cells are independent and compute-bound, so balance them over nodes rather than
        # packing the first node (Ray's default); fractional GPU requests still pack within a node.
        options = dict(pack_requests[group[0].cell_id], max_retries=cluster.max_retries, retry_exceptions=False,
                       scheduling_strategy="SPREAD")
        if len(group) == 1:
            task = _cell_task.options(name=f"cell:{group[0].spec.slug}", **options)
        else:
            task = _pack_task.options(name=f"pack:{group[0].spec.slug}+{len(group) - 1}", **options)
        if len(group) == 1:
            reference = group[0].spec.reference
            # A reference cell lives in its own experiment (shared by sweeps): not a child of this launch.
            parent = None if group[0].options.experiment == REFERENCE_EXPERIMENT else parent_run_id
            ref = task.remote(group[0], parent, int(cpus_per_cell),
                              task_of.get(reference.cell_id) if reference is not None else None)
        else:
            ref = task.remote(group, parent_run_id, int(cpus_per_cell))
        by_ref[ref] = group
        task_of.update({c.cell_id: ref for c in group})

    pending, outcomes, failed, start = list(by_ref), [], 0, time.monotonic()
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            for ref in done:
                for outcome in _collect(ref, by_ref[ref], tracker):
                    failed += outcome.status != "FINISHED"
                    outcomes.append(outcome)
                    display.cell_done(outcome, time.monotonic() - start)
            unfinished = sum(len(by_ref[r]) for r in pending)
            display.update(len(outcomes) - failed, failed, _running_estimate(unfinished, on_gpu, cpus_per_cell),
                           unfinished)
    except KeyboardInterrupt:
        _cancel(pending, [c for r in pending for c in by_ref[r]], tracker)
        raise
    return outcomes


def _collect(ref, cells: list[Cell], tracker: Tracker) -> list[CellOutcome]:
    """The task's outcomes; cells of a task lost beyond its retries are recorded FAILED here."""
    try:
        result = ray.get(ref)
        return result if isinstance(result, list) else [result]
    except RayError as err:
        error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        records = tracker.cell_records(cells[0].options.experiment)
        outcomes = []
        for cell in cells:
            record = records.get(cell.cell_id)
            if record and record.status == "RUNNING":
                tracker.fail(record.run_id, error)
            outcomes.append(CellOutcome(cell.cell_id, record.run_id if record else None, "FAILED", error=error))
        return outcomes


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


# -- Ray Jobs: the sweep's driver on the cluster (`memsweep launch --submit`) ------------------------
def job_env(names: str, environ: dict | None = None) -> dict[str, str]:
    """The variables named in `names` (comma-separated) that are set in `environ`: what the Job's
    driver and its cells need to reach the tracking server and the storage (runtime_env env_vars,
    which Ray hands to the driver and, through the job's runtime env, to every worker)."""
    environ = os.environ if environ is None else environ
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    return {n: environ[n] for n in wanted if environ.get(n)}


def _inside_ray_job() -> bool:
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    return bool(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR))


def submit_job(dashboard_address: str, entrypoint: str, env_vars: dict[str, str], sweep: str) -> str:
    """Submit `entrypoint` as a Ray Job through the dashboard's Jobs API; returns the job id. Nothing
    here joins the cluster as a driver, so the submitting machine may disconnect afterwards."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(dashboard_address)
    job_id = f"memsweep-{sweep}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"
    return client.submit_job(
        entrypoint=entrypoint,
        submission_id=job_id,
        runtime_env={"env_vars": dict(env_vars)},
        metadata={"memsweep.sweep": sweep},
        entrypoint_num_cpus=0,  # the driver only schedules: it must not take a cell's CPU
    )


def job_status(dashboard_address: str, job_id: str) -> str:
    """PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(dashboard_address).get_job_status(job_id).value)


def job_logs(dashboard_address: str, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(dashboard_address).get_job_logs(job_id)
