"""MLflow's home: the record that `status`, `resume` and `aggregate` read.

One experiment per sweep; a parent run per launch; one child run per cell, tagged with its cell id and
sweep. A cell's run is found by its `memsweep.cell_id` tag, never by a process-local handle, so a retried
or resumed cell continues its own run and there is never a second FINISHED run for one cell.

What a user browses is MLflow's usual record: runs created with MLflow's standard system tags (user,
source, git commit: `system_tags`), memsweep's own tags under one `memsweep.` namespace (stores written
before that used `cell_id`, `sweep` and `code_version`: every reader here accepts both, `tag`), and a
tree that starts at the latest launch: a reopened cell moves under the launch that reopens it, and each
earlier launch run hangs under the next one (`start_launch`).

Every call to the tracking store retries with exponential back-off (a server may restart mid-sweep),
metrics are buffered and sent up to 1,000 per call (each call costs 30-80 ms), and a run is marked
FINISHED only after its final metrics and artifact are recorded.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Callable, TypeVar

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)
# MLflow announces each schema step of a new SQLite store at INFO ("Creating initial MLflow database
# tables..."), through a handler of its own, before every first command: keep its warnings only.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
T = TypeVar("T")
# Reading a plan or a per-sequence table downloads an artifact: no progress bar for that on stderr.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

TAG_CELL = "memsweep.cell_id"
TAG_SWEEP = "memsweep.sweep"
TAG_KIND = "memsweep.kind"  # "cell" or "launch"
TAG_CODE = "memsweep.code_version"
TAG_ERROR = "memsweep.error"
TAG_ATTEMPT = "memsweep.attempt"  # how many times the cell's run was opened to train (1, 2, ...)
TAG_FINISHED_BY = "memsweep.finished_by_launch"  # the launch run under which the cell FINISHED
TAG_PARENT = "mlflow.parentRunId"  # MLflow's tree: a cell under its latest launch, a launch under the next
TAG_DESCRIPTION = "mlflow.note.content"  # an experiment's (or run's) description in MLflow's UI
TAG_OVERRIDES = "memsweep.overrides"  # on a launch run: the overrides it was launched with (JSON list)
# The names these tags had before they moved under `memsweep.`: read, never written.
OLD_NAMES = {TAG_CELL: "cell_id", TAG_SWEEP: "sweep", TAG_CODE: "code_version"}
# MLflow's system tags that say who ran what (the UI's User, Source and Version columns).
SYSTEM_PREFIXES = ("mlflow.user", "mlflow.source.", "mlflow.gitRepoURL")
ARTIFACT = "per_sequence.parquet"
BATCH = 1000  # MLflow's limit of metrics per log_batch call
UNFINISHED = ("RUNNING", "SCHEDULED", "FAILED", "KILLED")


@dataclass
class CellOutcome:
    """What one cell's run ended as: returned by a worker, collected by the scheduler, shown by the CLI."""

    cell_id: str
    run_id: str | None
    status: str  # FINISHED, FAILED or KILLED
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    already_finished: bool = False  # found FINISHED in the tracker; nothing was trained


@cache
def code_version() -> str:
    """The package version plus the git commit of the code, when it runs from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("memsweep")
    except PackageNotFoundError:
        release = "0+unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{release}+g{commit}" if commit else release


@cache
def code_commit() -> str | None:
    """The full git commit of memsweep's code when it runs from a checkout, else None."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


@cache
def system_tags() -> dict[str, str]:
    """MLflow's standard system tags for runs this process creates, from MLflow's own context
    resolution (user, source name and type, the entry point's git commit and repository), with the
    commit of memsweep's code as the version when it runs from a checkout: the `memsweep` console
    script itself lives outside any repository, where MLflow finds no commit."""
    from mlflow.tracking.context.registry import resolve_tags

    tags = {k: str(v) for k, v in resolve_tags().items() if k.startswith(SYSTEM_PREFIXES)}
    if code_commit():
        tags["mlflow.source.git.commit"] = code_commit()
    return tags


def tag(tags: dict, name: str, default: str | None = None) -> str | None:
    """A memsweep tag's value, under its name or the name it had before (`OLD_NAMES`)."""
    value = tags.get(name)
    if value is None and name in OLD_NAMES:
        value = tags.get(OLD_NAMES[name])
    return default if value is None else value


