"""Sweeps on a real multi-node Ray cluster (127.0.0.1) recording into a real MLflow store.

Covers the failure model of DESIGN.md: a worker node removed mid-sweep, the driver killed, Ctrl-C, a
cell that raises, and many cells finishing at once into the default SQLite store.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.compose import ConfigError, load_sweep
from orchestrator.launch import make_plan, run_plan
from orchestrator.scheduler import task_name
from orchestrator.tracking import Tracker
from tests.orchestrator.conftest import finish, memsweep, wait_until

pytestmark = pytest.mark.slow

SMOKE = ["sweep=smoke"]


class Quiet:
    """A sweep display that records instead of drawing."""

    def __init__(self):
        self.finished = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def update(self, done, failed, running, pending):
        assert done + failed + pending <= 64 and running <= pending

    def cell_done(self, outcome, elapsed_s):
        self.finished.append(outcome)


def on_cluster(cluster) -> list[str]:
    return ["cluster=ray", f"cluster.address={cluster.address}"]


def cell_runs(root, experiment: str, include_deleted: bool = False) -> dict[str, list]:
    """Every cell run of an experiment in the store under `root`, grouped by cell id."""
    tracker = Tracker(f"sqlite:///{root}/mlflow.db")
    tracker.ensure_store()  # opens the store under its lock, as every memsweep process does
    client = tracker.client
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    view = 3 if include_deleted else 1  # ViewType.ALL / ACTIVE_ONLY
    runs = client.search_runs([exp.experiment_id], "tags.`memsweep.kind` = 'cell'", run_view_type=view,
                              max_results=1000)
    grouped: dict[str, list] = {}
    for run in runs:
        grouped.setdefault(run.data.tags["memsweep.cell_id"], []).append(run)
    return grouped


def assert_one_finished_run_each(root, experiment: str, cell_ids) -> dict:
    runs = cell_runs(root, experiment)
    assert set(runs) == set(cell_ids)
    for cell_id, found in runs.items():
        assert len(found) == 1, f"{cell_id} has {len(found)} runs"
        assert found[0].info.status == "FINISHED", (cell_id, found[0].info.status, found[0].data.tags)
    return {cell_id: found[0] for cell_id, found in runs.items()}


# -- expansion ------------------------------------------------------------------------------------------
def test_grid_of_24_cells_with_stable_ids():
    grid = ["sweep=smoke", "model=l1_d16,l2_d16", "data.num_sequences=16,32,64", "precision=fp32,bf16",
            "seed=0,1"]
    cells = load_sweep(grid).cells
    assert len(cells) == 24
    assert len({c.cell_id for c in cells}) == 24
    assert [c.cell_id for c in load_sweep(grid).cells] == [c.cell_id for c in cells]  # stable order too
    # The command line replaced the file's axes (the smoke file sweeps 16,64 sequences and seeds 0,1).
    assert {c.spec.data.num_sequences for c in cells} == {16, 32, 64}
    assert {c.spec.precision for c in cells} == {"fp32", "bf16"}


def test_ids_hash_typed_values_not_paths_or_resources(tmp_path):
    base = ["sweep=smoke", "seed=0", "data.num_sequences=16"]
    reference = load_sweep(base + ["train.lr=1e-3"]).cells[0]
    assert load_sweep(base + ["train.lr=0.001"]).cells[0].cell_id == reference.cell_id
    runtime_only = [
        f"root_dir={tmp_path}", f"storage={tmp_path}/elsewhere", "tracking=server", "cluster=ray",
        "cluster.address=10.0.0.1:6379", "cluster.cpus_per_cell=2", "cluster.gpu_memory_gb=16",
        "device=cpu", "eval_batch_size=7",
    ]
    moved = load_sweep(base + ["train.lr=0.001", *runtime_only]).cells[0]
    assert moved.cell_id == reference.cell_id
    assert moved.options != reference.options
    assert load_sweep(base + ["train.lr=0.002"]).cells[0].cell_id != reference.cell_id


def test_golden_cell_ids():
    """Changing what a cell id hashes silently orphans every recorded run: this pins the scheme."""
    cells = {c.spec.seed: c.cell_id for c in load_sweep(["sweep=smoke", "data.num_sequences=16"]).cells}
    # Moved on purpose by issue 25: the recipe's schedule (branches) and its first_branch and
    # asymptote_from are typed values of the spec, so cells of the new recipe are new cells.
    assert cells == {
        0: "l1_d16-v64-s32-n16-fp32-seed0-c5e2343f34",
        1: "l1_d16-v64-s32-n16-fp32-seed1-3376f86dac",
    }


def test_glob_and_range_expand_like_multirun():
    cells = load_sweep(["sweep=smoke", "model=glob(l1_d*,exclude=[l1_d128,l1_d256,l1_d64])",
                        "data.num_sequences=range(10,40,10)", "seed=0"]).cells
    assert sorted({c.spec.model.name for c in cells}) == ["l1_d16", "l1_d32"]
    assert sorted({c.spec.data.num_sequences for c in cells}) == [10, 20, 30]


def test_a_grid_with_one_invalid_cell_is_refused_before_anything_runs(sweep_root, tmp_path):
    process = memsweep(["launch", "sweep=smoke", "data.num_sequences=16,0"], sweep_root, tmp_path)
    output = finish(process, 120)
    assert process.returncode == 2, output
    assert "data.num_sequences=0 must be positive" in output
    assert re.search(r"cell \[[^\]]*data\.num_sequences=0[^\]]*\]", output), output  # names the cell
    assert not (sweep_root / "mlflow.db").exists()  # nothing recorded, nothing submitted
    with pytest.raises(ConfigError, match=r"model.n_head=3 does not divide model.n_embd=16"):
        load_sweep(["sweep=smoke", "model.n_head=2,3"])


# -- distribution and failures ------------------------------------------------------------------------
def test_a_cell_no_node_of_a_fixed_cluster_holds_is_refused_before_any_run(ray_cluster, sweep_root, tmp_path):
    """The shared cluster's nodes are fixed (its head's autoscaler has no node type to launch): a cell
    whose memory estimate exceeds every node's memory (a billion sequences: about 240 GiB) is refused in
    one line, exit 2, once the autoscaler has passed on it, and nothing is recorded (on cluster=ray the
    driver learns the nodes' sizes only by joining the cluster)."""
    process = memsweep(["launch", *SMOKE, *on_cluster(ray_cluster), "seed=0", "data.num_sequences=1000000000"],
                       sweep_root, tmp_path)
    output = finish(process, 180)
    assert process.returncode == 2, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "of the cluster can provide {CPU: 1, memory: 2" in errors[0], output
    assert "Traceback" not in output
    assert cell_runs(sweep_root, "smoke") == {}


def test_the_submission_window_follows_the_cluster(ray_driver):
    """Four times the tasks the cluster runs at once (the two 4-CPU workers: 8 one-CPU cells), at least
    16, or what cluster.max_in_flight says; GPU clusters count max_cells_per_gpu tasks a GPU."""
    from orchestrator.resources import ClusterOptions
    from orchestrator.scheduler import MIN_IN_FLIGHT, in_flight_limit

    assert in_flight_limit(ClusterOptions(), on_gpu=False) == 4 * 8
    assert in_flight_limit(ClusterOptions(cpus_per_cell=4), on_gpu=False) == MIN_IN_FLIGHT  # 4 x 2 slots
    assert in_flight_limit(ClusterOptions(max_in_flight=3), on_gpu=False) == 3


def test_smoke_sweep_runs_on_both_workers(ray_driver, sweep_root):
    plan = make_plan(SMOKE + on_cluster(ray_driver) + ["seed=0,1,2,3"])
    display = Quiet()
    outcomes = run_plan(plan, plan.cells, display=display)
    assert [o.status for o in outcomes] == ["FINISHED"] * 8
    runs = assert_one_finished_run_each(sweep_root, "smoke", [c.cell_id for c in plan.cells])
    nodes = {run.data.tags["memsweep.ray.node_id"] for run in runs.values()}
    workers = {node.node_id for node in ray_driver.workers}
    assert nodes == workers, "every cell ran on a worker node, and both workers ran cells"
    # Ray's task names are per shape, not per cell: the driver keeps state for every name it has seen.
    names = {run.data.tags["memsweep.ray.task_name"] for run in runs.values()}
    assert names == {f"cell:{task_name(plan.cells[0].spec)}"} == {"cell:l1_d16-v64-s32-fp32"}, names
    assert all("mem_bits" in run.data.metrics for run in runs.values())
    # Launching again skips everything: the tracker knows the cells finished.
    again = make_plan(SMOKE + on_cluster(ray_driver) + ["seed=0,1,2,3"])
    assert all(again.state(c) == "FINISHED" for c in again.cells)


def test_worker_node_removed_mid_sweep(ray_cluster, sweep_root, tmp_path):
    """The cells on a node that dies are retried elsewhere and continue from their checkpoints inside
    their own runs; no cell gets a second run. Submission is windowed (3 tasks at a time for 6 cells:
    the node dies while the rest wait their turn), and every cell still finishes exactly once."""
    doomed = ray_cluster.add_node(num_cpus=4, object_store_memory=100 * 1024**2, node_ip_address="127.0.0.1")
    ray_cluster.wait_for_nodes()
    overrides = SMOKE + on_cluster(ray_cluster) + [
        "seed=0,1,2,3,4,5", "data.num_sequences=64", "train.max_steps=2000", "train.checkpoint_interval=100",
        "train.eval_interval=500", "cluster.max_in_flight=3",
    ]
    driver = memsweep(["launch", *overrides], sweep_root, tmp_path)
    checkpoints = sweep_root / "checkpoints"
    most_running = []

    def cell_checkpointed_on_doomed_node():
        grouped = cell_runs(sweep_root, "smoke")
        most_running.append(sum(runs[0].info.status == "RUNNING" for runs in grouped.values()))
        for cell_id, runs in grouped.items():
            run = runs[0]
            if run.data.tags.get("memsweep.ray.node_id") == doomed.node_id and run.info.status == "RUNNING":
                if list((checkpoints / cell_id).glob("step-*/COMPLETE")):
                    return cell_id, run.info.run_id
        return None

    victim, victim_run = wait_until(cell_checkpointed_on_doomed_node, 240, what="a checkpoint on the doomed node")
    ray_cluster.remove_node(doomed, allow_graceful=False)
    output = finish(driver, 480)
    assert driver.returncode == 0, output
    cells = [c.cell_id for c in load_sweep(overrides).cells]
    runs = assert_one_finished_run_each(sweep_root, "smoke", cells)
    assert runs[victim].info.run_id == victim_run, "the retried cell continued its own run"
    assert runs[victim].data.metrics["resumed_from_step"] > 0, "it resumed from a checkpoint, not step 0"
    assert runs[victim].data.tags["memsweep.ray.node_id"] != doomed.node_id
    assert max(most_running) <= 3, f"more cells ran at once than the window holds: {most_running}"


def test_driver_killed_then_resume_runs_only_unfinished_cells(ray_cluster, sweep_root, tmp_path):
    overrides = SMOKE + on_cluster(ray_cluster) + ["seed=0,1,2,3,4,5,6,7,8,9", "train.max_steps=600"]
    cells = [c.cell_id for c in load_sweep(overrides).cells]
    driver = memsweep(["launch", *overrides], sweep_root, tmp_path)

    def some_finished():
        runs = cell_runs(sweep_root, "smoke")
        finished = {c for c, r in runs.items() if r[0].info.status == "FINISHED"}
        return finished if 0 < len(finished) < len(cells) else None

    finished_before = wait_until(some_finished, 240, interval_s=0.2, what="some cells finished")
    driver.kill()  # SIGKILL: no chance to clean up
    driver.wait(30)
    finished_before = {c for c, r in cell_runs(sweep_root, "smoke").items() if r[0].info.status == "FINISHED"}
    assert len(finished_before) < len(cells)

    resume = memsweep(["resume", "smoke", *on_cluster(ray_cluster)], sweep_root, tmp_path)
    output = finish(resume, 300)
    assert resume.returncode == 0, output
    submitted = int(re.search(r"submitting (\d+)", output).group(1))
    assert submitted == len(cells) - len(finished_before)
    for cell_id in finished_before:
        assert cell_id not in output.split("submitting")[1], f"{cell_id} finished before, yet ran again"
    assert_one_finished_run_each(sweep_root, "smoke", cells)


def test_ctrl_c_cancels_and_marks_killed(ray_cluster, sweep_root, tmp_path):
    # Cells that cannot finish before the interrupt: a cosine schedule is measured for convergence only
    # at max_steps, so nothing stops early (a small dataset is memorized in seconds otherwise).
    overrides = SMOKE + on_cluster(ray_cluster) + ["seed=0,1", "train.max_steps=20000", "train.eval_interval=1000",
                                                   "train.schedule=cosine"]
    driver = memsweep(["launch", *overrides], sweep_root, tmp_path)
    wait_until(lambda: len([r for r in cell_runs(sweep_root, "smoke").values() if r[0].info.status == "RUNNING"]) == 4,
               240, what="four running cells")
    driver.send_signal(signal.SIGINT)
    output = finish(driver, 120)
    assert driver.returncode == 130, output
    runs = cell_runs(sweep_root, "smoke")
    assert {r[0].info.status for r in runs.values()} == {"KILLED"}, output
    status = subprocess.run(["memsweep", "status", "smoke", *on_cluster(ray_cluster)], capture_output=True,
                            text=True, env={**os.environ, "MEMSWEEP_ROOT": str(sweep_root)}, cwd=tmp_path)
    assert status.stdout.count("KILLED") >= 4, status.stdout


def test_failed_cell_is_recorded_listed_and_retried_alone(ray_cluster, sweep_root, tmp_path):
    overrides = SMOKE + on_cluster(ray_cluster) + ["seed=0,1"]
    cells = load_sweep(overrides).cells
    broken = cells[1].cell_id
    blocker = sweep_root / "checkpoints" / broken
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the cell's checkpoint folder belongs")  # storage fault for one cell

    launch = memsweep(["launch", *overrides], sweep_root, tmp_path)
    output = finish(launch, 300)
    assert launch.returncode == 1, output  # a failed cell makes the launch exit non-zero...
    runs = cell_runs(sweep_root, "smoke")
    assert runs[broken][0].info.status == "FAILED"
    assert runs[broken][0].data.tags["memsweep.error"]
    assert sum(r[0].info.status == "FINISHED" for r in runs.values()) == 3  # ...and the sweep went on

    env = {**os.environ, "MEMSWEEP_ROOT": str(sweep_root)}
    status = subprocess.run(["memsweep", "status", "smoke", *on_cluster(ray_cluster)], capture_output=True,
                            text=True, env=env, cwd=tmp_path)
    failed_line = next(line for line in status.stdout.splitlines() if broken in line)
    assert "FAILED" in failed_line and "Error" in failed_line, status.stdout

    blocker.unlink()
    resume = memsweep(["resume", "smoke", "--failed", *on_cluster(ray_cluster)], sweep_root, tmp_path)
    output = finish(resume, 300)
    assert resume.returncode == 0, output
    assert "submitting 1" in output and broken in output
    after = assert_one_finished_run_each(sweep_root, "smoke", [c.cell_id for c in cells])
    assert after[broken].info.run_id == runs[broken][0].info.run_id  # the same run, now FINISHED
    assert "memsweep.error" not in after[broken].data.tags


def test_eight_cells_finishing_at_once_lose_nothing(ray_driver, sweep_root):
    """Eight cells of identical length finish together and write into the default SQLite store."""
    plan = make_plan(SMOKE + on_cluster(ray_driver) + ["seed=0,1,2,3,4,5,6,7", "data.num_sequences=16",
                                                       "train.max_steps=40", "train.eval_interval=20"])
    assert len(plan.cells) == 8 and plan.tracker.uri.startswith("sqlite:///")
    display = Quiet()
    outcomes = run_plan(plan, plan.cells, display=display)
    assert [o.status for o in outcomes] == ["FINISHED"] * 8, [o.error for o in outcomes]
    assert all(o.metrics == {} for o in outcomes)  # returned without metrics: the display showed them
    runs = assert_one_finished_run_each(sweep_root, "smoke", [c.cell_id for c in plan.cells])
    client = MlflowClient(plan.tracker.uri)
    for cell_id, run in runs.items():
        outcome = next(o for o in display.finished if o.cell_id == cell_id)  # as the worker returned it
        assert run.data.metrics["mem_bits"] == pytest.approx(outcome.metrics["mem_bits"], rel=0, abs=0)
        # + the step curves that are not final metrics: the train loss and each branch's annealed values
        curves_only = {"train_loss_bits_per_token", "annealed_mem_bits", "annealed_exposures"}
        assert set(run.data.metrics) == set(outcome.metrics) | curves_only
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml", "per_sequence.parquet"]


def test_a_packed_sweep_records_each_cell_as_the_unpacked_sweep_does(ray_driver, tmp_path, monkeypatch):
    """Packs of compatible cells run as one Ray task each, yet every cell keeps its own FINISHED run,
    and the numbers equal those of the same cells trained one per task."""
    grid = SMOKE + on_cluster(ray_driver) + ["seed=0,1,2", "train.max_steps=120", "train.eval_interval=40"]
    results = {}
    for mode, extra in {"packed": ["pack.fill_workers=false", "pack.max_cells=4"],
                        "unpacked": ["pack.enabled=false"]}.items():
        root = tmp_path / mode
        monkeypatch.setenv("MEMSWEEP_ROOT", str(root))
        plan = make_plan(grid + extra)
        outcomes = run_plan(plan, plan.cells, display=Quiet())
        assert [o.status for o in outcomes] == ["FINISHED"] * 6, [o.error for o in outcomes]
        runs = assert_one_finished_run_each(root, "smoke", [c.cell_id for c in plan.cells])
        results[mode] = {cell_id: run.data.metrics for cell_id, run in runs.items()}
        tasks = {run.data.tags["memsweep.ray.task_id"] for run in runs.values()}
        assert len(tasks) == (2 if mode == "packed" else 6), tasks  # 6 cells in packs of at most 4
    for cell_id, metrics in results["unpacked"].items():
        packed = results["packed"][cell_id]
        for key in ("mem_bits", "loss_auc", "test_nll_bits_per_token", "steps"):
            assert packed[key] == metrics[key], (cell_id, key)
