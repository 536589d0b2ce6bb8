"""Figure 3: a sweep through memsweep on local Ray against the same cells run sequentially in one
process, and against the same grid through Ray Tune's `grid_search`.

    python -m bench.sweep_bench [--quick] [--repeats N] [--workers 2] [--cell-s 20]

One embedded Ray cluster (127.0.0.1, `--workers` CPUs) is started first and shared by every
measurement, so its start-up (reported as `ray_start_s`) is in none of them. Each repeat then times,
back to back (each repeat starting with the next of the four, each way once every CPU of the cluster
is free), on the same grid of l1_d16 cells (`--cell-s` seconds each, calibrated here; evaluations
every quarter of the run, no early convergence):

- sequential: `models.train.train` on each cell in this process, with the same evaluations and the
  same final scoring of members and non-members as a memsweep cell, one torch thread;
- memsweep: `orchestrator.launch.make_plan` + `run_plan` into a fresh store (composition, MLflow
  runs, curves, checkpoints, the per-sequence table), packing off;
- memsweep_packed: the same with packing on (pack.fill_workers splits the packs over the workers);
- tune: `ray.tune.Tuner` with `grid_search` over the same (num_sequences, seed) axes, one CPU per
  trial, actors reused, each trial running the sequential baseline's function for its cell and
  reporting its metrics.

Ratios (median, min, max over repeats): wall / ideal, where ideal = the sequential cells' summed time
over the workers; wall / ideal_in_sweep, where ideal_in_sweep = the cells' summed training time as
measured inside the workers during that sweep, over the workers (on a machine whose cores are busy
with other work, cells side by side run slower than alone: this ideal takes that out and leaves the
orchestration's own cost); wall / sequential wall; memsweep wall / tune wall. Targets: memsweep
within 10% of ideal (ratio <= 1.10) and no slower than Tune (ratio <= 1.0).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import CPU, RESULTS, machine, memsweep_train, ratio_stats, tiny_cell, write_results
from measure.memorization import summarize_synthetic
from models.data import synthetic_members, synthetic_nonmembers
from models.scoring import nll_bits
from models.spec import CellSpec
from models.train import train

REPO = Path(__file__).resolve().parent.parent
EVAL_BATCH = 1024


# -- the work of one cell, without orchestration ---------------------------------------------------
def train_cell(spec: CellSpec) -> dict:
    """What a memsweep cell computes, minus tracking and checkpoints: training with its step-curve
    evaluations, then members and non-members scored once more."""
    members = synthetic_members(spec.data, spec.seed)
    nonmembers = synthetic_nonmembers(spec.data, spec.seed)

    def evaluate(model) -> dict:
        nll = nll_bits(model, members, EVAL_BATCH)
        return {"mem_bits": summarize_synthetic(nll, spec.data.seq_len, spec.data.vocab_size).mem_bits}

    result = train(spec, members, device=CPU, evaluate=evaluate)
    member_nll = nll_bits(result.model, members, EVAL_BATCH)
    nonmember_nll = nll_bits(result.model, nonmembers, EVAL_BATCH)
    summary = summarize_synthetic(member_nll, spec.data.seq_len, spec.data.vocab_size)
    return {"mem_bits": summary.mem_bits, "test_nll_bits_per_token": float(nonmember_nll.mean() / spec.data.seq_len),
            "steps": result.steps}


def tune_trainable(config: dict, specs: dict) -> None:
    """Ray Tune's function trainable: the sequential baseline's work for the grid point `config`."""
    from ray import tune

    torch.set_num_threads(1)  # as memsweep gives a 1-CPU cell
    tune.report(train_cell(specs[(config["num_sequences"], config["seed"])]))


# -- the grid ---------------------------------------------------------------------------------------
def grid_overrides(sizes: list[int], seeds: list[int], steps: int) -> list[str]:
    """The grid in memsweep's override grammar: l1_d16 cells that never stop early (a cosine schedule
    is measured for convergence only at max_steps), evaluated four times, checkpointed only at the end."""
    return ["sweep=smoke", "model=l1_d16", f"data.num_sequences={','.join(map(str, sizes))}",
            f"seed={','.join(map(str, seeds))}", f"train.max_steps={steps}",
            f"train.eval_interval={max(1, steps // 4)}", f"train.checkpoint_interval={steps}",
            "train.schedule=cosine", "data.num_nonmembers=64"]


def calibrate_steps(cell_s: float) -> int:
    """Steps that make an l1_d16 cell train for about `cell_s` seconds on this machine now."""
    spec = tiny_cell(128, 0, 200)
    members = synthetic_members(spec.data, spec.seed)
    memsweep_train(spec, members)  # warm-up
    start = time.perf_counter()
    memsweep_train(spec, members)
    per_step = (time.perf_counter() - start) / 200
    return max(100, int(round(cell_s / per_step, -2)))


class _Quiet:
    """A sweep display that prints nothing and keeps the cells' outcomes."""

    def __init__(self):
        self.outcomes = []

    def __enter__(self) -> "_Quiet":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, done, failed, running, pending) -> None:
        pass

    def cell_done(self, outcome, elapsed_s: float) -> None:
        self.outcomes.append(outcome)


