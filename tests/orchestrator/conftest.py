"""A real multi-node Ray cluster on 127.0.0.1, shared by the sweep tests of one session.

The head holds no CPUs, so every cell runs on one of the two worker nodes (4 logical CPUs each: eight
tiny cells can run at once on a 2-core machine). Tests drive it in-process (`ray.init(address=...)`) or
through the real `memsweep` command with `cluster=ray cluster.address=...`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Keeps Ray on 127.0.0.1 (see orchestrator.scheduler._keep_loopback); read when ray is imported.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

NODE_ARGS = {"num_cpus": 4, "object_store_memory": 100 * 1024**2, "node_ip_address": "127.0.0.1"}


def wait_until(predicate, timeout_s: float, interval_s: float = 0.5, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    from ray.cluster_utils import Cluster

    temp_dir = str(tmp_path_factory.mktemp("ray"))
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "temp_dir": temp_dir,
                        "object_store_memory": 100 * 1024**2, "node_ip_address": "127.0.0.1"},
    )
    workers = [cluster.add_node(**NODE_ARGS) for _ in range(2)]
    cluster.wait_for_nodes()
    cluster.workers = workers
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_driver(ray_cluster):
    """This test process connected to the shared cluster as a driver."""
    import ray

    ray.init(address=ray_cluster.address, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield ray_cluster
    ray.shutdown()


@pytest.fixture
def sweep_root(tmp_path, monkeypatch):
    """A fresh MEMSWEEP_ROOT (tracking store + checkpoints) for one test."""
    root = tmp_path / "root"
    monkeypatch.setenv("MEMSWEEP_ROOT", str(root))
    return root


def memsweep(args: list[str], root, cwd) -> subprocess.Popen:
    """Start the real `memsweep` command with MEMSWEEP_ROOT=root. Its output goes to a log file (a pipe
    nobody reads while the test polls would fill and block it); `finish()` returns that output."""
    env = {**os.environ, "MEMSWEEP_ROOT": str(root), "PYTHONUNBUFFERED": "1"}
    log = open(os.path.join(cwd, f"memsweep-{args[0]}-{time.monotonic_ns()}.log"), "w+")
    process = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env,
                               stdout=log, stderr=subprocess.STDOUT, text=True)
    process.log = log
    return process


def finish(process: subprocess.Popen, timeout_s: float = 300) -> str:
    """Wait for a `memsweep` process and return everything it printed."""
    try:
        process.wait(timeout_s)
    finally:
        if process.poll() is None:
            process.kill()
    process.log.seek(0)
    return process.log.read()
