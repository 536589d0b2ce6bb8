"""Real servers on 127.0.0.x for the cluster tests, started as processes and stopped after each module.

- PostgreSQL 15 (`initdb`/`pg_ctl` in a temporary folder owned by the `postgres` user: initdb refuses
  root, so a root test runs them through `runuser -u postgres`). The binaries are found on PATH or under
  /usr/lib/postgresql/*/bin; the tests fail, never skip, when they are missing.
- moto's S3 server (`python -m moto.server -H 127.0.0.1`): the real S3 protocol over HTTP.
- an MLflow tracking server on PostgreSQL with its artifacts in the S3 emulator (restartable).
- a Ray cluster of a head and two workers, each started with `ray start --block`.

Loopback and Ray (what we found, Ray 2.60):
  Ray rewrites "127.0.0.1", "localhost" and "::1" (`ray._raylet.is_localhost`) to the machine's outward
  IP (192.0.2.2 here) in `services.resolve_ip_for_localhost`, for `--node-ip-address` and for the
  `--address` a worker joins, unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; and with that variable at 0,
  `ray start --address=...` (a worker node) aborts ("Multi-node Ray clusters are not supported").
  `ray.cluster_utils.Cluster` escapes this because it starts nodes in-process, not through `ray start`.
  The honest route for `ray start`: the other loopback addresses. Any 127.x.y.z is loopback on Linux
  without configuration, and Ray rewrites none but 127.0.0.1, so the head runs on 127.0.0.2 and the
  workers on 127.0.0.3 and 127.0.0.4, with the variable unset (Ray's default on Linux). Every address
  Ray advertises and every connection it makes then stays on 127.x (checked with `ss -tnp` in the test).
  The dashboard, and so the Jobs API, binds 127.0.0.1 (`--dashboard-host`). Ray 2.60 has no option to
  bind its gRPC listeners (GCS, raylets, agents) to one address: they listen on all interfaces, as in
  every Ray cluster; nothing connects to them but over 127.x.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

S3_KEY, S3_SECRET = "memsweep-test-key", "memsweep-test-secret-4f1c9a"  # the emulator accepts any


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.3):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - not up yet
            value = None
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status < 500


def start(command: list[str], log: Path, env: dict | None = None, cwd=None) -> subprocess.Popen:
    """A server in its own process group (stopped with everything it starts), output to `log`."""
    out = open(log, "ab")
    return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            start_new_session=True)


def stop(process: subprocess.Popen | None, sig=signal.SIGTERM, grace_s: float = 15.0) -> None:
    """Stop a process started by `start` and its whole process group (by its id, nothing broader)."""
    if process is None:
        return
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:  # children of the group may outlive its leader
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.3)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(5)


# -- PostgreSQL --------------------------------------------------------------------------------------
def pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        pytest.fail(f"PostgreSQL's {name} is not on PATH nor under /usr/lib/postgresql/*/bin: install "
                    "the PostgreSQL server binaries (e.g. apt-get install postgresql-15)")
    return found


@dataclass
class Postgres:
    port: int
    user: str
    password: str
    database: str

    @property
    def sqlalchemy_uri(self) -> str:
        return f"postgresql+psycopg2://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def connect(self):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                                dbname=self.database)


@pytest.fixture(scope="module")
def postgres():
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    as_postgres = []
    folder = Path(tempfile.mkdtemp(prefix="memsweep-pg-"))  # /tmp: the postgres user must reach it
    if os.geteuid() == 0:
        import pwd

        owner = pwd.getpwnam("postgres")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_postgres = ["runuser", "-u", "postgres", "--"]
    password, port = "pg-" + os.urandom(8).hex(), free_port()
    pwfile = folder / "pw"
    pwfile.write_text(password + "\n")
    if as_postgres:
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
    data = folder / "data"
    subprocess.run([*as_postgres, initdb, "-D", str(data), "-U", "memsweep", f"--pwfile={pwfile}",
                    "--auth=scram-sha-256", "--no-sync", "-E", "UTF8"], check=True, capture_output=True,
                   cwd=folder)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off"
    subprocess.run([*as_postgres, pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w",
                    "-t", "60", "start"], check=True, capture_output=True, cwd=folder)
    server = Postgres(port, "memsweep", password, "postgres")
    try:
        connection = server.connect()
        connection.autocommit = True
        connection.cursor().execute("CREATE DATABASE mlflow")
        connection.close()
        yield Postgres(port, "memsweep", password, "mlflow")
    finally:
        subprocess.run([*as_postgres, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], cwd=folder,
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


# -- S3 (moto) ---------------------------------------------------------------------------------------
@dataclass
class S3:
    port: int
    env: dict = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def uri(self, bucket_path: str) -> str:
        """A pyarrow URI for `bucket/path` on the emulator."""
        return f"s3://{bucket_path}?endpoint_override=127.0.0.1:{self.port}&scheme=http"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEY,
                            aws_secret_access_key=S3_SECRET, region_name="us-east-1")

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    process = start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log)
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/moto-api/"), 60, "the S3 emulator")
        server = S3(port, {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                           "AWS_REGION": "us-east-1"})
        for bucket in ("mlflow", "memsweep"):
            server.client().create_bucket(Bucket=bucket)
        yield server
    finally:
        stop(process)


# -- MLflow server -----------------------------------------------------------------------------------
class MlflowServer:
    """`mlflow server` on PostgreSQL with artifacts in S3; `restart()` kills it and starts it again on
    the same port."""

    def __init__(self, postgres: Postgres, s3: S3, folder: Path):
        self.port, self.folder, self.process = free_port(), folder, None
        self.env = {**os.environ, **s3.env, "MLFLOW_BACKEND_STORE_URI": postgres.sqlalchemy_uri,
                    "MLFLOW_S3_ENDPOINT_URL": s3.endpoint, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = start([sys.executable, "-m", "mlflow", "server", "--artifacts-destination", "s3://mlflow",
                              "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                             self.folder / "mlflow.log", env=self.env, cwd=self.folder)
        wait_for(lambda: http_ok(f"{self.uri}/health"), 120, "the MLflow server")

    def kill(self) -> None:
        stop(self.process, sig=signal.SIGKILL)
        self.process = None

    def restart(self, down_s: float = 4.0) -> None:
        self.kill()
        time.sleep(down_s)
        self.start()


@pytest.fixture(scope="module")
def mlflow_server(postgres, s3, tmp_path_factory):
    server = MlflowServer(postgres, s3, tmp_path_factory.mktemp("mlflow"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


# -- Ray ---------------------------------------------------------------------------------------------
HEAD_IP, WORKER_IPS = "127.0.0.2", ("127.0.0.3", "127.0.0.4")


def ray_env() -> dict:
    """The environment of every Ray node (and so of the Job's driver and the cells)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "MLFLOW_TRACKING_URI")
           and not k.startswith("AWS_")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               # one quick HTTP retry inside MLflow's client; memsweep's own back-off does the rest
               MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
               MLFLOW_HTTP_REQUEST_TIMEOUT="20", OMP_NUM_THREADS="1")
    return env