# -- the three ways to run the grid -----------------------------------------------------------------
def run_sequential(specs: list[CellSpec]) -> tuple[float, list[float]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as memsweep gives a 1-CPU cell
    cell_s = []
    for spec in specs:
        start = time.perf_counter()
        train_cell(spec)
        cell_s.append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    return sum(cell_s), cell_s


def run_memsweep(overrides: list[str], root: Path, packed: bool) -> tuple[float, float]:
    """The grid through memsweep's launch path into a fresh store at `root`; timed from the
    composition of the grid (and the store's creation) to the last cell recorded."""
    from orchestrator.launch import make_plan, run_plan

    start = time.perf_counter()
    plan = make_plan(overrides + [f"root_dir={root}", f"pack.enabled={str(packed).lower()}"])
    display = _Quiet()
    run_plan(plan, plan.cells, display=display)
    wall = time.perf_counter() - start
    failed = [o for o in display.outcomes if o.status != "FINISHED" or o.already_finished]
    if failed or len(display.outcomes) != len(plan.cells):
        raise RuntimeError(f"memsweep sweep did not train every cell: {failed or display.outcomes}")
    return wall, sum(o.metrics["wall_s"] for o in display.outcomes)  # and the cells' summed training time


def run_tune(specs: dict, sizes: list[int], seeds: list[int], root: Path) -> tuple[float, float]:
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(tune_trainable, specs=specs), {"cpu": 1}),
        param_space={"num_sequences": tune.grid_search(sizes), "seed": tune.grid_search(seeds)},
        # Reusing trial actors spares Tune a process start and the imports per trial (about 5 s
        # here): Tune's fastest setting, so the comparison is against Tune at its best.
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(name="sweep_bench", storage_path=str(root), verbose=0),
    )
    start = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - start
    if results.errors or len(results) != len(specs):
        raise RuntimeError(f"Ray Tune did not train every cell: {results.errors}")
    return wall, sum(r.metrics["time_total_s"] for r in results)  # and the trials' summed time


def wait_idle(timeout_s: float = 60.0) -> None:
    """Until every CPU of the cluster is free again: Tune's trial actors outlive `Tuner.fit()` by a
    few seconds, and a sweep started meanwhile would wait for their CPUs on the clock."""
    import ray

    deadline = time.monotonic() + timeout_s
    while (ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0)
           and time.monotonic() < deadline):
        time.sleep(0.2)


