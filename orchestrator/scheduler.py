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
import socket
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Protocol

import ray
from ray.exceptions import RayError

from models.spec import Cell
from orchestrator.compose import ConfigError
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


class SchedulingError(ConfigError):
    """The cluster cannot run a cell at all (a request no node, or no node type, can satisfy): refused
    like a bad configuration, in one line with exit 2, before any run exists."""


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
        _check_reachable(cluster.address)
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


def _check_reachable(address: str | None, timeout_s: float = 10.0) -> None:
    """Refuse in one line an address nothing answers at: `ray.init` would retry it for minutes. Only
    a plain HOST:PORT is checked (`auto` and `ray://` addresses Ray resolves and reports itself)."""
    if not address or address == "auto" or "://" in address or ":" not in address:
        return
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
            return
        except (OSError, ValueError) as err:
            if time.monotonic() > deadline or isinstance(err, ValueError):
                raise SchedulingError(f"cluster.address={address}: no Ray cluster answers there "
                                      f"({type(err).__name__}: {err})") from None
            time.sleep(1.0)


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def trains_on_gpus(cluster: ClusterOptions) -> bool:
    """Whether cells request GPUs: as the cluster options say (`use_gpus: true|false`), or, with
    `auto`, whether a node alive now offers one. An autoscaling cluster whose GPU nodes start at zero
    needs `true` (conf/cluster/ray_gpu.yaml): at launch no node has a GPU yet."""
    if cluster.use_gpus == "auto":
        return cluster_has_gpus()
    return bool(cluster.use_gpus)


# -- Making room: the first wave's nodes, from the autoscaler if the cluster has one ------------------
RAY_KEYS = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}
IDLE_UPDATES = 3  # autoscaler updates that see the request, launch nothing, and leave it unmet: never
PROGRESS_EVERY_S = 10.0


def bundle(request: dict) -> dict[str, float]:
    """A task's request (`num_cpus`, `num_gpus`, `memory`) as a resource bundle (`CPU`, `GPU`, ...)."""
    return {RAY_KEYS[k]: v for k, v in request.items() if v}


def _fits(shape: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0) >= v for k, v in shape.items())


def unmet(bundles: list[dict], nodes: list[dict]) -> list[dict]:
    """The distinct shapes among `bundles` that no node in `nodes` (their total resources) can hold."""
    shapes = {json.dumps(b, sort_keys=True): b for b in bundles}
    return [b for b in shapes.values() if not any(_fits(b, node) for node in nodes)]


def _alive_nodes() -> list[dict]:
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


@dataclass
class AutoscalerView:
    """What the cluster's autoscaler last reported: when (`updated`, an opaque marker that changes with
    each of its updates), whether it saw the driver's request, and which nodes it is bringing up."""

    updated: object
    sees_request: bool
    launching: dict[str, int]
    failed: int

    def describe(self) -> str:
        launching = ", ".join(f"{n} x{t}" for t, n in self.launching.items())
        return (f"autoscaler: launching {launching}" if launching else "autoscaler: launching nothing") + (
            f", {self.failed} node(s) failed to start" if self.failed else "")