@dataclass
class RayNodes:
    gcs_address: str
    dashboard_address: str
    head: subprocess.Popen
    workers: list
    temp_dir: str

    def processes(self) -> list[int]:
        """Every process of the cluster: the members of the nodes' process groups."""
        groups = {p.pid for p in [self.head, *self.workers] if p is not None}
        return [pid for pid, (pgid, _) in _processes().items() if pgid in groups]

    def raylet_pid(self, worker: subprocess.Popen) -> int:
        return next(pid for pid, (pgid, name) in _processes().items() if pgid == worker.pid and name == "raylet")


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (process group, command name), from /proc."""
    found = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        found[int(stat.split("/")[2])] = (int(fields[2]), name)
    return found


def node_ports() -> list[str]:
    return [f"--{name}={free_port()}" for name in ("node-manager-port", "object-manager-port", "metrics-export-port",
                                                  "runtime-env-agent-port", "dashboard-agent-grpc-port",
                                                  "dashboard-agent-listen-port")]


@pytest.fixture(scope="module")
def ray_nodes():
    temp_dir = tempfile.mkdtemp(prefix="memsweep-ray-")  # short: Ray's socket paths have a length limit
    gcs_port, dashboard_port = free_port(), free_port()
    ray = [str(Path(sys.executable).parent / "ray")]
    common = ["--block", "--object-store-memory", str(80 * 1024**2), "--disable-usage-stats"]
    head = start([*ray, "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={gcs_port}",
                  "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                  f"--ray-client-server-port={free_port()}", *node_ports(), "--num-cpus=0", f"--temp-dir={temp_dir}", *common], Path(temp_dir) / "head.log", env=ray_env())
    nodes = RayNodes(f"{HEAD_IP}:{gcs_port}", f"http://127.0.0.1:{dashboard_port}", head, [], temp_dir)
    try:
        wait_for(lambda: http_ok(f"{nodes.dashboard_address}/api/version"), 120, "the Ray head's dashboard")
        for i, ip in enumerate(WORKER_IPS):
            # One at a time, every port chosen here: Ray's raylets listen on all interfaces, and two
            # nodes starting at once on one host can pick the same "free" port ("Address already in use").
            nodes.workers.append(start(
                [*ray, "start", f"--address={nodes.gcs_address}", f"--node-ip-address={ip}", "--num-cpus=2",
                 *node_ports(), *common], Path(temp_dir) / f"worker{i}.log", env=ray_env()))
            wait_for(lambda: alive_workers(nodes) == i + 1, 120, f"Ray worker node {i + 1}", interval_s=1.0)
        yield nodes
    finally:
        for process in [*nodes.workers, head]:
            stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def alive_workers(nodes: RayNodes) -> int:
    from ray.util.state import list_nodes  # over the dashboard's HTTP API: no driver needed

    return sum(1 for n in list_nodes(address=nodes.dashboard_address) if n.state == "ALIVE" and not n.is_head_node)
