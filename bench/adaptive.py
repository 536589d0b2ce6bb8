"""Adaptive sweeps against fixed grids.

    python -m bench.adaptive [--root DIR] [--quick]

1. laptop (skipped with --quick): `memsweep launch sweep=laptop` and `sweep=laptop_adaptive`, back to
   back, each into its own fresh store on this machine (bench.laptop_sweep.run_sweep), then `memsweep
   aggregate` of each. Per shape: its capacity and whether its plateau is established (fits.json), and
   the sizes each sweep measured; per sweep: alpha (slope and mean ratio), the training FLOPs it
   actually spent (the sum over its finished cells of steps x CellSpec.train_flops_per_step) and its
   wall time. Targets: the adaptive sweep's capacities and both alphas within 3% of the fixed grid's,
   with at most 60% of its FLOPs.
2. paper: dry-run totals (training FLOPs at the step cap and at the expected steps, orchestrator.cost)
   of the fixed paper grid (paper_synthetic with its former 11 sizes for every shape, 1,760 cells), of
   paper_synthetic (capacity multiples), of paper_synthetic_adaptive's round 1, and of the rounds its rules would add if
   every cell measured exactly its prediction min(alpha * params, H(X))
   (orchestrator.adaptive.expected_rounds). Target: that expected total at most a third of the fixed
   grid's at the step cap, at the same seeds and precisions.

Writes bench/results/adaptive-<time>.json (--out elsewhere) and exits non-zero when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, machine, write_results
from bench.laptop_sweep import alpha_status, run_sweep

CAPACITY_TOL = 0.03  # the adaptive sweep's capacities and alphas, relative to the fixed grid's
FLOPS_TARGET = 0.60  # the adaptive sweep's training FLOPs over the fixed grid's, at most
# The paper grid as paper_synthetic listed it before capacity multiples: one list of sizes for every shape.
PAPER_FIXED_SIZES = "128,256,512,1024,2048,4096,8192,16384,32768,65536,131072"
PAPER_TARGET = 1 / 3  # the paper grid's expected adaptive total over its fixed total, at most
SWEEPS = {"fixed": ("laptop", "paper_synthetic"), "adaptive": ("laptop_adaptive", "paper_synthetic_adaptive")}


def spent(root: Path, sweep: str) -> dict:
    """What the sweep in the store at `root` actually trained: its finished cells, their steps and
    training FLOPs (steps x the recorded spec's train_flops_per_step), and the sizes by shape."""
    from models.spec import spec_from_dict
    from orchestrator.aggregate import current_runs
    from orchestrator.plan import read_plan
    from orchestrator.tracking import Tracker, read_runs

    tracker = Tracker(f"sqlite:///{root.resolve()}/mlflow.db", str(root.resolve() / "mlartifacts"))
    rows = read_plan(tracker, sweep).rows
    specs = {cell_id: spec_from_dict(json.loads(row["spec"])) for cell_id, row in rows.items()}
    finished = {cell_id: run for cell_id, run in current_runs(read_runs(tracker, sweep, kind="cell")).items()
                if run.status == "FINISHED"}
    sizes: dict[str, list[int]] = {}
    for cell_id in finished:
        sizes.setdefault(specs[cell_id].shape_slug, []).append(specs[cell_id].data.num_sequences)
    return {"cells": len(finished), "steps": sum(run.metrics["steps"] for run in finished.values()),
            "train_flops": sum(run.metrics["steps"] * specs[c].train_flops_per_step for c, run in finished.items()),
            "num_sequences": {shape: sorted(n) for shape, n in sorted(sizes.items())}}


def laptop_run(root: Path, sweep: str) -> dict:
    """One laptop sweep, run and aggregated: wall time, FLOPs spent, capacities, alpha."""
    wall_s, _, cells = run_sweep(root, [], sweep)
    alpha = alpha_status(root, sweep)
    fits = json.loads((root / "aggregate" / "fits.json").read_text())
    shapes = {entry["label"]: {key: entry[key] for key in ("capacity_bits", "num_sequences_at_max",
                                                           "plateau_reached", "lower_bound")}
              for entry in fits["capacity"]}
    return {"sweep": sweep, "wall_s": wall_s, "cells": cells, **spent(root, sweep), "shapes": shapes, "alpha": alpha}


def relative(adaptive: float, fixed: float) -> float:
    return abs(adaptive - fixed) / abs(fixed)


def compare_laptop(fixed: dict, adaptive: dict) -> tuple[bool, dict]:
    """The laptop targets, printed: capacities and alphas within CAPACITY_TOL, FLOPs within FLOPS_TARGET."""
    ok, figures = True, {"capacity": {}, "alpha": {}}
    for label, shape in fixed["shapes"].items():
        found = adaptive["shapes"].get(label)
        gap = relative(found["capacity_bits"], shape["capacity_bits"]) if found else float("inf")
        ok &= gap <= CAPACITY_TOL
        figures["capacity"][label] = gap
        print(f"{label}: capacity {found['capacity_bits'] if found else float('nan'):,.0f} bits adaptive "
              f"(N={found and found['num_sequences_at_max']}, plateau "
              f"{'established' if found and found['plateau_reached'] else 'NOT established'}) vs "
              f"{shape['capacity_bits']:,.0f} fixed (N={shape['num_sequences_at_max']}, plateau "
              f"{'established' if shape['plateau_reached'] else 'NOT established'}): {gap:.1%} apart "
              f"(target <= {CAPACITY_TOL:.0%})")
    for statistic in ("slope", "mean_ratio"):
        gap = relative(adaptive["alpha"][statistic], fixed["alpha"][statistic])
        ok &= gap <= CAPACITY_TOL
        figures["alpha"][statistic] = gap
        print(f"alpha ({statistic}): {adaptive['alpha'][statistic]:.3f} adaptive vs {fixed['alpha'][statistic]:.3f} "
              f"fixed: {gap:.1%} apart")
    figures["flops_ratio"] = adaptive["train_flops"] / fixed["train_flops"]
    figures["wall_ratio"] = adaptive["wall_s"] / fixed["wall_s"]
    ok &= figures["flops_ratio"] <= FLOPS_TARGET
    print(f"training FLOPs spent: adaptive {adaptive['train_flops']:.3g} ({adaptive['cells']} cells, sizes "
          f"{adaptive['num_sequences']}) / fixed {fixed['train_flops']:.3g} ({fixed['cells']} cells) = "
          f"{figures['flops_ratio']:.2f} (target <= {FLOPS_TARGET:.2f}); wall {adaptive['wall_s']:.0f} s / "
          f"{fixed['wall_s']:.0f} s = {figures['wall_ratio']:.2f}")
    return ok, figures


def paper_totals() -> tuple[bool, dict]:
    """The paper grid's dry-run totals, fixed against adaptive (round 1 and the expected total)."""
    from orchestrator.adaptive import expected_rounds, plan_options
    from orchestrator.compose import load_sweep
    from orchestrator.cost import plan_cost

    def totals(cells) -> dict:
        cost = plan_cost([c.spec for c in cells], [])
        return {"cells": len(cells), "train_flops": cost.flops, "train_flops_expected": cost.flops_expected}

    fixed_name, adaptive_name = SWEEPS["fixed"][1], SWEEPS["adaptive"][1]
    fixed = load_sweep([f"sweep={fixed_name}", f"data.num_sequences={PAPER_FIXED_SIZES}"]).cells
    multiples = load_sweep([f"sweep={fixed_name}"]).cells
    first = load_sweep([f"sweep={adaptive_name}"]).cells
    rounds = expected_rounds(first, plan_options(first))
    expected = [cell for cells in rounds for cell in cells]
    figures = {"fixed": totals(fixed), "capacity_multiples": totals(multiples), "adaptive_round_1": totals(first), "adaptive_expected": totals(expected),
               "expected_rounds": len(rounds), "cells_per_round": [len(r) for r in rounds],
               "seeds": sorted({c.spec.seed for c in fixed}), "precisions": sorted({c.spec.precision for c in fixed})}
    ratio = figures["adaptive_expected"]["train_flops"] / figures["fixed"]["train_flops"]
    figures["expected_over_fixed"] = ratio
    for name in ("fixed", "capacity_multiples", "adaptive_round_1", "adaptive_expected"):
        row = figures[name]
        print(f"paper grid, {name}: {row['cells']:,} cells, {row['train_flops']:.3g} FLOP at the step cap, "
              f"{row['train_flops_expected']:.3g} at the expected steps")
    print(f"paper grid: adaptive expected / fixed = {ratio:.2f} at the step cap (target <= {PAPER_TARGET:.2f}), "
          f"{len(rounds)} rounds {figures['cells_per_round']}")
    return ratio <= PAPER_TARGET, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="where the two laptop stores go (default: a new temporary folder)")
    parser.add_argument("--quick", action="store_true", help="the paper grid's dry-run totals only (no training)")
    parser.add_argument("--out", default=str(RESULTS), help="folder of the results file")
    args = parser.parse_args(argv)
    results: dict = {"machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    ok = True
    if not args.quick:  # the adaptive sweep first: a driver that fails does so before the fixed grid's 5 minutes
        root = Path(args.root or tempfile.mkdtemp(prefix="adaptive-bench-"))
        adaptive, fixed = (laptop_run(root / kind, SWEEPS[kind][0]) for kind in ("adaptive", "fixed"))
        ok, results["laptop_comparison"] = compare_laptop(fixed, adaptive)
        results["laptop"] = {"fixed": fixed, "adaptive": adaptive}
    paper_ok, results["paper"] = paper_totals()
    results["ok"] = ok and paper_ok
    write_results(results, args.out, prefix="adaptive-")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
