"""The README's main job as a benchmark: `memsweep launch sweep=laptop` on this machine.

    python -m bench.laptop_sweep [--root DIR] [--budget-s 600] [--compare-packing]

Runs the laptop sweep into a fresh store and aggregates it, then checks what the sweep is for: for
each shape, the two dataset sizes with the most mem_bits agree within 15% (the capacity plateau),
membership inference falls from near-certain on the smallest dataset (loss AUC >= 0.95) to near
chance on the largest (loss AUC <= 0.75), and the sweep finished within the budget. It prints alpha
measured (with its status: converged, or a lower bound and which cells make it one) and extrapolated
(from the cells' asymptotes), the latter against the shapes' long-run asymptote from bench.convergence's
ground truth (target: within 5%, its interval covering it), and the MIA fade's split between data and
training budget. Then every cell that says converged is trained again twice as long (horizons to 2T):
its a(2T) must not exceed its a(T) by more than 2%. Figures go to bench/results/laptop_sweep-<time>.json;
it exits non-zero when a check fails.

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


TRUTH_FILE = RESULTS / "convergence-20261130T234551Z.json"  # the laptop shapes trained to 64K steps
TRUTH_FROM = 2000  # the truth's asymptote is fitted to its branches from here on, as the cells' are
ALPHA_TOLERANCE = 0.05  # the extrapolated alpha within 5% of the truth's


def truth_alpha(path: Path = TRUTH_FILE) -> dict:
    """The laptop shapes' long-run asymptote (bench.convergence's ground truth: 2 seeds, branches to 64K
    steps, fitted from TRUTH_FROM on by measure.asymptote), per shape and as alpha (both statistics),
    each with the range its shapes' intervals span."""
    from measure.asymptote import fit_asymptote

    shapes = {}
    for truth in json.loads(path.read_text())["truth"]:
        if truth["shape"] not in ("l1_d16", "l2_d16"):
            continue
        horizons = [h for h in truth["horizons_steps"] if h >= TRUTH_FROM]
        values = [v for h, v in zip(truth["horizons_steps"], truth["annealed_mean_bits"]) if h >= TRUTH_FROM]
        fit = fit_asymptote(horizons, values)
        shapes[truth["shape"]] = {"params": truth["params"], "num_sequences": truth["num_sequences"],
                                  "asymptote_bits": fit.asymptote_bits, "ci_bits": [fit.ci_low_bits, fit.ci_high_bits],
                                  "bits_per_param": fit.asymptote_bits / truth["params"]}
    p = [s["params"] for s in shapes.values()]

    def slope(values):
        return sum(a * b for a, b in zip(p, values)) / sum(a * a for a in p)

    def mean_ratio(values):
        return sum(v / q for v, q in zip(values, p)) / len(p)

    alpha = {}
    for name, statistic in (("slope", slope), ("mean_ratio", mean_ratio)):
        alpha[name] = {"alpha": statistic([s["asymptote_bits"] for s in shapes.values()]),
                       "range": [statistic([s["ci_bits"][0] for s in shapes.values()]),
                                 statistic([s["ci_bits"][1] for s in shapes.values()])]}
    return {"file": path.name, "fitted_from_steps": TRUTH_FROM, "shapes": shapes, "alpha": alpha}


