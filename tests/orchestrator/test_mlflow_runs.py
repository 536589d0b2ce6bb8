"""MLflow runs as their users browse them (issue 17, point 1), read with the plain MlflowClient.

The session's finished smoke sweep (`smoke_root`, tests/conftest.py) is read as a user of MLflow's UI
would: unique run names from the actual shape, MLflow's system tags, only the spec as params, a
config.yaml whose `memsweep run` line reproduces the cell bit for bit, the dataset as a run input and
the checkpoint's place. A moved copy of it is resumed on the shared Ray cluster to check the tree
starts at the latest launch. A store written with the tags' old names is still read, and a text cell's
run and its reference's are linked both ways.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.tracking import Tracker
from tests.conftest import sweep_env
from tests.orchestrator.conftest import finish, memsweep

SPEC_SECTIONS = ("model", "data", "train", "precision", "seed")  # what changes a cell's numbers


def experiment_runs(client: MlflowClient, name: str, kind: str | None = None) -> list:
    experiment = client.get_experiment_by_name(name)
    where = f"tags.`memsweep.kind` = '{kind}'" if kind else ""
    return client.search_runs([experiment.experiment_id], where, max_results=1000)


@pytest.fixture(scope="module")
def smoke(smoke_root) -> tuple[MlflowClient, list, object]:
    client = MlflowClient(f"sqlite:///{smoke_root}/mlflow.db")
    (launch,) = experiment_runs(client, "smoke", "launch")
    return client, experiment_runs(client, "smoke", "cell"), launch


def test_runs_have_unique_readable_names_and_mlflows_system_tags(smoke):
    client, cells, launch = smoke
    names = [run.info.run_name for run in cells]
    assert len(set(names)) == len(cells) == 4
    for run in cells:
        cell_id = run.data.tags["memsweep.cell_id"]
        assert run.info.run_name == f"l1_d16{cell_id[len('l1_d16'):]}"  # the shape, then the id's hash
        for tags in (run.data.tags, launch.data.tags):
            assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL"
            assert tags["mlflow.source.name"].endswith("cli.py")  # the driver's entry point, not Ray's worker
            assert len(tags["mlflow.source.git.commit"]) == 40
        assert run.data.tags["memsweep.sweep"] == "smoke" and run.data.tags["memsweep.attempt"] == "1"
        assert not {"cell_id", "sweep", "code_version", "precision", "ray.task_attempt"} & set(run.data.tags)
        outside = [k for k in run.data.tags if not k.startswith(("memsweep.", "mlflow."))]
        assert not outside, f"tags outside the memsweep. namespace: {outside}"
        assert run.data.tags["memsweep.finished_by_launch"] == run.data.tags["mlflow.parentRunId"] == launch.info.run_id
    description = client.get_experiment_by_name("smoke").tags["mlflow.note.content"]
    assert "memsweep sweep `smoke`: 4 cells" in description


def test_params_are_the_spec_and_the_config_is_an_artifact(smoke, tmp_path):
    client, cells, _ = smoke
    for run in cells:
        params = run.data.params
        assert {key.split(".")[0] for key in params} == set(SPEC_SECTIONS)
        assert params["model.n_layer"] == "1" and params["precision.name"] == "fp32"
        config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text()
        header = [line for line in config.splitlines() if line.startswith("#   OMP_NUM_THREADS=1 memsweep run ")]
        assert header == [f"#   OMP_NUM_THREADS=1 {run.data.tags['memsweep.reproduce']}"]
        assert "\ncluster:\n" in config and "\ntracking:\n" in config  # where it ran: in the file, not params


def test_the_dataset_is_a_run_input_and_the_checkpoint_a_tag(smoke):
    _, cells, _ = smoke
    digests = set()
    for run in cells:
        (entry,) = run.inputs.dataset_inputs
        dataset, params = entry.dataset, run.data.params
        assert dataset.source_type == "memsweep.synthetic"
        source = json.loads(dataset.source)
        assert (source["seed"], source["num_sequences"]) == (int(params["seed"]), int(params["data.num_sequences"]))
        assert dataset.name == f"synthetic-v64-s32-n{source['num_sequences']}-seed{source['seed']}"
        assert [t.value for t in entry.tags if t.key == "mlflow.data.context"] == ["training"]
        digests.add(dataset.digest)
        checkpoint = Path(run.data.tags["memsweep.checkpoint"])
        # the final checkpoint holds the reported model, the last branch: its step is the cell's `steps`
        assert checkpoint.name == f"step-{int(run.data.metrics['steps']):09d}" and (checkpoint / "COMPLETE").is_file()
        assert run.data.metrics["steps"] == 240  # smoke: horizons 100 and 200, the last branch to 240
    assert len(digests) == 4  # seeds and sizes: four datasets


@pytest.mark.slow
def test_the_config_yaml_line_reproduces_the_cell_exactly(smoke, tmp_path):
    client, cells, _ = smoke
    run = min(cells, key=lambda r: int(r.data.params["data.num_sequences"]))
    command = shlex.split(run.data.tags["memsweep.reproduce"])
    assert command[:2] == ["memsweep", "run"]
    root = tmp_path / "runs"  # a store and checkpoints of its own: it trains from scratch
    env = {**sweep_env(root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one thread, as a Ray worker
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "-q", *command[2:]], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    (again,) = experiment_runs(MlflowClient(f"sqlite:///{root}/mlflow.db"), "adhoc", "cell")
    assert again.data.tags["memsweep.cell_id"] == run.data.tags["memsweep.cell_id"]
    assert again.data.metrics["mem_bits"] == run.data.metrics["mem_bits"]  # bit for bit
    assert again.info.run_name == run.info.run_name


def moved_copy(smoke_root: Path, runs: Path) -> None:
    """The smoke store copied elsewhere, its artifact locations rewritten to the copy (nothing the
    test writes lands in the session's store)."""
    shutil.copytree(smoke_root, runs)
    with sqlite3.connect(runs / "mlflow.db") as db:
        old, new = smoke_root.as_uri(), runs.as_uri()
        db.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (old, new))
        db.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))