def autoscaler_view() -> AutoscalerView | None:
    """The autoscaler's last report, or None on a cluster without one (a fixed set of nodes). Ray's
    autoscaler v1 (cluster launcher, fake_multinode) publishes a JSON status in the GCS's KV store;
    v2 (KubeRay) answers `get_cluster_status`."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    if _internal_kv_get("__autoscaler_v2_enabled") == b"1":
        return _autoscaler_v2_view()
    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    if not raw:
        return None
    status = json.loads(raw)
    report = status.get("autoscaler_report") or {}
    launching = dict(report.get("pending_launches") or {})
    for _, node_type, _ in report.get("pending_nodes") or []:
        launching[node_type] = launching.get(node_type, 0) + 1
    demand = (status.get("load_metrics_report") or {}).get("request_demand") or []
    return AutoscalerView(status.get("time"), bool(demand), launching, len(report.get("failed_nodes") or []))


def _autoscaler_v2_view() -> AutoscalerView:
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(ray.get_runtime_context().gcs_address)
    launching: dict[str, int] = {}
    for launch in status.pending_launches:
        launching[launch.ray_node_type_name] = launching.get(launch.ray_node_type_name, 0) + launch.count
    for node in status.pending_nodes:
        launching[node.ray_node_type_name] = launching.get(node.ray_node_type_name, 0) + 1
    return AutoscalerView(status.stats.autoscaler_version, bool(status.resource_demands.cluster_constraint_demand),
                          launching, len(status.failed_launches))


def _shape(shape: dict) -> str:
    return "{" + ", ".join(f"{k}: {_amount(k, v)}" for k, v in sorted(shape.items())) + "}"


def _amount(key: str, value: float) -> str:
    return f"{value / 2**30:.2f} GiB" if key == "memory" else f"{value:g}"


def make_room(bundles: list[dict], timeout_s: float, say: Callable[[str], None] = log.info) -> bool:
    """Return once every shape among `bundles` fits some node of the cluster; True when the autoscaler
    was asked for them (the caller withdraws the request with `release_room` once its tasks are
    submitted: from then on their own demand keeps the nodes).

    A cluster without an autoscaler fails at once on a shape no node holds (Ray would queue its task
    forever). With one, the driver asks for `bundles` (`request_resources`) and waits up to
    `timeout_s`, saying what it waits for; it fails early when the autoscaler has seen the request
    for IDLE_UPDATES updates and launches nothing: no node type offers the shape (or the cluster is at
    max_workers with other types)."""
    missing = unmet(bundles, _alive_nodes())
    if not missing:
        return False
    view = autoscaler_view()
    if view is None:
        raise SchedulingError(f"a cell requests {_shape(missing[0])}, which no node of the cluster can provide, "
                              f"and the cluster has no autoscaler (nodes: {_nodes_summary()})")
    from ray.autoscaler.sdk import request_resources

    # CPUs and GPUs only: not every provider tells its autoscaler a node type's memory (Ray's
    # fake_multinode cannot), and one that does not would judge every bundle with memory infeasible.
    # Memory is still checked, against the nodes that come up.
    request_resources(bundles=[{k: v for k, v in b.items() if k != "memory"} for b in bundles])
    try:
        _wait_for_room(bundles, view, timeout_s, say)
    except BaseException:
        release_room()
        raise
    return True


def _wait_for_room(bundles: list[dict], view: AutoscalerView, timeout_s: float, say) -> None:
    started, said_at, seen, idle = time.monotonic(), float("-inf"), view.updated, 0
    while missing := unmet(bundles, _alive_nodes()):
        view = autoscaler_view() or view
        if view.updated != seen:
            seen = view.updated
            idle = idle + 1 if view.sees_request and not view.launching else 0
        waited = time.monotonic() - started
        if idle >= IDLE_UPDATES:
            raise SchedulingError(
                f"no node type of the cluster can provide {_shape(missing[0])}: the autoscaler saw the "
                f"request for {idle} updates and launched nothing (nodes: {_nodes_summary()})")
        if waited > timeout_s:
            raise SchedulingError(f"waited {waited:.0f} s (cluster.scale_timeout_s) for a node that can "
                                  f"provide {_shape(missing[0])}; {view.describe()}")
        if time.monotonic() - said_at >= PROGRESS_EVERY_S:
            said_at = time.monotonic()
            say(f"waiting for the cluster to offer {', '.join(map(_shape, missing))} "
                f"({waited:.0f} s of {timeout_s:.0f}); {view.describe()}")
        time.sleep(1.0)


def release_room() -> None:
    """Withdraw the driver's standing request to the autoscaler (an empty request replaces it)."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[])


def _nodes_summary() -> str:
    nodes = _alive_nodes()
    return ", ".join(_shape({k: n.get(k, 0) for k in ("CPU", "GPU")}) for n in nodes) or "none"


