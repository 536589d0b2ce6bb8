"""The README's main job as a benchmark: `memsweep launch sweep=laptop` on this machine.

    python -m bench.laptop_sweep [--root DIR] [--budget-s 600]

Runs the laptop sweep into a fresh store, then checks what the sweep is for: for each shape, the
largest dataset sizes (those holding more bits than the shape stores) agree on mem_bits within 15%
(the capacity plateau), and the sweep finished within the budget. Prints the figures, writes them to
bench/results/laptop_sweep-<time>.json, and exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

PLATEAU_TOLERANCE = 0.15
LARGEST = 3  # the largest dataset sizes of each shape compared on the plateau


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="MEMSWEEP_ROOT for the run (default: a new temporary folder)")
    parser.add_argument("--budget-s", type=float, default=600.0)
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="laptop-sweep-"))
    env = {**os.environ, "MEMSWEEP_ROOT": str(root)}

    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "orchestrator.cli", "launch", "sweep=laptop"], env=env, check=True)
    wall_s = time.monotonic() - started

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("laptop")
    runs = client.search_runs([experiment.experiment_id], "tags.`memsweep.kind` = 'cell'", max_results=1000)
    by_shape: dict[str, list[tuple[int, float]]] = {}
    for run in runs:
        assert run.info.status == "FINISHED", run.data.tags["cell_id"]
        shape = run.data.params["model.name"]
        by_shape.setdefault(shape, []).append((int(run.data.params["data.num_sequences"]), run.data.metrics["mem_bits"]))

    results = {"wall_s": wall_s, "budget_s": args.budget_s, "cells": len(runs), "shapes": {},
               "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "python": platform.python_version()}}
    ok = wall_s <= args.budget_s
    for shape, points in sorted(by_shape.items()):
        points.sort()
        plateau = [bits for _, bits in points[-LARGEST:]]
        spread = max(plateau) / min(plateau) - 1
        ok &= spread <= PLATEAU_TOLERANCE
        results["shapes"][shape] = {"mem_bits_by_num_sequences": dict(points), "plateau_spread": spread}
        print(f"{shape}: mem_bits by N {dict(points)}; largest {LARGEST} sizes agree within {spread:.1%}")
    print(f"laptop sweep: {len(runs)} cells in {wall_s:.0f} s (budget {args.budget_s:.0f} s): {'OK' if ok else 'FAILED'}")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"laptop_sweep-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