def reachable(runs: list, root_id: str) -> set[str]:
    children: dict[str, list[str]] = {}
    for run in runs:
        children.setdefault(run.data.tags.get("mlflow.parentRunId"), []).append(run.info.run_id)
    seen, todo = set(), [root_id]
    while todo:
        run_id = todo.pop()
        seen.add(run_id)
        todo.extend(children.get(run_id, []))
    return seen


@pytest.mark.slow
def test_after_a_resume_every_cell_hangs_under_the_latest_launch(smoke_root, ray_cluster, tmp_path):
    runs = tmp_path / "runs"
    moved_copy(smoke_root, runs)
    client = MlflowClient(f"sqlite:///{runs}/mlflow.db")
    victim = experiment_runs(client, "smoke", "cell")[0]  # as if its worker had died: resume retrains it
    client.set_terminated(victim.info.run_id, "KILLED")
    process = memsweep(["resume", "smoke", "cluster=ray", f"cluster.address={ray_cluster.address}"], runs, tmp_path)
    output = finish(process)
    assert process.returncode == 0, output

    latest, first = experiment_runs(client, "smoke", "launch")  # newest first
    every = experiment_runs(client, "smoke")
    assert reachable(every, latest.info.run_id) == {run.info.run_id for run in every}
    assert first.data.tags["mlflow.parentRunId"] == latest.info.run_id
    assert "mlflow.parentRunId" not in latest.data.tags
    resumed = client.get_run(victim.info.run_id)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["mlflow.parentRunId"] == latest.info.run_id  # moved under the launch that reran it
    assert resumed.data.tags["memsweep.finished_by_launch"] == latest.info.run_id
    assert resumed.data.tags["memsweep.attempt"] == "2"


def test_a_store_written_with_the_old_tag_names_is_still_read(tmp_path):
    """Runs recorded before the tags moved under `memsweep.` (cell_id, sweep, code_version)."""
    from orchestrator.aggregate import current_runs
    from orchestrator.tracking import read_runs

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "artifacts"))
    exp_id = tracker.experiment_id("old")
    old = {"memsweep.kind": "cell", "sweep": "old", "code_version": "0.1.0"}
    done = tracker.client.create_run(exp_id, run_name="done", tags={**old, "cell_id": "cell-done"}).info.run_id
    tracker.finish(done)
    failed = tracker.client.create_run(exp_id, run_name="failed", tags={**old, "cell_id": "cell-failed"}).info.run_id
    tracker.fail(failed, "RuntimeError: boom")

    assert tracker.finished_cells("old") == {"cell-done"}
    assert tracker.cell_records("old")["cell-failed"].error == "RuntimeError: boom"
    assert set(current_runs(read_runs(tracker, "old"))) == {"cell-done", "cell-failed"}
    assert tracker.open_cell_run("old", "cell-done", "x", tags={}) == (done, True)
    assert tracker.open_cell_run("old", "cell-failed", "x", tags={}) == (failed, False)  # reopened, not doubled
    tags = tracker.client.get_run(failed).data.tags
    assert (tags["memsweep.cell_id"], tags["memsweep.attempt"], tags["cell_id"]) == ("cell-failed", "2", "cell-failed")
    assert len(tracker.client.search_runs([exp_id])) == 2


def test_a_text_cell_and_its_reference_link_both_ways(memsweep_root):
    """What a text cell's run records before it trains (nothing is trained here)."""
    from orchestrator.cell import _open_run, reproduce_overrides
    from orchestrator.compose import compose_cell, prepared
    from orchestrator.corpus import REFERENCE_EXPERIMENT, reference_cell

    cell = prepared([compose_cell(["data=text", "data.seq_len=40", "data.num_sequences=16", "model.n_layer=2",
                                   "model.n_embd=24", "model.n_head=2"])])[0]
    assert cell.run_name.startswith("l2_d24-text-") and cell.cell_id.startswith("l1_d16-text-")
    again = prepared([compose_cell(reproduce_overrides(cell))])[0]  # the reproducing line composes the same cell
    assert again.cell_id == cell.cell_id and again.spec == cell.spec

    tracker = Tracker(cell.options.tracking_uri, cell.options.artifact_root)
    reference = reference_cell(cell)
    ref_run, _ = _open_run(reference, tracker, None, None)
    run_id, _ = _open_run(cell, tracker, None, None)
    tags = tracker.client.get_run(run_id).data.tags
    assert (tags["memsweep.reference_cell_id"], tags["memsweep.reference_run_id"]) == (reference.cell_id, ref_run)
    assert tracker.client.get_run(ref_run).data.tags[f"memsweep.reference_for.{cell.cell_id}"] == run_id
    (entry,) = tracker.client.get_run(run_id).inputs.dataset_inputs
    source = json.loads(entry.dataset.source)
    assert entry.dataset.source_type == "memsweep.corpus"
    assert source["uri"] == "memsweep:shakespeare_sample.txt"
    assert source["tokenizer_hash"] == cell.spec.data.tokenizer_hash
    for name in ("adhoc", REFERENCE_EXPERIMENT):
        assert tracker.client.get_experiment_by_name(name).tags["mlflow.note.content"]
