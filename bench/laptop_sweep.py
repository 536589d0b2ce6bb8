"""The README's main job as a benchmark: `memsweep launch sweep=laptop` on this machine.

    python -m bench.laptop_sweep [--root DIR] [--budget-s 600] [--compare-packing]

Runs the laptop sweep into a fresh store and aggregates it, then checks what the sweep is for: for
each shape, the two dataset sizes with the most mem_bits agree within 15% (the capacity plateau: at
the sweep's 4,000-step cap the sizes far past capacity are under-trained and fall below it, which
the lower-bound flag reports),
membership inference falls from near-certain on the smallest dataset (loss AUC >= 0.95) to near
chance on the largest (loss AUC <= 0.75), and the sweep finished within the budget. It prints alpha
from fits.json with its status (converged, or a lower bound and which cells make it one), writes the
figures to bench/results/laptop_sweep-<time>.json, and exits non-zero when a check fails.

With --compare-packing the sweep runs twice, back to back, each into its own fresh store: first with
`pack.enabled=false`, then with packing (the default). The figure is the unpacked wall time over the
packed one (target: >= 2, packing halves the sweep); both runs are checked as above.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from bench.common import RESULTS, machine, write_results

PLATEAU_TOLERANCE = 0.15
LARGEST = 2  # the dataset sizes of each shape with the most mem_bits, compared on the plateau
AUC_MEMORIZED = 0.95  # the smallest dataset: membership is near-certain
AUC_FADED = 0.75  # the largest dataset: membership inference near chance (0.5)


def run_sweep(root: Path, overrides: list[str], sweep: str = "laptop") -> tuple[float, dict[str, list[tuple[int, float, float]]], int]:
    """`memsweep launch sweep=SWEEP OVERRIDES` into the store at `root`: its wall time (Ray's start
    included, as a user sees it), (N, mem_bits, loss AUC) by shape, and the number of cells."""
    env = {**os.environ, "MEMSWEEP_ROOT": str(root)}
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "orchestrator.cli", "launch", f"sweep={sweep}", *overrides], env=env,
                   check=True)
    wall_s = time.monotonic() - started

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name(sweep)
    runs = client.search_runs([experiment.experiment_id], "tags.`memsweep.kind` = 'cell'", max_results=1000)
    by_shape: dict[str, list[tuple[int, float]]] = {}
    for run in runs:
        assert run.info.status == "FINISHED", run.data.tags.get("memsweep.cell_id")
        shape = run.data.params["model.name"]
        by_shape.setdefault(shape, []).append((int(run.data.params["data.num_sequences"]),
                                               run.data.metrics["mem_bits"], run.data.metrics["loss_auc"]))
    return wall_s, by_shape, len(runs)


def alpha_status(root: Path, sweep: str = "laptop") -> dict:
    """`memsweep aggregate SWEEP` into `root`: alpha (both statistics) and whether it is a lower bound."""
    out = root / "aggregate"
    subprocess.run([sys.executable, "-m", "orchestrator.cli", "aggregate", sweep, "--out", str(out)],
                   env={**os.environ, "MEMSWEEP_ROOT": str(root)}, check=True, capture_output=True)
    fit = json.loads((out / "fits.json").read_text())["alpha"]["fp32"]
    status = ("a lower bound: unconverged plateau cells in " + ", ".join(fit["lower_bound_models"])
              if fit["lower_bound"] else "converged")
    print(f"alpha (fp32): slope {fit['slope']['alpha']:.2f} (paper {fit['slope']['paper']:.3f}), "
          f"mean ratio {fit['mean_ratio']['alpha']:.2f} (paper {fit['mean_ratio']['paper']:.3f}); {status}")
    return {"slope": fit["slope"]["alpha"], "mean_ratio": fit["mean_ratio"]["alpha"],
            "lower_bound": fit["lower_bound"], "lower_bound_models": fit["lower_bound_models"], "status": status}


def check(wall_s: float, by_shape: dict, cells: int, budget_s: float, label: str = "laptop sweep") -> tuple[bool, dict]:
    """The plateau and budget checks; prints them and returns (ok, the figures)."""
    results = {"wall_s": wall_s, "budget_s": budget_s, "cells": cells, "shapes": {}}
    ok = wall_s <= budget_s
    for shape, points in sorted(by_shape.items()):
        points.sort()
        plateau = sorted(bits for _, bits, _ in points)[-LARGEST:]
        spread = max(plateau) / min(plateau) - 1
        first_auc, last_auc = points[0][2], points[-1][2]
        fades = first_auc >= AUC_MEMORIZED and last_auc <= AUC_FADED
        ok &= spread <= PLATEAU_TOLERANCE and fades
        results["shapes"][shape] = {"mem_bits_by_num_sequences": {n: bits for n, bits, _ in points},
                                    "loss_auc_by_num_sequences": {n: auc for n, _, auc in points},
                                    "plateau_spread": spread, "mia_fades": fades}
        print(f"{shape}: mem_bits by N {{{', '.join(f'{n}: {bits:.0f}' for n, bits, _ in points)}}}; "
              f"the top {LARGEST} agree within {spread:.1%}")
        print(f"{shape}: loss AUC by N {{{', '.join(f'{n}: {auc:.3f}' for n, _, auc in points)}}}; "
              f"{first_auc:.2f} -> {last_auc:.2f} ({'fades' if fades else 'does NOT fade'}: "
              f">= {AUC_MEMORIZED} -> <= {AUC_FADED})")
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
        results["alpha"] = alpha_status(root)
        results["machine"] = machine()
        name = "laptop_sweep"
    write_results(results, RESULTS, prefix=f"{name}-")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
