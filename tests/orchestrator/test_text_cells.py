"""Text cells end to end on the shared multi-node Ray cluster (127.0.0.1) with a real MLflow store.

One sweep over the shipped Shakespeare sample trains a reference model (l1_d16 on the whole pool) and
two cells against it: a pool the model memorizes (16 sequences) and the whole pool (many times its
capacity). The reference's worker process is killed mid-training. The test then checks docs/science.md's text
numbers and issue 5's acceptance: one reference run, dependents started after it finished, positive
unintended memorization and AUC near 1 on the tiny pool, AUC near 0.5 and extraction on training
sequences near the test rate on the whole pool, and the per-sequence artifact reproducing the metrics.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from measure.mia import mia_metrics
from orchestrator.compose import ConfigError, load_sweep
from orchestrator.corpus import REFERENCE_EXPERIMENT
from orchestrator.launch import make_plan, pending_references
from orchestrator.report import report
from tests.orchestrator.conftest import finish, memsweep, wait_until
from tests.orchestrator.test_sweeps import assert_one_finished_run_each, cell_runs, on_cluster

pytestmark = pytest.mark.slow

TEXT = ["sweep=text_small", "data.seq_len=40", "data.num_nonmembers=128", "data.num_test=128",
        "train.max_steps=600", "train.eval_interval=100", "train.checkpoint_interval=50"]
TINY, WHOLE = 16, 2000  # pool sizes: memorizable, and many times l1_d16's capacity (~20 K bits)


def test_reference_first_survives_a_killed_worker_and_text_metrics_behave(ray_cluster, sweep_root, tmp_path):
    overrides = TEXT + on_cluster(ray_cluster) + [f"data.num_sequences={TINY},{WHOLE}"]
    cells = load_sweep(overrides).cells
    reference = cells[0].spec.reference
    assert {c.spec.reference for c in cells} == {reference}, "one reference serves every cell"
    assert reference.data.num_sequences >= WHOLE
    driver = memsweep(["launch", *overrides], sweep_root, tmp_path)
    checkpoints = sweep_root / "checkpoints"

    def reference_checkpointed():
        runs = cell_runs(sweep_root, REFERENCE_EXPERIMENT).get(reference.cell_id)
        if runs and runs[0].info.status == "RUNNING" and list((checkpoints / reference.cell_id).glob("step-*/COMPLETE")):
            return runs[0]
        return None

    running = wait_until(reference_checkpointed, 300, interval_s=0.2, what="the reference's first checkpoint")
    assert not cell_runs(sweep_root, "text_small"), "a dependent started before its reference finished"
    os.kill(int(running.data.tags["memsweep.ray.worker_pid"]), signal.SIGKILL)  # Ray retries the task
    output = finish(driver, 600)
    assert driver.returncode == 0, output

    refs = assert_one_finished_run_each(sweep_root, REFERENCE_EXPERIMENT, [reference.cell_id])
    ref_run = refs[reference.cell_id]
    assert ref_run.info.run_id == running.info.run_id, "the retried reference continued its own run"
    assert ref_run.data.metrics["resumed_from_step"] > 0
    runs = assert_one_finished_run_each(sweep_root, "text_small", [c.cell_id for c in cells])
    for run in runs.values():
        assert run.info.start_time >= ref_run.info.end_time, "a dependent started before the reference ended"

    tiny = runs[cells[0].cell_id].data.metrics
    whole = runs[cells[1].cell_id].data.metrics
    print({"tiny": tiny, "whole": whole, "reference": ref_run.data.metrics})  # shown when an assertion fails
    assert tiny["mem_bits"] > 0 and tiny["mem_bits_per_sequence"] > 20
    assert tiny["loss_auc"] > 0.95 and tiny["reference_auc"] > 0.95
    assert whole["loss_auc"] < 0.65 and whole["reference_auc"] < 0.65, whole
    assert tiny["mem_bits_per_sequence"] > 5 * whole["mem_bits_per_sequence"]
    for prefix in (8, 16, 32):
        assert tiny[f"extract_train_p{prefix}"] > tiny[f"extract_test_p{prefix}"] + 0.5
        assert abs(whole[f"extract_train_p{prefix}"] - whole[f"extract_test_p{prefix}"]) < 0.05
    assert whole["test_nll_bits_per_token"] < tiny["test_nll_bits_per_token"], "more data generalizes better"

    # The per-sequence artifact reproduces the numbers offline.
    client = MlflowClient(f"sqlite:///{sweep_root}/mlflow.db")
    table = pq.read_table(client.download_artifacts(runs[cells[0].cell_id].info.run_id, "per_sequence.parquet",
                                                    str(tmp_path))).to_pandas()
    members, nonmembers = table[table.split == "member"], table[table.split == "nonmember"]
    assert len(members) == TINY and len(table[table.split == "test"]) == 128
    unintended = np.maximum(0, members.reference_nll_bits - members.nll_bits)
    assert unintended.sum() == pytest.approx(tiny["mem_bits"], rel=1e-9)
    in_mia = members[members.in_mia]
    auc = mia_metrics(-in_mia.nll_bits, -nonmembers[nonmembers.in_mia].nll_bits).auc
    assert auc == pytest.approx(tiny["loss_auc"])
    extracted = (members[members.in_mia].correct_tail >= 40 - 8).mean()
    assert extracted == pytest.approx(tiny["extract_train_p8"])

    # The report draws the text figures from the real runs.
    result = report("text_small", [], None)
    assert {"text_mem_vs_num_sequences", "text_mia_extraction", "text_test_loss_vs_capacity_ratio"} <= set(result.figure_paths)
    assert all(result.figure_paths[name].stat().st_size > 10_000 for name in result.figure_paths)
    html = result.html_path.read_text()
    assert html.count('id="text_') == 3

    # Another sweep of this store asking for the same reference reuses it.
    plan = make_plan(TEXT + on_cluster(ray_cluster) + ["data.num_sequences=64", "seed=3"])
    assert plan.cells[0].spec.reference == reference
    assert pending_references(plan, plan.cells) == []
    again = finish(memsweep(["launch", *overrides], sweep_root, tmp_path), 120)
    assert "nothing to run" in again


def test_corpus_problems_stop_the_launch_before_anything_runs(tmp_path, sweep_root):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("Too short for one sequence.\n")
    cases = {
        f"data.corpus_uri={tmp_path}/missing.txt": "no such file",
        f"data.corpus_uri={empty}": "empty",
        f"data.corpus_uri={short}": "shorter than data.seq_len=64",
        "data.corpus_uri=memsweep:nope.txt": "no such shipped corpus",
        "data.num_sequences=5000": "data.num_sequences=5000",
        "data.reference.num_sequences=5000": "data.reference.num_sequences=5000",
        "data.reference.n_layer=2": "give all of n_layer, n_head and n_embd",
        "data.num_test=2000": "data.num_nonmembers=256, data.num_test=2000",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as err:
            load_sweep(["sweep=text_small", override])
        assert message in str(err.value), (override, str(err.value))
        assert "cell [" in str(err.value), "the message names the cell"
    # Through the command: exit 2, one line naming the field, nothing recorded.
    launch = memsweep(["launch", "sweep=text_small", f"data.corpus_uri={empty}"], sweep_root, tmp_path)
    output = finish(launch, 120)
    assert launch.returncode == 2, output
    assert "data.corpus_uri" in output and "empty" in output
    assert not (sweep_root / "mlflow.db").exists()