def retrying(fn: Callable[[], T], what: str, timeout_s: float = 300.0) -> T:
    """Call `fn` until it succeeds, backing off 0.5 s, 1 s, 2 s ... (at most 15 s) for `timeout_s`.
    Only what can heal is retried (a server restarting, a connection dropped, a 5xx or 429 answer):
    a 4xx answer (an address that is not an MLflow server, credentials refused) fails at once."""
    deadline, delay = time.monotonic() + timeout_s, 0.5
    while True:
        try:
            return fn()
        except (MlflowException, OSError, ConnectionError) as err:
            if time.monotonic() + delay > deadline or _permanent(err):
                raise
            log.warning("tracking: %s failed (%s); retrying in %.1f s", what, err, delay)
            time.sleep(delay)
            delay = min(delay * 2, 15.0)


def _permanent(err: Exception) -> bool:
    """A tracking server's 4xx answer other than 429 (too many requests): retrying cannot change it."""
    status = err.get_http_status_code() if isinstance(err, MlflowException) else None
    return status is not None and 400 <= status < 500 and status != 429


SECRET_WORDS = re.compile(r"secret|passw|token|credential|session|access_key|api_key|private", re.I)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/?#@\s]*):(?P<password>[^@/?#\s]+)@")
_QUERY_ITEM = re.compile(r"(?P<key>[A-Za-z0-9_.-]+)=(?P<value>[^&\s]*)")
REDACTED = "***"


def redact(value: str) -> str:
    """`value` with credentials masked: the password of a URL (`scheme://user:PASSWORD@host`) and the
    value of every query item or `key=value` word whose key names a secret (`secret_key=...`,
    `password=...`, `session_token=...`). Applied to everything recorded as a param or override tag;
    credentials belong in the environment (AWS_*, MLFLOW_TRACKING_PASSWORD), which is never recorded."""
    value = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", value)
    return _QUERY_ITEM.sub(lambda m: f"{m['key']}={REDACTED}" if SECRET_WORDS.search(m["key"]) else m[0], value)


@dataclass(frozen=True)
class DatasetRecord:
    """A cell's dataset as MLflow records a run input: a name, a digest of what fixes its sequences,
    where they come from (`source_type` and `source`, JSON) and their sizes (`profile`, JSON)."""

    name: str
    digest: str
    source_type: str
    source: str
    profile: str


_LAUNCH_CONTEXT: dict[tuple[str, str], dict[str, str]] = {}  # (store, launch run id) -> its system tags


@dataclass(frozen=True)
class CellRecord:
    cell_id: str
    run_id: str
    status: str  # MLflow's run status: RUNNING, FINISHED, FAILED, KILLED
    error: str | None


def _open_client(uri: str) -> MlflowClient:
    """An MlflowClient for `uri`. For a local SQLite store the client creates and migrates the schema
    when constructed, and processes doing that at the same moment crash ("table ... already exists",
    "Online migration expected to match one row"): a driver, its workers and a `memsweep status` may
    all open a new store at once, so construction happens under an exclusive file lock beside it."""
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    database = Path(uri[len("sqlite:///"):])
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
        return client


