"""What a sweep's size costs the driver: plan, submission, `status` and `aggregate` at 1,000, 10,000 and
100,000 cells, each timed with its peak memory, and how each cost grows per 10x more cells.

    python -m bench.scale [--cells 1000 10000] [--root DIR] [--out bench/results] [--no-submit]

For each size N the grid is the smoke sweep's tiny cell at 10 widths x 10 dataset sizes x N/100 seeds
(N a multiple of 100; 10 capacity groups at every size, so the fits' work grows with the cells only).
The store (MLflow's SQLite file under `<root>/<N>/`) is made before anything is timed: creating one
costs 8-10 s whatever the sweep. Each stage runs in a process of its own, whose peak resident memory
(VmHWM, imports included) is the stage's memory figure:

- plan: `orchestrator.launch.make_plan` (what `memsweep launch --dry-run` does: compose and validate
  every cell, read the tracker), timed in the process;
- submit: the real launch (`launch.run_plan`: launch run, recorded plan, Ray's windowed submission)
  on a local Ray of 4 CPUs, with a runner that returns FINISHED at once (`no_op_cell`: no training,
  no run written). Timed from the plan made: Ray's start, the first task submitted (the launch run,
  the recorded plan and the tasks' sizing come before it), the first outcome, the last; the driver's
  resident memory is sampled every 0.1 s meanwhile (flat: it does not grow as tasks are submitted
  and collected). `--no-submit` records the launch with no cell submitted (for sizes where
  submitting takes too long on the machine);
- then N FINISHED runs of the planned cells are bulk inserted (bench.aggregate_bench's `build_sql`,
  in chunks of 5,000), with metrics following the planted laws;
- status: `memsweep status smoke` (orchestrator.cli.main), timed around the whole process as a user
  waits for it (the interpreter's start and imports included);
- aggregate: `orchestrator.aggregate.aggregate` without curves, timed in the process.

Results go to `<out>/scale-<UTC time>.json` (rewritten after every size) with the machine; the table
is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SWEEP = "smoke"
WIDTHS = (16, 24, 32, 40, 48, 56, 64, 72, 80, 88)
SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
RUNTIME = ("cluster.num_cpus=4",)  # a local Ray of a few CPUs for the submission stage
INSERT_CHUNK = 5000  # runs per bulk-insert transaction
STAGES = ("plan", "submit", "status", "aggregate")
RESULT_MARK = "bench.scale stage: "  # the line of a stage's output that holds its figures (JSON)
REPO = Path(__file__).resolve().parent.parent  # where `python -m bench.scale` finds this package


def overrides(cells: int) -> list[str]:
    """The smoke sweep at WIDTHS x SIZES x cells/100 seeds: `cells` cells."""
    if cells % (len(WIDTHS) * len(SIZES)) or cells <= 0:
        raise SystemExit(f"--cells {cells}: must be a positive multiple of {len(WIDTHS) * len(SIZES)}")
    seeds = cells // (len(WIDTHS) * len(SIZES))
    return [f"sweep={SWEEP}", f"model.n_embd={','.join(map(str, WIDTHS))}",
            f"data.num_sequences={','.join(map(str, SIZES))}", f"seed=range(0,{seeds})", *RUNTIME]


def no_op_cell(cell, *, parent_run_id, tags, reference):
    """A runner (orchestrator.scheduler.cell_runner) that trains nothing and writes no run."""
    from orchestrator.tracking import CellOutcome

    return CellOutcome(cell.cell_id, None, "FINISHED")


def rss_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_mb() -> float:
    """This process's peak resident memory so far (VmHWM), MB. (A parent's ru_maxrss of its child
    would not do: Linux counts in it the parent's memory copied at fork, before the exec.)"""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


class Recorder:
    """The launch's display: when the first and last outcomes came, and the driver's resident memory
    sampled every 0.1 s with the number of outcomes collected by then."""

    def __init__(self, interval_s: float = 0.1):
        self.interval_s, self.done, self.first, self.samples = interval_s, 0, None, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append((self.done, rss_bytes()))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def update(self, done: int, failed: int, running: int, pending: int) -> None:
        pass

    def cell_done(self, outcome, elapsed_s: float) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        self.done += 1


# -- the stages, each run in a process of its own (`--stage`) ---------------------------------------
def stage_plan(cells: int) -> dict:
    from orchestrator.launch import make_plan

    t0 = time.perf_counter()
    plan = make_plan(overrides(cells))
    return {"seconds": time.perf_counter() - t0, "cells": len(plan.cells)}