def cell_runner(path: str | None) -> Callable[..., CellOutcome]:
    """What runs one cell in a task: orchestrator.cell.run_cell, or the function at `path`
    ("module:function", same signature) for runs that must not train: benchmarks of the driver and
    tests of the scheduling around cells (a path, not a function, so that any worker imports it)."""
    if path is None:
        from orchestrator.cell import run_cell

        return run_cell
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@ray.remote
def _cell_task(cell: Cell, parent_run_id: str | None, num_threads: int,
               reference: CellOutcome | None = None, runner: str | None = None) -> CellOutcome:
    """One cell. `reference` is passed as the ObjectRef of the reference cell's task: Ray starts this
    task only once that one has finished (or failed for good), and hands over its outcome."""
    import torch

    torch.set_num_threads(max(1, num_threads))  # as many threads as CPUs this task reserved
    return cell_runner(runner)(cell, parent_run_id=parent_run_id, tags=_where(), reference=reference)


@ray.remote
def _pack_task(cells: list[Cell], parent_run_id: str | None, num_threads: int,
               runner: str | None = None) -> list[CellOutcome]:
    """Cells trained as one pack (orchestrator.cell.run_pack); a retry resumes each from its checkpoint.
    A `runner` other than run_cell runs the pack's cells one after another."""
    import torch

    from orchestrator.cell import run_pack

    torch.set_num_threads(max(1, num_threads))
    tags = {**_where(), "memsweep.pack_size": str(len(cells))}
    if runner is not None:
        return [cell_runner(runner)(c, parent_run_id=parent_run_id, tags=tags, reference=None) for c in cells]
    return run_pack(cells, parent_run_id=parent_run_id, tags=tags)


def _where() -> dict[str, str]:
    """Tags saying where a task ran: node, task and its name in Ray's dashboard (`task_name`; the
    attempt number is `memsweep.attempt`), worker process, and what Ray granted it (GPU ids and the
    fraction of a GPU shared with other tasks)."""
    context = ray.get_runtime_context()
    where = {"memsweep.ray.node_id": context.get_node_id(), "memsweep.ray.task_id": str(context.get_task_id()),
             "memsweep.ray.task_name": context.get_task_name() or "",
             "memsweep.ray.worker_pid": str(os.getpid()),
             "memsweep.ray.resources": json.dumps(context.get_assigned_resources(), sort_keys=True)}
    gpus = context.get_accelerator_ids().get("GPU") or []
    if gpus:
        where["memsweep.ray.gpu_ids"] = ",".join(gpus)
    return where


