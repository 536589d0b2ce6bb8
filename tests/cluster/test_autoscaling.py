"""`launch cluster=ray` on an autoscaling Ray cluster whose GPU workers start at zero (issue 16).

The cluster is Ray's own autoscaler (v1, the cluster launcher's) over its `fake_multinode` provider:
a head of 0 CPUs and a node type `gpu_worker` {CPU: 2, GPU: 1} at min_workers 0, whose nodes the
provider starts as real raylets on this machine when the autoscaler launches them. The GPU is a
resource the node advertises, not a device (there is none here): the cells it runs train on its CPU.
What is tested is the scheduling: requests follow `cluster.use_gpus=true` (conf/cluster/ray_gpu.yaml),
not the nodes alive at launch; the driver asks the autoscaler for the first wave and waits; a request no
node type offers is refused in one line before any run exists.

Started as STACK.md says, but on a free port and 127.0.0.1 (the provider is told the head's address,
`gcs_address`, so its workers join there), in a session of its own so that its processes (the fake
workers are children of the head's monitor) are stopped together by process group, never `ray stop`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tests.cluster.conftest import free_port, wait_for

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow


def autoscaling_config(port: int) -> dict:
    no_commands = {k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                                   "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")}
    return {
        "cluster_name": "memsweep-fake", "max_workers": 2, "idle_timeout_minutes": 5, "upscaling_speed": 1.0,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{port}"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {"resources": {"CPU": 2, "GPU": 1, "object_store_memory": 100 * 1024**2},
                           "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default", "auth": {"ssh_user": "unused"}, "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, **no_commands,
    }


def ray_env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # keeps every address on 127.0.0.1


@pytest.fixture(scope="module")
def autoscaling_cluster():
    folder = tempfile.mkdtemp(prefix="msfake")  # short: Ray's socket paths live under it
    port = free_port()
    config = os.path.join(folder, "autoscaling.json")
    with open(config, "w") as f:
        json.dump(autoscaling_config(port), f)
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--autoscaling-config={config}",
         "--num-cpus=0", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
         f"--dashboard-port={free_port()}", f"--temp-dir={folder}/ray", "--object-store-memory=100000000"],
        env={**ray_env(), "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output = head.communicate(timeout=120)[0]
        assert head.returncode == 0, output
        yield f"127.0.0.1:{port}"
    finally:
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 0)):
            try:
                os.killpg(head.pid, sig)  # `ray start`'s session: the head's daemons and the fake workers
            except ProcessLookupError:
                break
            time.sleep(grace)
        shutil.rmtree(folder, ignore_errors=True)


def memsweep(args: list[str], root, timeout_s: float = 600) -> subprocess.CompletedProcess:
    env = {**ray_env(), "MEMSWEEP_ROOT": str(root), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout_s)


def alive_gpus(address: str) -> list[float]:
    code = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
            "print(json.dumps([n['Resources'].get('GPU', 0) for n in ray.nodes() if n['Alive']]))" % address)
    result = subprocess.run([sys.executable, "-c", code], env=ray_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def runs_of(root, experiment: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def test_a_request_no_node_type_offers_fails_in_one_line_before_any_run(autoscaling_cluster, tmp_path):
    started = time.monotonic()
    result = memsweep(["launch", "sweep=smoke", "cluster=ray_gpu", f"cluster.address={autoscaling_cluster}",
                       "cluster.cpus_per_cell=8"], tmp_path / "root")  # gpu_worker has 2 CPUs
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no node type of the cluster can provide {CPU: 8" in errors[0], output
    assert "Traceback" not in output
    assert time.monotonic() - started < 120  # refused once the autoscaler passed on it, not at the timeout
    assert runs_of(tmp_path / "root", "smoke") == []  # no launch run, no cell run
    assert alive_gpus(autoscaling_cluster) == [0]  # and nothing was launched for it


def test_launch_brings_up_gpu_workers_and_finishes_every_cell(autoscaling_cluster, tmp_path):
    assert alive_gpus(autoscaling_cluster) == [0]  # the head alone: no node offers a GPU at launch
    result = memsweep(["launch", "sweep=smoke", "cluster=ray_gpu", f"cluster.address={autoscaling_cluster}"],
                      tmp_path / "root")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "waiting for the cluster to offer {CPU: 1, GPU:" in output  # what the driver waited for
    cells = [r for r in runs_of(tmp_path / "root", "smoke") if r.data.tags.get("memsweep.cell_id")]
    assert len(cells) == 4 and {r.info.status for r in cells} == {"FINISHED"}, output
    for run in cells:  # each task held a GPU fraction, so it ran on a GPU worker the autoscaler started
        assert 0 < json.loads(run.data.tags["memsweep.ray.resources"])["GPU"] < 1
    assert sorted(alive_gpus(autoscaling_cluster))[-1] == 1


def test_an_address_nothing_answers_at_fails_in_one_line(tmp_path):
    result = memsweep(["launch", "sweep=smoke", "cluster=ray", f"cluster.address=127.0.0.1:{free_port()}"],
                      tmp_path / "root", timeout_s=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert [line for line in output.splitlines() if line.startswith("error:")] == [
        next(line for line in output.splitlines() if "cluster.address=127.0.0.1:" in line)], output
    assert "Traceback" not in output and runs_of(tmp_path / "root", "smoke") == []