def stage_submit(cells: int, submit: bool) -> dict:
    """The launch with the no-op runner (or with no cell, `submit` False), then the bulk insert."""
    from orchestrator.launch import make_plan, run_plan
    from orchestrator.scheduler import ray_cluster

    plan = make_plan(overrides(cells))
    planned = time.perf_counter()
    figures, submitted = {}, first_submission()
    with ray_cluster(plan.cluster):
        figures["ray_start_s"] = time.perf_counter() - planned
        started, rss_before, recorder = time.perf_counter(), rss_bytes(), Recorder()  # run_plan enters it
        outcomes = run_plan(plan, plan.cells if submit else [], display=recorder, runner="bench.scale:no_op_cell")
        ended = time.perf_counter()
    if submit:
        assert len(outcomes) == cells and all(o.status == "FINISHED" for o in outcomes), "a no-op cell failed"
        samples = recorder.samples or [(cells, rss_bytes())]
        figures.update({
            "first_submitted_s": submitted[0] - started, "first_submitted_from_plan_s": submitted[0] - planned,
            "first_outcome_s": recorder.first - started, "first_outcome_from_plan_s": recorder.first - planned,
            "total_s": ended - started, "tasks_per_s": cells / (ended - started),
            "rss_before_mb": rss_before / 2**20, "rss_peak_mb": max(r for _, r in samples) / 2**20,
            "rss_at_10pct_mb": _rss_at(samples, 0.1 * cells) / 2**20,
            "rss_at_90pct_mb": _rss_at(samples, 0.9 * cells) / 2**20,
        })
    t0 = time.perf_counter()
    fill(plan)
    figures["insert_s"] = time.perf_counter() - t0
    return figures


def first_submission() -> list[float]:
    """A list that gets the time (perf_counter) at which the launch's Window first holds a submitted
    task: Window.top_up is wrapped, the real one runs."""
    from orchestrator.scheduler import Window

    times, top_up = [], Window.top_up

    def timed_top_up(window) -> None:
        top_up(window)
        if window.in_flight and not times:
            times.append(time.perf_counter())

    Window.top_up = timed_top_up
    return times


def _rss_at(samples: list[tuple[int, int]], done: float) -> int:
    """The first resident-memory sample taken once `done` outcomes were collected."""
    return next((rss for count, rss in samples if count >= done), samples[-1][1])


def fill(plan) -> None:
    """A FINISHED run of every planned cell, bulk inserted, with planted metrics."""
    import numpy as np

    from bench.aggregate_bench import build_sql, planted_run
    from orchestrator.tracking import TAG_CELL, TAG_KIND, TAG_SWEEP

    tracker, experiment = plan.tracker, plan.cells[0].options.experiment
    exp_id = tracker.experiment_id(experiment)
    location = tracker.client.get_experiment(exp_id).artifact_location
    store, rng, now = tracker.client._tracking_client.store, np.random.default_rng(0), int(time.time() * 1000)
    for i in range(0, len(plan.cells), INSERT_CHUNK):
        runs = []
        for j, cell in enumerate(plan.cells[i : i + INSERT_CHUNK], start=i):
            spec = cell.spec
            params = {k: str(v)[:6000] for k, v in cell.recorded_params().items()}
            tags = {TAG_KIND: "cell", TAG_CELL: cell.cell_id, TAG_SWEEP: plan.name, "mlflow.runName": spec.readable_slug}
            shape = (spec.model.n_layer, spec.model.n_embd, spec.data.vocab_size, spec.data.seq_len)
            runs.append(planted_run(params, tags, shape, spec.data.num_sequences, spec.precision, now + j, rng))
        build_sql(store, exp_id, location, runs)


def stage_status() -> dict:
    from orchestrator.cli import main as memsweep

    t0 = time.perf_counter()
    if memsweep(["status", SWEEP]):
        raise SystemExit("memsweep status failed")
    return {"seconds": time.perf_counter() - t0}


def stage_aggregate(root: Path) -> dict:
    from orchestrator.aggregate import aggregate

    t0 = time.perf_counter()
    result = aggregate(SWEEP, [], root / "aggregate", curves=False)
    return {"seconds": time.perf_counter() - t0, "rows": result.cells.num_rows,
            "stages_s": result.timings_s, "alpha": {p: f["alpha"] for p, f in result.fits["alpha"].items()}}


