"""The README's main job as a benchmark: `memsweep launch sweep=laptop` on this machine.

    python -m bench.laptop_sweep [--root DIR] [--budget-s 600] [--compare-packing]

Runs the laptop sweep into a fresh store, then checks what the sweep is for: for each shape, the
largest dataset sizes (those holding more bits than the shape stores) agree on mem_bits within 15%
(the capacity plateau), and the sweep finished within the budget. Prints the figures, writes them to
bench/results/laptop_sweep-<time>.json, and exits non-zero when a check fails.

With --compare-packing the sweep runs twice, back to back, each into its own fresh store: first with
`pack.enabled=false`, then with packing (the default). The figure is the unpacked wall time over the
packed one (target: >= 2, packing halves the sweep); both runs are checked as above.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from bench.common import RESULTS, machine, write_results

PLATEAU_TOLERANCE = 0.15
LARGEST = 3  # the largest dataset sizes of each shape compared on the plateau


def run_sweep(root: Path, overrides: list[str]) -> tuple[float, dict[str, list[tuple[int, float]]], int]:
    """`memsweep launch sweep=laptop OVERRIDES` into the store at `root`: its wall time (Ray's start
    included, as a user sees it), mem_bits by shape and dataset size, and the number of cells."""
    env = {**os.environ, "MEMSWEEP_ROOT": str(root)}
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "orchestrator.cli", "launch", "sweep=laptop", *overrides], env=env,
                   check=True)
    wall_s = time.monotonic() - started

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("laptop")
    runs = client.search_runs([experiment.experiment_id], "tags.`memsweep.kind` = 'cell'", max_results=1000)
    by_shape: dict[str, list[tuple[int, float]]] = {}
    for run in runs:
        assert run.info.status == "FINISHED", run.data.tags["cell_id"]
        shape = run.data.params["model.name"]
        by_shape.setdefault(shape, []).append((int(run.data.params["data.num_sequences"]), run.data.metrics["mem_bits"]))
    return wall_s, by_shape, len(runs)


def check(wall_s: float, by_shape: dict, cells: int, budget_s: float, label: str = "laptop sweep") -> tuple[bool, dict]:
    """The plateau and budget checks; prints them and returns (ok, the figures)."""
    results = {"wall_s": wall_s, "budget_s": budget_s, "cells": cells, "shapes": {}}
    ok = wall_s <= budget_s
    for shape, points in sorted(by_shape.items()):
        points.sort()
        plateau = [bits for _, bits in points[-LARGEST:]]
        spread = max(plateau) / min(plateau) - 1
        ok &= spread <= PLATEAU_TOLERANCE
        results["shapes"][shape] = {"mem_bits_by_num_sequences": dict(points), "plateau_spread": spread}
        print(f"{shape}: mem_bits by N {dict(points)}; largest {LARGEST} sizes agree within {spread:.1%}")
    print(f"{label}: {cells} cells in {wall_s:.0f} s (budget {budget_s:.0f} s): {'OK' if ok else 'FAILED'}")
    return ok, results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="MEMSWEEP_ROOT for the run (default: a new temporary folder)")
    parser.add_argument("--budget-s", type=float, default=600.0)
    parser.add_argument("--compare-packing", action="store_true",
                        help="run the sweep unpacked, then packed, and report the wall-time ratio")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="laptop-sweep-"))

    if args.compare_packing:
        load_before = os.getloadavg()
        ok, results = True, {"machine": machine(), "load_before": load_before}
        for name, overrides in (("unpacked", ["pack.enabled=false"]), ("packed", [])):
            run_ok, figures = check(*run_sweep(root / name, overrides), args.budget_s, f"laptop sweep, {name}")
            ok &= run_ok
            results[name] = figures
        results["load_after"] = os.getloadavg()
        speedup = results["unpacked"]["wall_s"] / results["packed"]["wall_s"]
        results["unpacked_over_packed"] = {"ratio": speedup, "target": ">= 2.0"}
        print(f"laptop sweep unpacked / packed wall time: {speedup:.2f} (target >= 2.0); "
              f"load {load_before[0]:.1f} -> {results['load_after'][0]:.1f}")
        name = "laptop_sweep_packing"
    else:
        ok, results = check(*run_sweep(root, []), args.budget_s)
        results["machine"] = machine()
        name = "laptop_sweep"
    write_results(results, RESULTS, prefix=f"{name}-")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