class Tracker:
    """A thin, retrying wrapper over MlflowClient for one tracking URI."""

    def __init__(self, uri: str, artifact_root: str | None = None, retry_timeout_s: float = 300.0):
        self.uri, self.artifact_root, self.retry_timeout_s = uri, artifact_root, retry_timeout_s
        self.client = _open_client(uri)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        return retrying(fn, what, self.retry_timeout_s)

    # -- store and experiments ---------------------------------------------------------------------
    def ensure_store(self) -> None:
        """Check the store answers (a server may still be starting: retried with back-off)."""
        self._call("open the store", lambda: self.client.search_experiments(max_results=1))

    def experiment_id(self, name: str, create: bool = True) -> str | None:
        found = self._call("find experiment", lambda: self.client.get_experiment_by_name(name))
        if found is not None:
            return found.experiment_id
        if not create:
            return None
        location = f"{Path(self.artifact_root).resolve().as_uri()}/{name}" if self.artifact_root else None
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by another process
            return self._call("find experiment", lambda: self.client.get_experiment_by_name(name)).experiment_id

    # -- reading the record ------------------------------------------------------------------------
    def cell_records(self, experiment: str) -> dict[str, CellRecord]:
        """The current run of every cell in an experiment, by cell id (`read_cell_heads`: only each
        run's id, status, start and cell id, in pages). Where a cell has several runs (a crash between
        creating and tagging one), the FINISHED or newest one wins (`replaces`)."""
        exp_id = self.experiment_id(experiment, create=False)
        if exp_id is None:
            return {}
        heads, _ = read_cell_heads(self, exp_id)
        return {cell_id: CellRecord(cell_id, h.run_id, h.status, h.error) for cell_id, h in heads.items()}

    def finished_cells(self, experiment: str) -> set[str]:
        return {c for c, r in self.cell_records(experiment).items() if r.status == "FINISHED"}

    def describe(self, experiment: str, text: str, replace: bool = True) -> None:
        """Set the experiment's description (MLflow's `mlflow.note.content` tag); with `replace`
        False, only where it has none yet."""
        exp_id = self.experiment_id(experiment)
        if not replace:
            found = self._call("read experiment", lambda: self.client.get_experiment(exp_id))
            if found.tags.get(TAG_DESCRIPTION):
                return
        self._call("describe experiment", lambda: self.client.set_experiment_tag(exp_id, TAG_DESCRIPTION, text))

    # -- writing -----------------------------------------------------------------------------------
    def start_launch(self, experiment: str, sweep: str, params: dict, description: str | None = None) -> str:
        """A new launch (parent) run, with MLflow's system tags; every earlier launch run of the
        experiment not yet under another moves under it, so the whole sweep is one tree whose root is
        the latest launch. `description` replaces the experiment's."""
        exp_id = self.experiment_id(experiment)
        earlier = self._call("find launch runs", lambda: self.client.search_runs(
            [exp_id], filter_string=f"tags.`{TAG_KIND}` = 'launch'", max_results=5000))
        run = self._call("create launch run", lambda: self.client.create_run(
            exp_id, run_name=f"launch-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={**system_tags(), TAG_KIND: "launch", TAG_SWEEP: sweep, TAG_CODE: code_version()},
        ))
        run_id = run.info.run_id
        for launch in earlier:
            if TAG_PARENT not in launch.data.tags:
                self.set_tags(launch.info.run_id, {TAG_PARENT: run_id})
        if description:
            self.describe(experiment, description)
        self.log_params(run_id, params)
        return run_id

    def cell_runs(self, experiment: str, cell_id: str, max_results: int = 10) -> list:
        """The runs of one cell, newest first, found by its tag (or, in a store written before the
        tags moved under `memsweep.`, by its old tag)."""
        exp_id = self.experiment_id(experiment, create=False)
        if exp_id is None:
            return []
        for name in (TAG_CELL, OLD_NAMES[TAG_CELL]):
            runs = self._call("find cell run", lambda: self.client.search_runs(
                [exp_id], filter_string=f"tags.`{name}` = '{cell_id}'",
                order_by=["attributes.start_time DESC"], max_results=max_results,
            ))
            if runs:
                return list(runs)
        return []

    def open_cell_run(self, experiment: str, cell_id: str, run_name: str, tags: dict,
                      parent_run_id: str | None = None) -> tuple[str, bool]:
        """(run id, already finished): the cell's FINISHED run if it has one (a retry of a cell that
        finished just before its worker died), else its unfinished run reopened (a retry or resume),
        else a new run with MLflow's system tags (those of the launch that starts it)."""
        existing = self.cell_runs(experiment, cell_id)
        for run in existing:
            if run.info.status == "FINISHED":
                return run.info.run_id, True
        if existing:
            return self._reopen(existing[0], cell_id, parent_run_id), False
        all_tags = {**self._context_tags(parent_run_id), TAG_KIND: "cell", TAG_CELL: cell_id,
                    TAG_CODE: code_version(), TAG_ATTEMPT: "1", **tags}
        if parent_run_id:
            all_tags[TAG_PARENT] = parent_run_id
        exp_id = self.experiment_id(experiment)
        run = self._call("create cell run", lambda: self.client.create_run(
            exp_id, run_name=run_name, tags=all_tags))
        return run.info.run_id, False

    def _reopen(self, run, cell_id: str, parent_run_id: str | None) -> str:
        """A retry or resume continues the cell's run: RUNNING again, its error cleared, one attempt
        more, the version of the code now running it, and under the launch that reopens it (so the
        latest launch's tree holds every cell it ran)."""
        run_id = run.info.run_id
        self._call("reopen run", lambda: self.client.update_run(run_id, status="RUNNING"))
        if TAG_ERROR in run.data.tags:
            self._call("clear error", lambda: self._delete_tag_if_present(run_id, TAG_ERROR))
        attempt = int(run.data.tags.get(TAG_ATTEMPT, "1")) + 1
        tags = {TAG_CELL: cell_id, TAG_ATTEMPT: str(attempt), TAG_CODE: code_version()}
        if parent_run_id:
            tags[TAG_PARENT] = parent_run_id
        self.set_tags(run_id, tags)
        return run_id

    def _context_tags(self, parent_run_id: str | None) -> dict[str, str]:
        """MLflow's system tags for a new cell run: its launch run's (the driver resolved them where
        the user started memsweep; a Ray worker's own context is Ray's worker script), else this
        process's."""
        if parent_run_id:
            key = (self.uri, parent_run_id)
            if key not in _LAUNCH_CONTEXT:
                parent = self._call("read launch run", lambda: self.client.get_run(parent_run_id))
                _LAUNCH_CONTEXT[key] = {k: v for k, v in parent.data.tags.items() if k.startswith(SYSTEM_PREFIXES)}
            if _LAUNCH_CONTEXT[key]:
                return dict(_LAUNCH_CONTEXT[key])
        return system_tags()

    def _delete_tag_if_present(self, run_id: str, key: str) -> None:
        if key in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, key)

    def supersede(self, run_id: str, reason: str) -> None:
        """Retire a FINISHED run before a forced rerun: tagged and soft-deleted (restorable with
        `mlflow runs restore`), so the cell never has two visible FINISHED runs."""
        self._call("tag superseded", lambda: self.client.set_tag(run_id, "memsweep.superseded", reason))
        self._call("delete superseded", lambda: self.client.delete_run(run_id))

    def log_params(self, run_id: str, params: dict) -> None:
        """Params are write-once in MLflow: a resumed run re-logs only what it lacks."""
        present = self._call("read params", lambda: self.client.get_run(run_id).data.params)
        items = [Param(k, redact(str(v))[:6000]) for k, v in params.items() if k not in present]
        for i in range(0, len(items), 100):
            chunk = items[i : i + 100]
            self._call("log params", lambda: self.client.log_batch(run_id, params=chunk))

    def log_metrics(self, run_id: str, metrics: list[tuple[str, float, int]]) -> None:
        """(key, value, step) triples, sent in batches of at most 1,000."""
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v, step in metrics]
        for i in range(0, len(items), BATCH):
            chunk = items[i : i + BATCH]
            self._call("log metrics", lambda: self.client.log_batch(run_id, metrics=chunk))

    def set_tags(self, run_id: str, tags: dict) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._call("set tags", lambda: self.client.log_batch(run_id, tags=items))

    def log_table(self, run_id: str, table: pa.Table, name: str = ARTIFACT) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, name)
            pq.write_table(table, path)
            self._call("log artifact", lambda: self.client.log_artifact(run_id, path))

    def log_text(self, run_id: str, text: str, name: str) -> None:
        """A text artifact (a later call replaces it)."""
        self._call("log text", lambda: self.client.log_text(run_id, text, name))

    def log_dataset(self, run_id: str, dataset: DatasetRecord) -> None:
        """Record `dataset` as the run's training input (once: a reopened run already has it)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        run = self._call("read inputs", lambda: self.client.get_run(run_id))
        inputs = run.inputs.dataset_inputs if run.inputs else []
        if any(i.dataset.digest == dataset.digest and i.dataset.name == dataset.name for i in inputs):
            return
        entity = DatasetInput(
            Dataset(name=dataset.name, digest=dataset.digest, source_type=dataset.source_type,
                    source=dataset.source, profile=dataset.profile),
            tags=[InputTag("mlflow.data.context", "training")])
        self._call("log inputs", lambda: self.client.log_inputs(run_id, datasets=[entity]))

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self._call(f"mark {status}", lambda: self.client.set_terminated(run_id, status=status))

    def fail(self, run_id: str, error: str, status: str = "FAILED") -> None:
        self._call("tag error", lambda: self.client.set_tag(run_id, TAG_ERROR, error[:5000]))
        self.finish(run_id, status)

    # -- artifacts for readers ---------------------------------------------------------------------
    def load_table(self, run_id: str, name: str = ARTIFACT) -> pa.Table:
        with tempfile.TemporaryDirectory() as tmp:
            path = self._call("download artifact", lambda: mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=name, dst_path=tmp, tracking_uri=self.uri))
            return pq.read_table(path)

    def load_text(self, run_id: str, name: str) -> str:
        """A text artifact, as log_text wrote it."""
        with tempfile.TemporaryDirectory() as tmp:
            path = self._call("download artifact", lambda: mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=name, dst_path=tmp, tracking_uri=self.uri))
            return Path(path).read_text()


class MetricBuffer:
    """Collects step metrics and flushes them in batches: every `flush_every` entries and at the end."""

    def __init__(self, tracker: Tracker, run_id: str, flush_every: int = 200):
        self.tracker, self.run_id, self.flush_every = tracker, run_id, flush_every
        self.pending: list[tuple[str, float, int]] = []

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        self.pending.extend((k, v, step) for k, v in metrics.items())
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.tracker.log_metrics(self.run_id, self.pending)
            self.pending = []


# -- reading whole sweeps (aggregate) --------------------------------------------------------------
# `memsweep aggregate` reads every cell's current run (`read_cell_runs`, below) with its params, tags
# and latest metrics; MLflow's run search comes in pages of 5,000; step metrics come in bulk: one SQL
# query per 500 runs on a database store, one request per 100 runs from a tracking server (the endpoint
# MLflow's own UI uses for its charts), and one call per run only where neither exists.
SEARCH_PAGE = 5000
HISTORY_CHUNK_SQL = 500  # run ids per IN (...) query; far below SQLite's 32,766 variables
HISTORY_CHUNK_REST = 100  # the server's limit of run ids per get-history-bulk request
HISTORY_MAX_REST = 25000  # ... and of points per response


@dataclass(frozen=True)
class RunRecord:
    """One run's whole record as plain values: what a table row is built from."""

    run_id: str
    experiment_id: str
    status: str  # RUNNING, SCHEDULED, FINISHED, FAILED, KILLED
    start_time_ms: int | None
    end_time_ms: int | None
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]  # the latest value of each metric (highest step, then newest)


