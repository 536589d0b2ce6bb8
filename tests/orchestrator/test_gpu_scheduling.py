"""The GPU branch of the scheduler, end to end through `memsweep launch`, on an embedded Ray cluster
that declares one GPU (`cluster.num_gpus=1`). The GPU is simulated: this machine has none, so Ray
hands out the declared GPU's id and fractions while the cells train on the CPU (device=auto). What is
real: the requests memsweep computes (1/16 of a GPU per tiny cell, a pack's fractions summed), Ray
placing several cells on the one GPU at once, and every cell's run recording what it was granted."""

from __future__ import annotations

import json

import pytest

from orchestrator.compose import load_sweep
from tests.orchestrator.conftest import finish, memsweep
from tests.orchestrator.test_sweeps import assert_one_finished_run_each

pytestmark = pytest.mark.slow

GRID = ["sweep=smoke", "cluster.num_gpus=1", "cluster.num_cpus=4", "seed=0,1", "train.max_steps=200",
        "train.eval_interval=50", "train.schedule=cosine"]


def launch(root, tmp_path, *extra) -> dict:
    process = memsweep(["launch", *GRID, *extra], root, tmp_path)
    output = finish(process, timeout_s=300)
    assert process.returncode == 0, output
    return assert_one_finished_run_each(root, "smoke", [c.cell_id for c in load_sweep([*GRID, *extra]).cells])


def test_cells_share_one_gpu_through_fractional_requests(tmp_path):
    runs = launch(tmp_path / "unpacked", tmp_path, "pack.enabled=false")
    assert len(runs) == 4
    for run in runs.values():
        tags = run.data.tags
        assert tags["memsweep.ray.gpu_ids"] == "0"
        assert json.loads(tags["memsweep.ray.resources"])["GPU"] == pytest.approx(1 / 16)
        assert "memsweep.pack_size" not in tags
    spans = [(r.info.start_time, r.info.end_time) for r in runs.values()]
    together = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    assert together >= 2, f"the cells ran one at a time on the shared GPU: {spans}"

    packed = launch(tmp_path / "packed", tmp_path)  # packing on: one GPU, so one pack of the 4 cells
    assert len({r.data.tags["memsweep.ray.task_id"] for r in packed.values()}) == 1
    for cell_id, run in packed.items():
        assert run.data.tags["memsweep.pack_size"] == "4"
        assert json.loads(run.data.tags["memsweep.ray.resources"])["GPU"] == pytest.approx(4 / 16)
        assert run.data.metrics["mem_bits"] == runs[cell_id].data.metrics["mem_bits"]  # same numbers