@contextlib.contextmanager
def local_ray(workers: int):
    """One embedded Ray cluster on 127.0.0.1 for every measurement; stopped (only it) afterwards."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0, Tune prints nothing
    # Tune's workers import this module (its trainable); memsweep's import the installed packages.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _node_ip_address="127.0.0.1", object_store_memory=200 * 1024**2)
    try:
        yield
    finally:
        ray.shutdown()


def figure_sweep(quick: bool, repeats: int, workers: int, cell_s: float | None = None) -> dict:
    """Figure 3, as `python -m bench` reports it: ratios keyed by name, plus the raw times."""
    sizes, seeds = ([64, 128], [0, 1]) if quick else ([64, 128], [0, 1, 2, 3])
    cell_s = cell_s or (3.0 if quick else 20.0)
    steps = calibrate_steps(cell_s)
    overrides = grid_overrides(sizes, seeds, steps)

    from orchestrator.launch import make_plan

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # a store per sweep: no creation notices
    scratch = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    try:
        cells = make_plan(overrides + [f"root_dir={scratch / 'plan'}"]).cells
        specs = {(c.spec.data.num_sequences, c.spec.seed): c.spec for c in cells}
        times = {k: [] for k in ("sequential", "ideal", "memsweep", "memsweep_packed", "tune")}
        inside = {k: [] for k in ("memsweep", "memsweep_packed", "tune")}  # summed time in the workers
        cell_times = []
        started = time.perf_counter()
        with local_ray(workers):
            ray_start_s = time.perf_counter() - started
            # Warm the worker pool (torch, MLflow imports) so the first measured sweep pays no more
            # than the others (Tune's trial actors are fresh processes whatever is warm).
            run_memsweep(grid_overrides(sizes[:1], seeds, 20), scratch / "warm-up", packed=False)
            for r in range(repeats):
                runs = [
                    ("sequential", lambda: run_sequential(list(specs.values()))),
                    ("memsweep", lambda: run_memsweep(overrides, scratch / f"unpacked-{r}", packed=False)),
                    ("memsweep_packed", lambda: run_memsweep(overrides, scratch / f"packed-{r}", packed=True)),
                    ("tune", lambda: run_tune(specs, sizes, seeds, scratch / f"tune-{r}")),
                ]
                # Each repeat starts with the next one: load that comes and goes hits each alike.
                for name, run in runs[r % len(runs):] + runs[: r % len(runs)]:
                    wait_idle()
                    wall, detail = run()
                    times[name].append(wall)
                    if name == "sequential":
                        times["ideal"].append(wall / workers)
                        cell_times.append(detail)
                    else:
                        inside[name].append(detail)
                print(f"  sweep repeat {r + 1}/{repeats}: " + "  ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()),
                      flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def ratios(a: str, b: str) -> dict:
        return ratio_stats([x / y for x, y in zip(times[a], times[b])])

    def in_sweep(name: str) -> dict:
        return ratio_stats([wall / (summed / workers) for wall, summed in zip(times[name], inside[name])])

    return {
        "what": f"{len(specs)} l1_d16 cells of ~{cell_s:g} s ({steps} steps) on {workers} Ray workers",
        "cells": len(specs), "steps": steps, "workers": workers, "ray_start_s": ray_start_s,
        "mean_cell_s": float(np.mean(cell_times)), "times_s": times,
        # memsweep: the cells' training wall_s (a pack's cells each count the pack's time); tune: the
        # trials' time_total_s. Against `sequential`, these show how much slower cells ran side by side.
        "summed_in_workers_s": inside,
        "ratios": {
            "memsweep_vs_ideal": {**ratios("memsweep", "ideal"), "target": "<= 1.10"},
            "memsweep_vs_ideal_in_sweep": in_sweep("memsweep"),
            "memsweep_vs_sequential": ratios("memsweep", "sequential"),
            "memsweep_vs_tune": {**ratios("memsweep", "tune"), "target": "<= 1.0"},
            "memsweep_packed_vs_ideal": ratios("memsweep_packed", "ideal"),
            "memsweep_packed_vs_sequential": ratios("memsweep_packed", "sequential"),
            "memsweep_packed_vs_tune": ratios("memsweep_packed", "tune"),
            "tune_vs_ideal": ratios("tune", "ideal"),
            "tune_vs_ideal_in_sweep": in_sweep("tune"),
        },
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.sweep_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 cells of ~3 s (default: 8 cells of ~20 s)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="CPUs of the embedded Ray cluster")
    parser.add_argument("--cell-s", type=float, help="seconds each cell trains (calibrated here)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    load = os.getloadavg()
    figure = figure_sweep(args.quick, args.repeats, args.workers, args.cell_s)
    results = {"machine": machine(), "load_before": load, "load_after": os.getloadavg(), "sweep": figure}
    for name, r in figure["ratios"].items():
        print(f"{name:30s} median {r['median']:7.3f}  [{r['min']:.3f}, {r['max']:.3f}]")
    write_results(results, args.out, prefix="sweep-")
    return results


if __name__ == "__main__":
    main()
