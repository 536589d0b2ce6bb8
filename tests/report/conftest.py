"""A damaged copy of the session's smoke sweep (`smoke_root`, tests/conftest.py).

`broken_root` copies that store and adds what real sweeps accumulate: a grown grid (a launch recorded
with seeds 0-3 whose new cells never ran), one cell that FAILED with an error, and one left RUNNING
with part of its curve.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import sweep_env  # noqa: F401 - the report tests import it from here


@pytest.fixture(scope="session")
def broken_root(smoke_root, tmp_path_factory) -> dict:
    """A copy of the smoke store with a grown grid (seeds 0-3): seed 2, N=16 FAILED; seed 3, N=16
    RUNNING (two evaluations logged); seed 2 and 3 at N=64 PENDING (never started)."""
    from orchestrator.compose import load_sweep
    from orchestrator.plan import record_plan
    from orchestrator.tracking import TAG_OVERRIDES
    from orchestrator.tracking import TAG_SWEEP, Tracker

    runs = tmp_path_factory.mktemp("broken") / "runs"
    runs.mkdir()
    shutil.copy(smoke_root / "mlflow.db", runs / "mlflow.db")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEMSWEEP_ROOT", str(runs))
        overrides = ["sweep=smoke", "seed=0,1,2,3"]
        cells = {(c.spec.seed, c.spec.data.num_sequences): c for c in load_sweep(overrides).cells}
        first = cells[(0, 16)]
        tracker = Tracker(first.options.tracking_uri, first.options.artifact_root)
        # What `memsweep launch sweep=smoke seed=0,1,2,3` records before it submits anything.
        launch = tracker.start_launch("smoke", "smoke", {"overrides": " ".join(overrides), "num_cells": len(cells)})
        tracker.set_tags(launch, {TAG_OVERRIDES: json.dumps(overrides)})
        record_plan(tracker, launch, list(cells.values()))
        failed, running = cells[(2, 16)], cells[(3, 16)]
        states = {}
        for cell in (failed, running):
            run_id, _ = tracker.open_cell_run("smoke", cell.cell_id, cell.spec.slug,
                                              {TAG_SWEEP: "smoke", "precision": cell.spec.precision}, launch)
            tracker.log_params(run_id, cell.recorded_params())
            tracker.log_metrics(run_id, [("train_loss_bits_per_token", 5.5, 100), ("mem_bits", 120.0, 100),
                                         ("train_loss_bits_per_token", 4.5, 200), ("mem_bits", 480.0, 200)])
            states[cell.cell_id] = run_id
        tracker.fail(states[failed.cell_id], "RuntimeError: CUDA out of memory (planted by the test)\nTraceback ...")
    return {
        "runs": runs, "launch_run_id": launch,
        "failed": failed.cell_id, "running": running.cell_id,
        "pending": [cells[(2, 64)].cell_id, cells[(3, 64)].cell_id],
        "finished": [cells[(s, n)].cell_id for s in (0, 1) for n in (16, 64)],
        "order": [c.cell_id for c in cells.values()],
    }