def _slots(cluster: ClusterOptions, on_gpu: bool) -> int:
    """How many tasks the cluster runs at once: GPUs on GPU clusters, else CPUs over cpus_per_cell."""
    resources = ray.cluster_resources()
    if on_gpu:
        return max(1, int(resources.get("GPU", 1)))
    return max(1, int(resources.get("CPU", 1) // cluster.cpus_per_cell))


@dataclass
class Tasks:
    """A sweep's cells as the Ray tasks the driver will submit, in submission order: packs of cells
    (most of one cell) and each pack's request (keyed by its first cell's id)."""

    packs: list[list[Cell]]
    requests: dict[str, dict]
    on_gpu: bool
    asked_autoscaler: bool = False  # set by `prepare`: the request to withdraw once tasks are submitted

    def first_wave(self, size: int) -> list[dict]:
        """Resource bundles of the first `size` tasks, plus one of every other shape (so that a shape
        no node type offers is found before anything is submitted, not when its turn comes)."""
        bundles = [bundle(self.requests[p[0].cell_id]) for p in self.packs]
        return bundles[:size] + unmet(bundles[size:], bundles[:size])


def plan_tasks(cells: list[Cell], cluster: ClusterOptions, pack: PackOptions | None = None) -> Tasks:
    """Group `cells` into tasks and size each: packs of compatible cells (`pack`), GPU fractions when
    cells train on GPUs (`trains_on_gpus`), CPUs and memory otherwise."""
    on_gpu = trains_on_gpus(cluster)
    requests = {c.cell_id: request_for(c.spec, cluster, on_gpu, c.options.eval_batch_size) for c in cells}
    packs = [[cells[i] for i in group] for group in plan_packs(
        [c.spec for c in cells], pack or PackOptions(enabled=False), _slots(cluster, on_gpu),
        cells[0].options.eval_batch_size if cells else 1024, on_gpu=on_gpu)]
    packs = largest_first(packs)  # references first, then the longest: Ray starts tasks in this order
    return Tasks(packs, {p[0].cell_id: pack_request([requests[c.cell_id] for c in p]) for p in packs}, on_gpu)


def prepare(cells: list[Cell], cluster: ClusterOptions, pack: PackOptions | None = None,
            say: Callable[[str], None] = log.info) -> Tasks:
    """The tasks of `cells`, once the cluster has room for them (`make_room`): before anything is
    recorded, so that a request no node can ever hold is refused without leaving a run behind."""
    tasks = plan_tasks(cells, cluster, pack)
    tasks.asked_autoscaler = make_room(tasks.first_wave(cluster.scale_first_wave), cluster.scale_timeout_s, say)
    return tasks


def run_cells(
    cells: Iterable[Cell],
    *,
    cluster: ClusterOptions,
    tracker: Tracker,
    parent_run_id: str | None,
    display: SweepDisplay,
    pack: PackOptions | None = None,
    tasks: Tasks | None = None,
    runner: str | None = None,
) -> list[CellOutcome]:
    """Run `cells` on the connected Ray cluster; returns one outcome per cell, in completion order,
    without its metrics once `display` has shown them (they are in the cell's MLflow run: kept here, they
    would grow the driver by a few KB a cell).
    Compatible cells are grouped into packs (`pack`); a pack is one task with the summed request.
    `tasks`: what `prepare` made of `cells` (prepared here when not given). `runner`: what runs a cell
    in its task (`cell_runner`; orchestrator.cell.run_cell when None).

    Submission is windowed (`Window`): at most `in_flight_limit` tasks are submitted at a time and the
    rest follow as tasks finish, so the driver's Ray state stays bounded whatever the grid's size and
    the first cells start as soon as the plan is made.

    A text cell whose reference cell is among `cells` depends on it through Ray: the reference's task is
    submitted first and its ObjectRef is an argument of each dependent task, so Ray starts dependents
    only after the reference finished (no polling). A reference not among `cells` has finished before;
    dependents load it from its checkpoint."""
    tasks = tasks or prepare(list(cells), cluster, pack)
    window = Window(tasks, cluster, parent_run_id, runner)
    try:
        window.top_up()
    finally:
        if tasks.asked_autoscaler:
            release_room()  # the submitted tasks' own demand keeps the nodes from here on
    outcomes, failed, start = [], 0, time.monotonic()
    try:
        while window.in_flight:
            done, _ = ray.wait(list(window.in_flight), num_returns=len(window.in_flight), timeout=1.0)
            for ref in done:
                for outcome in _collect(ref, window.in_flight.pop(ref), tracker):
                    failed += outcome.status != "FINISHED"
                    display.cell_done(outcome, time.monotonic() - start)
                    outcomes.append(replace(outcome, metrics={}) if outcome.metrics else outcome)
            window.top_up()
            unfinished = window.unfinished_cells()
            display.update(len(outcomes) - failed, failed,
                           _running_estimate(unfinished, tasks.on_gpu, cluster.cpus_per_cell), unfinished)
    except KeyboardInterrupt:
        _cancel(list(window.in_flight), [c for g in window.in_flight.values() for c in g], tracker)
        raise
    return outcomes


MIN_IN_FLIGHT = 16  # so that a cluster still small at launch (an autoscaler's) sees demand to grow on


def in_flight_limit(cluster: ClusterOptions, on_gpu: bool) -> int:
    """How many tasks the driver keeps submitted: `cluster.max_in_flight`, or four times what the
    cluster runs at once now (GPUs x max_cells_per_gpu on GPU clusters, CPUs over cpus_per_cell
    otherwise), at least MIN_IN_FLIGHT; read again as tasks finish, so it grows as nodes join."""
    if cluster.max_in_flight is not None:
        return cluster.max_in_flight
    slots = _slots(cluster, on_gpu) * (cluster.max_cells_per_gpu if on_gpu else 1)
    return max(MIN_IN_FLIGHT, 4 * slots)


class Window:
    """The tasks of a sweep, submitted in order and at most `in_flight_limit` at a time: `top_up`
    submits up to the limit, `in_flight` maps each submitted, uncollected task to its cells. Only the
    ObjectRefs of reference cells are kept past their collection (their dependents take them as an
    argument), so what the driver holds does not grow with the grid."""

    def __init__(self, tasks: Tasks, cluster: ClusterOptions, parent_run_id: str | None,
                 runner: str | None = None):
        self.tasks, self.cluster, self.parent_run_id, self.runner = tasks, cluster, parent_run_id, runner
        self.queue = deque(tasks.packs)
        self.queued_cells = sum(len(p) for p in tasks.packs)
        self.in_flight: dict = {}  # ObjectRef -> its cells
        self.references = {c.spec.reference.cell_id: None for p in tasks.packs for c in p
                            if c.spec.reference is not None}  # reference cell id -> its task's ObjectRef

    def unfinished_cells(self) -> int:
        return self.queued_cells + sum(len(g) for g in self.in_flight.values())

    def top_up(self) -> None:
        limit = in_flight_limit(self.cluster, self.tasks.on_gpu)
        while self.queue and len(self.in_flight) < limit:
            group = self.queue.popleft()
            self.queued_cells -= len(group)
            ref = self._submit(group)
            self.in_flight[ref] = group
            self.references.update({c.cell_id: ref for c in group if c.cell_id in self.references})

    def _submit(self, group: list[Cell]):
        # SPREAD: cells are independent and compute-bound, so balance them over nodes rather than
        # packing the first node (Ray's default); fractional GPU requests still pack within a node.
        options = dict(self.tasks.requests[group[0].cell_id], max_retries=self.cluster.max_retries,
                       retry_exceptions=False, scheduling_strategy="SPREAD")
        cpus_per_cell = int(self.cluster.cpus_per_cell)
        if len(group) > 1:
            return _pack_task.options(name=f"pack:{task_name(group[0].spec)}", **options).remote(
                group, self.parent_run_id, cpus_per_cell, self.runner)
        cell = group[0]
        reference = self.references.get(cell.spec.reference.cell_id) if cell.spec.reference is not None else None
        # A reference cell lives in its own experiment (shared by sweeps): not a child of this launch.
        parent = None if cell.options.experiment == REFERENCE_EXPERIMENT else self.parent_run_id
        return _cell_task.options(name=f"cell:{task_name(cell.spec)}", **options).remote(
            cell, parent, cpus_per_cell, reference, self.runner)


def task_name(spec) -> str:
    """A task's name in Ray's dashboard: the cell's shape and precision (`l2_d32-v2048-s64-bf16`), never
    its id. Ray's driver keeps state for every task name it has seen for as long as it runs, so a name per cell would
    grow the driver's memory with every task (measured: about 5 KB a cell, 100 MB per 20,000 cells);
    which cell a task trains is in its MLflow run (tags memsweep.ray.task_id, memsweep.ray.node_id)."""
    d = spec.data
    kind = "" if d.kind == "synthetic" else f"-{d.kind}"
    return f"{spec.shape_slug}{kind}-v{d.vocab_size}-s{d.seq_len}-{spec.precision}"


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


def stop_job(dashboard_address: str, job_id: str) -> bool:
    """Ask the Jobs API to stop a Job (its driver gets SIGTERM, then SIGKILL); False if it had ended."""
    from ray.job_submission import JobSubmissionClient

    return bool(JobSubmissionClient(dashboard_address).stop_job(job_id))


def sweep_jobs(dashboard_address: str, sweep: str) -> dict[str, str]:
    """Submission id -> status of every Job `submit_job` sent for `sweep` (by its metadata)."""
    from ray.job_submission import JobSubmissionClient

    return {job.submission_id: str(job.status.value) for job in JobSubmissionClient(dashboard_address).list_jobs()
            if (job.metadata or {}).get("memsweep.sweep") == sweep and job.submission_id}
