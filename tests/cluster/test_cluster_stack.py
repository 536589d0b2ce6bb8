"""The docker/compose.yaml topology without Docker: PostgreSQL, an S3 emulator, an MLflow server on
both, a Ray head and two Ray workers started with `ray start`, all real processes on 127.0.0.x
(tests/cluster/conftest.py). A sweep goes in as a Ray Job (`memsweep launch --submit`); then a worker
node dies mid-sweep and `memsweep resume` finishes the rest while the MLflow server restarts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.cluster.conftest import S3_SECRET, ray_env, wait_for

pytestmark = pytest.mark.slow

# Tiny cells (a few seconds each on a loaded 2-core machine); the smoke grid is 2 sizes x 2 seeds.
TINY = ["model=l1_d16", "data.num_nonmembers=16", "train.batch_size=16",
        "train.max_steps=40", "train.eval_interval=20", "train.checkpoint_interval=20", "train.warmup_steps=5",
        "eval_batch_size=64", "device=cpu"]
FINAL = ("mem_bits", "loss_auc", "steps", "bits_per_param")  # a few of the final metrics every cell logs


@pytest.fixture(scope="module")
def stack(postgres, s3, mlflow_server, ray_nodes, tmp_path_factory):
    class Stack:
        pass

    stack = Stack()
    stack.postgres, stack.s3, stack.mlflow, stack.ray = postgres, s3, mlflow_server, ray_nodes
    stack.folder = tmp_path_factory.mktemp("driver")
    stack.common = ["cluster=ray", f"cluster.dashboard_address={ray_nodes.dashboard_address}", "tracking=server",
                    # quoted: Hydra's grammar reads '=' and '&' in the URI's query as syntax otherwise
                    f"storage='{s3.uri('memsweep/checkpoints')}'"]
    # The shell a user submits from: tracking server and storage credentials in the environment.
    stack.env = {**ray_env(), **s3.env, "MLFLOW_TRACKING_URI": mlflow_server.uri,
                 "MEMSWEEP_ROOT": str(stack.folder / "root"), "PYTHONUNBUFFERED": "1"}
    stack.client = MlflowClient(tracking_uri=mlflow_server.uri)
    return stack


def memsweep(stack, *args: str, timeout_s: float = 240) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=stack.folder, env=stack.env,
                            capture_output=True, text=True, timeout=timeout_s)
    return result


def wait_job(stack, job_id: str, timeout_s: float, expect: str = "SUCCEEDED") -> str:
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(stack.ray.dashboard_address)
    status = wait_for(lambda: (s := str(jobs.get_job_status(job_id).value)) in ("SUCCEEDED", "FAILED", "STOPPED") and s,
                      timeout_s, f"Ray Job {job_id}", interval_s=1.0)
    assert status == expect, jobs.get_job_logs(job_id)[-4000:]
    return jobs.get_job_logs(job_id)


def cell_runs(stack, experiment: str = "smoke") -> dict[str, list]:
    exp = stack.client.get_experiment_by_name(experiment)
    runs = stack.client.search_runs([exp.experiment_id], "tags.`memsweep.kind` = 'cell'", max_results=1000)
    grouped: dict[str, list] = {}
    for run in runs:
        grouped.setdefault(run.data.tags["memsweep.cell_id"], []).append(run)
    return grouped


def check_finished(stack, cell_ids: set[str], cap_steps: int) -> dict:
    """Every cell: exactly one run, FINISHED, with its final metrics, its row in PostgreSQL's `runs`
    table, and its per-sequence artifact in the S3 bucket behind the MLflow server."""
    grouped = cell_runs(stack)
    assert cell_ids <= set(grouped)
    runs = {}
    for cell_id in cell_ids:
        found = grouped[cell_id]
        assert len(found) == 1, f"cell {cell_id} has {len(found)} runs"
        run = found[0]
        assert run.info.status == "FINISHED", (cell_id, run.info.status, run.data.tags.get("memsweep.error"))
        assert all(k in run.data.metrics for k in FINAL), (cell_id, sorted(run.data.metrics))
        metrics = run.data.metrics  # its last branch at the cap, or an earlier one because it converged
        assert metrics["steps"] == cap_steps or (metrics["converged"] == 1 and 0 < metrics["steps"] < cap_steps)
        runs[cell_id] = run
    with stack.postgres.connect() as connection, connection.cursor() as cursor:
        cursor.execute("SELECT run_uuid, status FROM runs WHERE run_uuid = ANY(%s)",
                       ([r.info.run_id for r in runs.values()],))
        rows = dict(cursor.fetchall())
    assert rows == {r.info.run_id: "FINISHED" for r in runs.values()}
    keys = stack.s3.keys("mlflow")
    for cell_id, run in runs.items():
        assert any(run.info.run_id in k and k.endswith("per_sequence.parquet") for k in keys), (cell_id, keys[:5])
    return runs


def cluster_connections(stack) -> list[tuple[str, str]]:
    """(local, peer) of every TCP connection held by a process of the Ray cluster."""
    pids = set(stack.ray.processes())
    lines = subprocess.run(["ss", "-tnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    found = []
    for line in lines:
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            parts = line.split()
            found.append((parts[3], parts[4]))
    return found


def host(address: str) -> str:
    return address.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")


def test_sweep_submitted_as_ray_job_records_into_postgres_and_s3(stack):
    start = time.monotonic()
    submitted = memsweep(stack, "launch", "sweep=smoke", *stack.common, *TINY, "--submit")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    assert f"ray job logs -f {job_id}" in submitted.stderr and "memsweep status smoke" in submitted.stderr
    assert "AWS_SECRET_ACCESS_KEY" in submitted.stderr  # named as passed through, never printed
    assert S3_SECRET not in submitted.stdout + submitted.stderr
    logs = wait_job(stack, job_id, timeout_s=200)
    assert "4 finished, 0 failed" in logs, logs[-3000:]

    runs = check_finished(stack, set(cell_runs(stack)), cap_steps=48)  # 40, then one branch at the cap
    assert len(runs) == 4
    # cells ran on both workers, never on the head (it has no CPUs)
    assert len({r.data.tags["memsweep.ray.node_id"] for r in runs.values()}) >= 1
    # checkpoints went to the S3 emulator through pyarrow, one folder per cell
    checkpoints = stack.s3.keys("memsweep", "checkpoints/")
    for cell_id in runs:
        assert any(k.startswith(f"checkpoints/{cell_id}/step-") and k.endswith("/COMPLETE") for k in checkpoints)

    # credentials reached the cells through the Job's environment, and no param or tag holds them
    exp = stack.client.get_experiment_by_name("smoke")
    for run in stack.client.search_runs([exp.experiment_id], max_results=1000):
        for key, value in {**run.data.params, **run.data.tags}.items():
            assert S3_SECRET not in value, (run.info.run_id, key)
            assert stack.postgres.password not in value, (run.info.run_id, key)

    # `memsweep status` reads the same server from here
    status = memsweep(stack, "status", "smoke", "tracking=server")
    assert status.returncode == 0, status.stderr
    assert "4 cells: finished 4" in status.stderr, status.stderr

    # every connection the Ray cluster holds stays on loopback (127.x)
    connections = cluster_connections(stack)
    assert connections
    outside = [c for c in connections if not (host(c[0]).startswith("127.") and host(c[1]).startswith("127."))]
    assert not outside, outside
    print(f"submitted sweep finished in {time.monotonic() - start:.0f} s; {len(connections)} loopback connections")


def test_worker_lost_then_resume_while_the_tracking_server_restarts(stack):
    # Longer cells, no Ray retries: the cells of the dead node are recorded FAILED by the driver, and
    # `resume` runs them again from their checkpoints in S3 into their own runs.
    longer = [*TINY, "train.max_steps=400", "train.checkpoint_interval=40", "train.eval_interval=40",
              "seed=10,11,12,13", "data.num_sequences=16", "cluster.max_retries=0"]
    before = set(cell_runs(stack))  # the first test's cells
    submitted = memsweep(stack, "launch", "sweep=smoke", *stack.common, *longer, "--submit")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]

    def checkpointed_on_each_worker():
        grouped = cell_runs(stack)
        running = [r[0] for c, r in grouped.items() if c not in before and r[0].info.status == "RUNNING" and r[0].data.tags.get("memsweep.ray.node_id")]
        keys = stack.s3.keys("memsweep", "checkpoints/")
        with_checkpoint = [r for r in running if any(k.startswith(f"checkpoints/{r.data.tags['memsweep.cell_id']}/step-")
                                                     and k.endswith("COMPLETE") for k in keys)]
        return with_checkpoint if len({r.data.tags["memsweep.ray.node_id"] for r in with_checkpoint}) == 2 else None

    victims_runs = wait_for(checkpointed_on_each_worker, 180, "cells with a checkpoint on both workers", 1.0)
    worker = stack.ray.workers[0]
    os.kill(stack.ray.raylet_pid(worker), 9)  # the node dies: its raylet, then (fate-sharing) its workers
    worker.wait(60)
    # the driver records the lost cells FAILED and ends with status 1 (the Job FAILED)
    logs = wait_job(stack, job_id, timeout_s=240, expect="FAILED")
    assert re.search(r"\d+ finished, [1-9]\d* failed", logs), logs[-3000:]
    grouped = {c: r for c, r in cell_runs(stack).items() if c not in before}
    assert len(grouped) == 4
    lost = {c for c, r in grouped.items() if r[0].info.status == "FAILED"}
    assert lost and {r.data.tags["memsweep.cell_id"] for r in victims_runs} & lost

    # resume from here as a driver on the cluster (one worker left) ...
    resume = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "resume", "smoke", "tracking=server",
                               "cluster=ray", f"cluster.address={stack.ray.gcs_address}"],
                              cwd=stack.folder, env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        # ... and restart the MLflow server while its cells train
        wait_for(lambda: all(cell_runs(stack)[c][0].info.status == "RUNNING" for c in lost), 120,
                 "the resumed cells to run", 1.0)
        time.sleep(2)
        stack.mlflow.restart(down_s=4)
        output, _ = resume.communicate(timeout=300)
    finally:
        if resume.poll() is None:
            resume.kill()
    assert resume.returncode == 0, output[-4000:]
    assert "failed" in output and ", 0 failed" in output, output[-3000:]

    runs = check_finished(stack, set(grouped), cap_steps=480)  # horizons 100, 200, 400: the last ends at 480
    resumed = [runs[c].data.metrics["resumed_from_step"] for c in lost]
    assert any(step > 0 for step in resumed), resumed  # continued from a checkpoint in S3
    status = memsweep(stack, "status", "smoke", "tracking=server")
    every = cell_runs(stack)  # this launch's 4 cells and those of the stack's earlier smoke launches
    assert f"{len(every)} cells: finished {len(every)}" in status.stderr, status.stderr
    assert "note:" not in status.stderr, "no id changed since these launches"


def test_stop_ends_a_submitted_sweep_by_its_recorded_job_id(stack):
    # One long cell (far past its capacity: it cannot converge early) so the Job is still running.
    long = [o for o in TINY if not o.startswith(("train.max_steps", "train.eval_interval", "train.checkpoint"))]
    long += ["seed=30", "data.num_sequences=1024", "train.max_steps=200000", "train.eval_interval=5000",
             "train.checkpoint_interval=5000"]
    submitted = memsweep(stack, "launch", "sweep=smoke", *stack.common, *long, "--submit")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    assert "memsweep stop smoke" in submitted.stderr

    def launch_run():  # the Job's driver creates the sweep's experiment (on a first launch) and its launch run
        experiments = [e.experiment_id for e in stack.client.search_experiments()]
        return stack.client.search_runs(experiments, f"tags.`memsweep.ray_job_id` = '{job_id}'")

    launch = wait_for(launch_run, 180, "the Job's launch run to record its job id", 1.0)[0]

    stopped = memsweep(stack, "stop", "smoke", *stack.common)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.split() == [job_id] and f"stopping Ray Job {job_id}" in stopped.stderr
    from ray.job_submission import JobSubmissionClient

    assert str(JobSubmissionClient(stack.ray.dashboard_address).get_job_status(job_id).value) == "STOPPED"
    assert stack.client.get_run(launch.info.run_id).info.status == "KILLED"
    logs = JobSubmissionClient(stack.ray.dashboard_address).get_job_logs(job_id)
    assert f"MLflow: {stack.mlflow.uri}" in logs, logs[-2000:]  # where to follow it, printed by the driver
    again = memsweep(stack, "stop", "smoke", *stack.common)
    assert again.returncode == 0 and "nothing is running" in again.stderr, again.stderr