def measure(stage: str, cells: int, root: Path, submit: bool) -> dict:
    """One stage at one size in a fresh process with MEMSWEEP_ROOT=root: the figures it reports (its
    own timing and peak memory) and the wall time of the whole process."""
    command = [sys.executable, "-m", "bench.scale", "--stage", stage, "--cells", str(cells), "--root", str(root)]
    env = {**os.environ, "MEMSWEEP_ROOT": str(root), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log = root / f"{stage}.log"
    with open(log, "w") as out:
        t0 = time.perf_counter()
        code = subprocess.run(command + ([] if submit else ["--no-submit"]), stdout=out, stderr=subprocess.STDOUT,
                              env=env, cwd=REPO).returncode
        seconds = time.perf_counter() - t0
    if code:
        raise SystemExit(f"{stage} at {cells} cells failed (exit {code}); see {log}")
    mark = next(line for line in reversed(log.read_text().splitlines()) if line.startswith(RESULT_MARK))
    return {"process_s": seconds, **json.loads(mark[len(RESULT_MARK):])}


def growth(results: dict) -> dict:
    """For each figure, its ratio between consecutive sizes, per 10x more cells (10 or less: at most
    linear)."""
    sizes = sorted(int(n) for n in results)
    ratios = {}
    for small, large in zip(sizes, sizes[1:]):
        per_10x = 1 / math.log10(large / small)
        for name, value in table_row(results[str(large)]).items():
            before = table_row(results[str(small)]).get(name)
            if value is not None and before:
                ratios.setdefault(name, {})[f"{small}->{large}"] = (value / before) ** per_10x
    return ratios


def table_row(figures: dict) -> dict:
    """The figures the table shows for one size (None where a stage was not run)."""
    submit = figures.get("submit", {})
    return {
        "plan_s": figures["plan"]["seconds"], "plan_mb": figures["plan"]["peak_mb"],
        "first_submit_s": submit.get("first_submitted_from_plan_s"),
        "first_outcome_s": submit.get("first_outcome_from_plan_s"), "submit_s": submit.get("total_s"),
        "submit_peak_mb": submit.get("rss_peak_mb"), "driver_mb_10pct": submit.get("rss_at_10pct_mb"),
        "driver_mb_90pct": submit.get("rss_at_90pct_mb"),  # flat: the same at 10% and 90% of the outcomes
        "status_s": figures["status"]["process_s"], "status_mb": figures["status"]["peak_mb"],
        "aggregate_s": figures["aggregate"]["seconds"], "aggregate_mb": figures["aggregate"]["peak_mb"],
    }


def print_table(results: dict, ratios: dict) -> None:
    names = list(table_row(next(iter(results.values()))))
    print("cells    " + " ".join(f"{n:>14}" for n in names))
    for size, figures in sorted(results.items(), key=lambda item: int(item[0])):
        row = table_row(figures)
        print(f"{int(size):<8} " + " ".join(f"{'-' if row[n] is None else f'{row[n]:.1f}':>14}" for n in names))
    for step in sorted({s for r in ratios.values() for s in r}, key=lambda s: int(s.split("->")[0])):
        print(f"x per 10x ({step}): " + " ".join(f"{n}={ratios[n][step]:.2f}" for n in names if step in ratios.get(n, {})))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[1000, 10000], help="sizes (multiples of 100)")
    parser.add_argument("--root", help="where the stores go (default: a new temporary folder)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    parser.add_argument("--no-submit", action="store_true", help="record the launch without submitting cells")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # one stage, in this process
    args = parser.parse_args(argv)
    if args.stage:
        figures = {"plan": lambda: stage_plan(args.cells[0]),
                   "submit": lambda: stage_submit(args.cells[0], not args.no_submit),
                   "status": stage_status, "aggregate": lambda: stage_aggregate(Path(args.root))}[args.stage]()
        figures["peak_mb"] = peak_mb()
        print(RESULT_MARK + json.dumps(figures), flush=True)
        return figures

    from bench.common import RESULTS, machine, results_path, save_results
    from orchestrator.tracking import Tracker

    for cells in args.cells:
        overrides(cells)  # a size that is not a multiple of 100 is refused before anything runs
    base = Path(args.root or tempfile.mkdtemp(prefix="memsweep-scale-")).resolve()
    path = results_path(args.out or RESULTS, "scale-")
    results = {"command": "python -m bench.scale " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": machine(), "grid": {"widths": WIDTHS, "sizes": SIZES, "runtime": RUNTIME},
               "sizes": {}}
    for cells in args.cells:
        root = base / str(cells)
        root.mkdir(parents=True, exist_ok=True)
        Tracker(f"sqlite:///{root}/mlflow.db")  # the store conf/ points at, made (8-10 s) before any timing
        figures = results["sizes"][str(cells)] = {}
        for stage in STAGES:
            figures[stage] = measure(stage, cells, root, submit=not args.no_submit)
            print(f"{cells} cells: {stage} {json.dumps(figures[stage])}", flush=True)
            save_results(results, path)
    results["growth_per_10x"] = growth(results["sizes"])
    save_results(results, path)
    print_table(results["sizes"], results["growth_per_10x"])
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