def alpha_status(root: Path, sweep: str = "laptop") -> dict:
    """`memsweep aggregate SWEEP` into `root`: alpha measured and extrapolated (both statistics), each
    with its status, against the shapes' long-run truth (truth_alpha); and the MIA fade's split."""
    out = root / "aggregate"
    subprocess.run([sys.executable, "-m", "orchestrator.cli", "aggregate", sweep, "--out", str(out)],
                   env={**os.environ, "MEMSWEEP_ROOT": str(root)}, check=True, capture_output=True)
    fits = json.loads((out / "fits.json").read_text())
    fit = fits["alpha"]["fp32"]
    status = ("a lower bound: unconverged plateau cells in " + ", ".join(fit["lower_bound_models"])
              if fit["lower_bound"] else "converged")
    truth = truth_alpha()
    extrapolated = fit.get("extrapolated") or {}
    result = {"measured": {"slope": fit["slope"]["alpha"], "mean_ratio": fit["mean_ratio"]["alpha"],
                           "lower_bound": fit["lower_bound"], "lower_bound_models": fit["lower_bound_models"],
                           "status": status},
              "extrapolated": None, "truth": truth, "mia_fade": fits.get("mia_fade"),
              "capacities": [{k: c.get(k) for k in ("label", "capacity_bits", "bits_per_param", "lower_bound",
                                                     "capacity_extrapolated_bits", "capacity_extrapolated_ci_low",
                                                     "capacity_extrapolated_ci_high", "bits_per_param_extrapolated",
                                                     "extrapolated_lower_bound", "fraction_of_asymptote")}
                             for c in fits["capacity"]]}
    print(f"alpha (fp32), measured: slope {fit['slope']['alpha']:.3f} (paper {fit['slope']['paper']:.3f}), "
          f"mean ratio {fit['mean_ratio']['alpha']:.3f} (paper {fit['mean_ratio']['paper']:.3f}); {status}")
    if extrapolated.get("available"):
        rows = {}
        for name in ("slope", "mean_ratio"):
            e, t = extrapolated[name], truth["alpha"][name]
            off = e["alpha"] / t["alpha"] - 1
            covers = e["ci_low"] is not None and e["ci_low"] <= t["alpha"] <= e["ci_high"]
            rows[name] = {"alpha": e["alpha"], "interval": [e["ci_low"], e["ci_high"]], "truth": t["alpha"],
                          "off": off, "covers_truth": covers, "within_tolerance": abs(off) <= ALPHA_TOLERANCE}
            print(f"alpha (fp32), extrapolated {name}: {e['alpha']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}] "
                  f"against the long-run truth {t['alpha']:.3f}: {off:+.1%} (target within {ALPHA_TOLERANCE:.0%}), "
                  f"{'covers' if covers else 'does NOT cover'} it")
        result["extrapolated"] = {**rows, "lower_bound": extrapolated.get("lower_bound"),
                                  "lower_bound_models": extrapolated.get("lower_bound_models")}
    else:
        print(f"alpha (fp32), extrapolated: none ({extrapolated.get('reason')})")
    return result


TWICE_GAIN = 0.02  # a cell that says converged gains at most this (relative) in a run twice as long


def converged_holds(root: Path) -> dict:
    """For each cell of the sweep at `root` that says converged (at horizon T): the same cell trained
    twice as long (horizons up to 2T, the rule switched off so it runs to 2T), its annealed a(2T)
    against the sweep's a(T). The trunk is the same constant-rate run, so a(T) comes back exactly; the
    check is that the rule stopped on a plateau: a(2T) / a(T) - 1 <= TWICE_GAIN. Trains in this process
    (one torch thread), checkpoints in a temporary folder, no tracking."""
    import shlex

    import torch

    from orchestrator.cell import train_and_measure
    from orchestrator.compose import compose_cell

    torch.set_num_threads(1)
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("laptop").experiment_id],
                              "tags.`memsweep.kind` = 'cell' and metrics.converged = 1", max_results=1000)
    rows = []
    for run in runs:
        horizon = int(run.data.metrics["last_horizon_steps"])
        overrides = [o for o in shlex.split(run.data.tags["memsweep.reproduce"])[2:]
                     if not o.startswith(("train.max_steps=", "train.converge_tol="))]
        with tempfile.TemporaryDirectory() as scratch:
            cell = compose_cell([*overrides, f"train.max_steps={2 * horizon}", "train.converge_tol=1e-12",
                                 f"root_dir={scratch}"])
            measurement, result = train_and_measure(cell)
        annealed = dict((t, bits) for t, _, bits in result.branches)
        gain = annealed[2 * horizon] / run.data.metrics["mem_bits"] - 1
        rows.append({"cell_id": run.data.tags["memsweep.cell_id"], "horizon_steps": horizon,
                     "mem_bits": run.data.metrics["mem_bits"], "a_T_again": annealed[horizon],
                     "a_2T": annealed[2 * horizon], "gain": gain, "ok": gain <= TWICE_GAIN})
        print(f"{rows[-1]['cell_id']}: converged at T = {horizon:,}: a(T) {rows[-1]['mem_bits']:,.0f} bits, "
              f"a(2T) {annealed[2 * horizon]:,.0f} ({gain:+.2%}; at most {TWICE_GAIN:.0%})")
    return {"cells": rows, "max_gain": max((r["gain"] for r in rows), default=None),
            "ok": all(r["ok"] for r in rows), "target": f"a(2T) / a(T) - 1 <= {TWICE_GAIN}"}


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
        results["measured_alpha_at_least_2_55"] = results["alpha"]["measured"]["slope"] >= 2.55
        results["converged_twice_as_long"] = converged_holds(root)
        ok &= results["converged_twice_as_long"]["ok"]
        results["machine"] = machine()
        name = "laptop_sweep"
    write_results(results, RESULTS, prefix=f"{name}-")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