def _run_record(run) -> RunRecord:
    return RunRecord(
        run_id=run.info.run_id, experiment_id=str(run.info.experiment_id), status=run.info.status,
        start_time_ms=run.info.start_time, end_time_ms=run.info.end_time,
        tags=dict(run.data.tags), params=dict(run.data.params), metrics=dict(run.data.metrics),
    )


def read_runs(tracker: Tracker, experiment: str, kind: str = "cell") -> list[RunRecord]:
    """Every active run of `experiment` tagged memsweep.kind=`kind`, oldest first (paginated).
    Soft-deleted runs (superseded by `launch --force`) are not read. Empty if no such experiment."""
    exp_id = tracker.experiment_id(experiment, create=False)
    if exp_id is None:
        return []
    records: list[RunRecord] = []
    token = None
    while True:
        page = tracker._call("search runs", lambda: tracker.client.search_runs(
            [exp_id], filter_string=f"tags.`{TAG_KIND}` = '{kind}'", max_results=SEARCH_PAGE,
            order_by=["attributes.start_time ASC"], page_token=token,
        ))
        records.extend(_run_record(run) for run in page)
        token = page.token
        if not token:
            return records


# -- reading a sweep's cells (status, resume, aggregate) ---------------------------------------------
# A sweep of 100,000 cells is read without holding every run's object: only each cell's current run is
# kept as pages arrive. On a database store the reads are SQL through MLflow's own tables, selecting
# only the columns needed, in pages keyed by run id; from a tracking server (or any other store) they
# are MLflow's run search, split into ranges of start time fetched in parallel (a run's start time
# never changes, so no run moves between ranges while they are read). Soft-deleted runs (superseded by
# `launch --force`) are never read, as MLflow's search leaves them out.
CELL_FILTER = f"tags.`{TAG_KIND}` = 'cell'"
HEAD_PAGE = 20000  # runs per SQL page of `read_cell_heads`
SEARCH_PARTS = 8  # start-time ranges searched at once on a tracking server


