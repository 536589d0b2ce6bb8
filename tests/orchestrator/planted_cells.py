"""Cells with planted numbers, run through the real scheduler and store: what the adaptive sweep's tests
drive instead of training.

`run` is a cell runner (orchestrator.scheduler.cell_runner's "module:function"): orchestrator.cell.run_cell
with `measure` standing in for training. Its scores are real measure.cell.Scores, measured by
measure_cell, such that the cell memorizes mem_bits = min(ALPHA * params, H(X)) exactly (every member
coded PER_MEMBER bits under uniform, non-members at uniform), converges, and trained STEPS steps.

    python -m tests.orchestrator.planted_cells KILL_AT OVERRIDES...

drives an adaptive sweep with this runner and kills itself (SIGKILL) when batch KILL_AT is about to
run: a driver killed between rounds, for the resume test.
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np

from measure.cell import Scores, measure_cell, training_metrics
from measure.memorization import predicted_mem_bits
from models.data import mia_member_subset
from models.progress import TrainResult

RUNNER = "tests.orchestrator.planted_cells:run"
ALPHA = 2.0  # planted bits per parameter: l1_d16 holds 9,728 bits (50.7 sequences), l2_d16 16,288 (84.8)
STEPS = 100


def planted_measure(cell, log=None, progress=None):
    """train_and_measure's stand-in: the cell's measurement with mem_bits = min(ALPHA * params, H(X))."""
    from orchestrator.cell import cell_shape

    spec = cell.spec
    data = spec.data
    mem_bits = predicted_mem_bits(ALPHA, spec.params, data.entropy_bits)
    members = np.full(data.num_sequences, data.sequence_bits - mem_bits / data.num_sequences)
    nonmembers = np.full(data.num_nonmembers, data.sequence_bits)
    scores = Scores(members, nonmembers, mia_member_subset(data, spec.seed))
    measurement = measure_cell(cell_shape(spec), scores)
    result = TrainResult(model=None, steps=STEPS, converged=True, resumed_from_step=0, wall_s=0.01, tokens_per_s=1.0)
    measurement.metrics.update(training_metrics(result, data.num_sequences, spec.train.batch_size))
    return measurement, None


def run(cell, *, parent_run_id=None, tags=None, reference=None):
    from orchestrator.cell import run_cell

    return run_cell(cell, parent_run_id=parent_run_id, tags=tags, reference=reference, measure=planted_measure)


def run_batches(plan, kill_at: int | None = None):
    """A `run` for orchestrator.adaptive.drive: each batch through launch.run_plan with the planted
    runner; the process kills itself as batch `kill_at` is about to run."""
    from orchestrator.launch import run_plan

    batches = []

    def run_batch(cells) -> int:
        batches.append([c.cell_id for c in cells])
        if len(batches) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        outcomes = run_plan(plan, cells, runner=RUNNER)
        return int(any(o.status != "FINISHED" for o in outcomes))

    run_batch.batches = batches
    return run_batch


def main(argv: list[str]) -> int:
    from orchestrator.adaptive import drive, plan_options
    from orchestrator.launch import make_plan

    kill_at, overrides = int(argv[0]), argv[1:]
    plan = make_plan(overrides)
    return drive(plan, plan_options(plan.cells), run_batches(plan, kill_at))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