@dataclass(frozen=True)
class CellHead:
    """What `status` and `resume` need of one cell run."""

    run_id: str
    status: str
    start_time_ms: int | None
    error: str | None  # the memsweep.error tag


def _order(run) -> tuple:
    """Where a run (CellHead or RunRecord) comes in MLflow's search by start time: ties by run id."""
    return (run.start_time_ms or 0, run.run_id)


def replaces(run, current) -> bool:
    """Whether `run` replaces `current` (None: no run yet) as its cell's current run: a FINISHED run
    beats any other and the earliest FINISHED one stays (as `status` showed it first), else the newest
    wins (a retry continues that one). This is reading runs oldest first and letting each replace a run
    that is not FINISHED, in a form that gives the same answer in any order (pages read in parallel)."""
    if current is None:
        return True
    if (run.status == "FINISHED") != (current.status == "FINISHED"):
        return run.status == "FINISHED"
    older = _order(run) < _order(current)
    return older if run.status == "FINISHED" else not older


def _keep_current(chosen: dict, cell_id: str | None, run) -> None:
    if cell_id and replaces(run, chosen.get(cell_id)):
        chosen[cell_id] = run


def _sql_store(tracker: Tracker):
    """The tracker's SqlAlchemyStore (SQLite, PostgreSQL, ...), or None for a tracking server."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = tracker.client._tracking_client.store
    return store if isinstance(store, SqlAlchemyStore) else None


def read_cell_heads(tracker: Tracker, exp_id: str) -> tuple[dict[str, CellHead], int]:
    """The current run of each cell of experiment `exp_id` (id, status, start, error), by cell id, and
    how many active cell runs were read (a cell may have several)."""
    store = _sql_store(tracker)
    if store is None:
        return _search_current(tracker, exp_id, lambda run: CellHead(
            run.info.run_id, run.info.status, run.info.start_time, run.data.tags.get(TAG_ERROR)))
    from mlflow.store.tracking.dbmodels.models import SqlRun, SqlTag
    from sqlalchemy import and_, select
    from sqlalchemy.orm import aliased

    kind, cell, old, error = (aliased(SqlTag) for _ in range(4))

    def tag_of(alias, key: str):
        return and_(alias.run_uuid == SqlRun.run_uuid, alias.key == key)

    query = (select(SqlRun.run_uuid, SqlRun.status, SqlRun.start_time, cell.value, old.value, error.value)
             .join(kind, and_(tag_of(kind, TAG_KIND), kind.value == "cell"))
             .outerjoin(cell, tag_of(cell, TAG_CELL)).outerjoin(old, tag_of(old, OLD_NAMES[TAG_CELL]))
             .outerjoin(error, tag_of(error, TAG_ERROR))
             .where(SqlRun.experiment_id == int(exp_id), SqlRun.lifecycle_stage == "active"))
    chosen, seen = {}, 0
    for rows in _sql_pages(tracker, store, query, SqlRun.run_uuid):
        for run_id, status, start, cell_id, old_id, err in rows:
            _keep_current(chosen, cell_id if cell_id is not None else old_id, CellHead(run_id, status, start, err))
        seen += len(rows)
    return chosen, seen


def _sql_pages(tracker: Tracker, store, query, key):
    """The rows of `query` in pages of HEAD_PAGE ordered by its first column `key` (unique), each page
    one short read (a long one would hold SQLite's lock against the cells writing)."""
    after = None
    while True:
        page = (query if after is None else query.where(key > after)).order_by(key).limit(HEAD_PAGE)
        rows = tracker._call("read runs", lambda: _sql_rows(store, page))
        if rows:
            yield rows
        if len(rows) < HEAD_PAGE:
            return
        after = rows[-1][0]


def _sql_rows(store, statement) -> list:
    with store.ManagedSessionMaker() as session:
        return session.execute(statement).all()


def _search_current(tracker: Tracker, exp_id: str, convert: Callable) -> tuple[dict, int]:
    """The current run of each cell, as `convert(run)` makes it from an MLflow Run (a CellHead or a
    RunRecord), and how many runs were read: MLflow's run search over `SEARCH_PARTS` ranges of start
    time at once, each page reduced as it arrives."""
    from concurrent.futures import ThreadPoolExecutor

    def search(filter_string: str) -> tuple[dict, int]:
        chosen, seen, token = {}, 0, None
        while True:
            page = tracker._call("search runs", lambda: tracker.client.search_runs(
                [exp_id], filter_string=filter_string, max_results=SEARCH_PAGE,
                order_by=["attributes.start_time ASC"], page_token=token))
            for run in page:
                _keep_current(chosen, tag(run.data.tags, TAG_CELL), convert(run))
            seen, token = seen + len(page), page.token
            if not token:
                return chosen, seen

    parts = _start_time_ranges(tracker, exp_id, SEARCH_PARTS)
    with ThreadPoolExecutor(max_workers=max(1, len(parts))) as pool:
        found = list(pool.map(search, parts))
    merged: dict = {}
    for chosen, _ in found:
        for cell_id, run in chosen.items():
            _keep_current(merged, cell_id, run)
    return merged, sum(seen for _, seen in found)


def _start_time_ranges(tracker: Tracker, exp_id: str, parts: int) -> list[str]:
    """Search filters splitting the experiment's cell runs into at most `parts` ranges of start time
    between its first and last run's (the last range open: a run created meanwhile falls in it)."""
    def edge(order: str) -> int | None:
        runs = tracker._call("search runs", lambda: tracker.client.search_runs(
            [exp_id], filter_string=CELL_FILTER, order_by=[f"attributes.start_time {order}"], max_results=1))
        return runs[0].info.start_time if runs else None

    first, last = edge("ASC"), edge("DESC")
    if first is None or last is None or last <= first:
        return [CELL_FILTER]
    step = -(-(last - first + 1) // parts)
    cuts = list(range(first + step, last + 1, step))
    bounds = [f" and attributes.start_time < {cuts[0]}"]
    bounds += [f" and attributes.start_time >= {low} and attributes.start_time < {high}"
               for low, high in zip(cuts, cuts[1:])]
    bounds.append(f" and attributes.start_time >= {cuts[-1]}")
    return [CELL_FILTER + bound for bound in bounds]


def read_cell_runs(tracker: Tracker, experiment: str) -> tuple[list[RunRecord], int]:
    """The current run of every cell of `experiment` (`replaces`) as RunRecords, oldest first, and how
    many active cell runs the store holds. On a database store the heads come first, then the records
    of the chosen runs only, 500 at a time (four SQL queries each: runs, tags, params, latest metrics);
    repeated strings (param names and values, tags) are kept once."""
    exp_id = tracker.experiment_id(experiment, create=False)
    if exp_id is None:
        return [], 0
    store = _sql_store(tracker)
    if store is None:
        chosen, seen = _search_current(tracker, exp_id, _run_record)
        return sorted(chosen.values(), key=_order), seen
    heads, seen = read_cell_heads(tracker, exp_id)
    run_ids = [h.run_id for h in sorted(heads.values(), key=_order)]
    strings: dict[str, str] = {}
    records = []
    for i in range(0, len(run_ids), HISTORY_CHUNK_SQL):
        chunk = run_ids[i : i + HISTORY_CHUNK_SQL]
        records.extend(tracker._call("read runs", lambda: _records_sql(store, chunk, strings)))
    return records, seen


def _records_sql(store, run_ids: list[str], strings: dict[str, str]) -> list[RunRecord]:
    """RunRecords of `run_ids`, in that order, from MLflow's tables: the values its search would give
    (a latest metric stored as NaN reads as NaN). `strings` keeps one copy of each repeated string."""
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlParam, SqlRun, SqlTag
    from sqlalchemy import select

    def one(value: str) -> str:
        return strings.setdefault(value, value)

    tags, params, metrics = ({run_id: {} for run_id in run_ids} for _ in range(3))
    with store.ManagedSessionMaker() as session:
        runs = {row[0]: row for row in session.execute(select(
            SqlRun.run_uuid, SqlRun.experiment_id, SqlRun.status, SqlRun.start_time, SqlRun.end_time)
            .where(SqlRun.run_uuid.in_(run_ids)))}
        for table, into in ((SqlTag, tags), (SqlParam, params)):
            for run_id, key, value in session.execute(select(table.run_uuid, table.key, table.value)
                                                      .where(table.run_uuid.in_(run_ids))):
                into[run_id][one(key)] = one(value)
        for run_id, key, value, is_nan in session.execute(select(
                SqlLatestMetric.run_uuid, SqlLatestMetric.key, SqlLatestMetric.value, SqlLatestMetric.is_nan)
                .where(SqlLatestMetric.run_uuid.in_(run_ids))):
            metrics[run_id][one(key)] = float("nan") if is_nan else value
    return [RunRecord(run_id=run_id, experiment_id=str(runs[run_id][1]), status=runs[run_id][2],
                      start_time_ms=runs[run_id][3], end_time_ms=runs[run_id][4], tags=tags[run_id],
                      params=params[run_id], metrics=metrics[run_id])
            for run_id in run_ids if run_id in runs]


def latest_launch_run(tracker: Tracker, experiment: str) -> RunRecord | None:
    """The sweep's most recent launch (parent) run, or None if it was never launched."""
    exp_id = tracker.experiment_id(experiment, create=False)
    if exp_id is None:
        return None
    runs = tracker._call("find launch run", lambda: tracker.client.search_runs(
        [exp_id], filter_string=f"tags.`{TAG_KIND}` = 'launch'",
        order_by=["attributes.start_time DESC"], max_results=1))
    return _run_record(runs[0]) if runs else None


def read_metric_histories(
    tracker: Tracker, run_ids: list[str], keys: tuple[str, ...], workers: int = 8
) -> list[tuple[str, str, int, float, int]]:
    """Every logged point of the step metrics `keys` of `run_ids`, as (run_id, key, step, value,
    timestamp_ms) tuples in no particular order."""
    if not run_ids:
        return []
    store = tracker.client._tracking_client.store
    if hasattr(store, "get_metric_history_bulk"):  # a database store: one query per chunk and key
        return _histories_sql(tracker, store, run_ids, keys)
    from concurrent.futures import ThreadPoolExecutor

    from mlflow.store.tracking.rest_store import RestStore

    jobs = []
    if isinstance(store, RestStore):
        jobs = [(run_ids[i : i + HISTORY_CHUNK_REST], key)
                for i in range(0, len(run_ids), HISTORY_CHUNK_REST) for key in keys]
        fetch = lambda job: _histories_rest(tracker, store, *job)  # noqa: E731
    else:
        jobs = [([run_id], key) for run_id in run_ids for key in keys]
        fetch = lambda job: _histories_one_by_one(tracker, *job)  # noqa: E731
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [point for points in pool.map(fetch, jobs) for point in points]


def _histories_sql(tracker: Tracker, store, run_ids: list[str], keys) -> list:
    points = []
    for i in range(0, len(run_ids), HISTORY_CHUNK_SQL):
        chunk = run_ids[i : i + HISTORY_CHUNK_SQL]
        for key in keys:
            found = tracker._call("read metric histories", lambda: store.get_metric_history_bulk(
                chunk, key, max_results=2**62))
            points.extend((m.run_id, m.key, m.step, m.value, m.timestamp) for m in found)
    return points


def _histories_rest(tracker: Tracker, store, run_ids: list[str], key: str) -> list:
    """The server's get-history-bulk endpoint; a chunk that hits its 25,000-point cap, or a server
    without the endpoint, is read run by run instead."""
    from mlflow.utils.rest_utils import http_request

    try:
        response = tracker._call("read metric histories", lambda: http_request(
            store.get_host_creds(), "/ajax-api/2.0/mlflow/metrics/get-history-bulk", "GET",
            params={"run_id": run_ids, "metric_key": key, "max_results": HISTORY_MAX_REST}))
        response.raise_for_status()
        found = response.json().get("metrics", [])
    except Exception as err:  # noqa: BLE001 - any failure of the optional fast path falls back
        log.info("tracking: bulk metric history unavailable (%s); reading run by run", err)
        found = None
    if found is None or len(found) >= HISTORY_MAX_REST:
        return [p for run_id in run_ids for p in _histories_one_by_one(tracker, [run_id], key)]
    return [(m["run_id"], m["key"], int(m["step"]), float(m["value"]), int(m["timestamp"])) for m in found]


def _histories_one_by_one(tracker: Tracker, run_ids: list[str], key: str) -> list:
    points = []
    for run_id in run_ids:
        history = tracker._call("read metric history", lambda: tracker.client.get_metric_history(run_id, key))
        points.extend((run_id, m.key, m.step, m.value, m.timestamp) for m in history)
    return points


def log_to_run(tracker: Tracker, run_id: str, metrics: dict[str, float], files: list[str | Path],
               artifact_path: str | None = None) -> None:
    """Attach results to an existing run (a sweep's launch run, FINISHED or not): metrics at step 0,
    files as artifacts under `artifact_path` (a later call replaces files of the same name)."""
    tracker.log_metrics(run_id, [(key, value, 0) for key, value in metrics.items()])
    for path in files:
        tracker._call("log artifact", lambda: tracker.client.log_artifact(run_id, str(path), artifact_path))
