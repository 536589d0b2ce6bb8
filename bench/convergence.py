"""Which CPU recipe reaches the long-run asymptote of memorization in the fewest FLOPs, and is its
"converged" right? The schedule study of issue 14, on the laptop shapes and l1_d32 (V=64, S=32). And
how well does the asymptote extrapolate from a cell's first branches (`--validate`)?

    python -m bench.convergence [--quick] [--dry-run] [--shapes l1_d16 l2_d16 l1_d32] [--sizes-x 8]
                                [--truth-seeds 2] [--first-truth-seed 0] [--seeds 1] [--recipes NAME ...]
                                [--workers 2] [--out DIR]
    python -m bench.convergence --validate FILE... [--planted-draws 200] [--out DIR]

For each shape and dataset size (`--sizes-x` times a prior capacity of 2.7 bits per parameter, so past
capacity), two things:

- The ground truth: the asymptote A of annealed memorization. Per seed, one run at the recipe's peak
  rate (conf/train/cpu.yaml, constant after warm-up) to 64K steps; from its checkpoint at each horizon
  T (2K, 4K, ..., 64K) a cool-down branch (the wsd cool-down, linear over 0.2 T to the floor) gives the
  annealed a(T); a(T) = A - B T^-c is fitted to the seeds' mean by measure.asymptote.fit_asymptote
  (least squares, A's 95% profile-likelihood interval). A's interval is the union of the fit's and the
  asymptotes fitted to each seed alone.
- The recipes, each run to its own stop (converged, or its cap): today's cosine (lr 1e-2, 4,000 steps),
  wsd with the plateau trigger at lr 3e-3, 1e-2 and 3e-2 (batch 64), and wsd at lr 1e-2 with batch 256
  and with the whole dataset in every batch. Every recipe's cap (and its evaluation cadence) is the CPU
  recipe's in sequences seen: its max_steps (32,000) of its batch (64), so 8,000 steps of batch 256; a
  recipe that needs more than that has lost the contest of FLOPs. A recipe run of seed s trains on the
  dataset of ground-truth seed s. Per run: the fraction of A reached (final mem_bits / A), the steps and
  training FLOPs to the first evaluation at >= 98% of A, the steps and FLOPs it ran, whether it said
  converged, and whether that was right (final within 2% of A; "said unconverged though within 2%" is
  flagged).

Jobs (one ground-truth seed, or one recipe run) go to a pool of processes with one torch thread each,
longest first; cells are not packed: on 2 CPU cores a pack gains 1.03-1.18x on these shapes
(bench/README.md, figure 2) and whole-cell jobs balance the two workers better. Per-step costs are
measured first and give the plan's length (`--dry-run` stops there); progress and an upper bound of
the time left are printed as jobs finish; the results JSON, bench/results/convergence-<UTC time>.json,
is rewritten after each; a table is printed at the end. `--quick` is a check of the script for CI
(l1_d16 at 2x, horizons 250 to 2,000 steps, two recipes capped at 2,000 steps: 1-3 minutes on 2
cores, by their load). The default covers the 8x size only, to stay within about 75 minutes on 2 cores
(bench/README.md); `--sizes-x 2 8` doubles that. `--seeds 0` runs the ground truth alone.

`--validate FILE...` trains nothing: it reads results files and, for each ground-truth run (each shape
and seed), extrapolates from its first k branches (every first branch up to 2K, k from 3) with
measure.asymptote.fit_asymptote, by every interval method, against that run's long-run asymptote (the
fit to its branches from 2K to its longest horizon, 64K; runs of one seed share their trunk, bit for
bit, so a run branching from 500 steps to 16K is judged against the 64K run of its seed). It writes
bench/results/convergence-validation-<UTC time>.json and prints per (first branch, k) the mean and
largest |bias|, the coverage of A's interval, the rows per run, the project's targets (coverage >= 90%;
|bias| <= 3% from the branches up to 16K steps) and the interval method the figures pick
(bench/README.md, "Extrapolating to the asymptote: validation").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from bench.common import (
    CPU,
    CPU_PLATEAU_BITS_PER_PARAM,
    NO_EVAL,
    RESULTS,
    machine,
    mem_bits_evaluator,
    model_spec,
    no_eval,
    past_capacity,
    results_path,
    save_results,
    timed,
    train_recipe,
)
from measure.asymptote import DEFAULT_METHOD, INTERVAL_METHODS, MIN_BRANCHES, NOISE_FLOOR, fit_asymptote
from models.checkpoint import CheckpointStore
from models.data import synthetic_members
from models.progress import forced_decay_start
from models.spec import CellSpec, DataSpec, TrainSpec
from models.train import train

VOCAB_SIZE, SEQ_LEN, NUM_NONMEMBERS = 64, 32, 256  # the laptop sweep's data (conf/data/synthetic.yaml)
REACHED_FRACTION = 0.98  # "reached the asymptote": the first evaluation at or above 98% of A
RIGHT_TOLERANCE = 0.02  # "converged" is right when the final mem_bits is within 2% of A
HORIZONS_STEPS = (2000, 4000, 8000, 16000, 32000, 64000)


@dataclass(frozen=True)
class Recipe:
    """A recipe under test: the CPU recipe (conf/train/cpu.yaml) with this schedule, peak rate and batch."""

    name: str
    schedule: str
    lr: float
    batch_size: int | None = 64  # None: the whole dataset in every batch


RECIPES = {r.name: r for r in (
    Recipe("cosine_4k", "cosine", 1e-2),  # the CPU recipe before issue 14: `Plan.cosine_steps` long
    Recipe("wsd_lr3e-3", "wsd", 3e-3),
    Recipe("wsd_lr1e-2", "wsd", 1e-2),
    Recipe("wsd_lr3e-2", "wsd", 3e-2),
    Recipe("wsd_lr1e-2_b256", "wsd", 1e-2, 256),
    Recipe("wsd_lr1e-2_bfull", "wsd", 1e-2, None),
)}


@dataclass(frozen=True)
class Plan:
    """What one run of the study covers."""

    shapes: tuple[str, ...]
    sizes_x: tuple[float, ...]  # dataset sizes, in multiples of the prior capacity
    truth_seeds: int
    seeds: int  # of each recipe run
    recipes: tuple[str, ...]
    horizons_steps: tuple[int, ...]
    cap_steps: int  # the cap of a batch-64 recipe; other batches see as many sequences
    eval_interval: int  # steps of batch 64 between evaluations; other batches as many sequences
    cosine_steps: int  # today's cosine: its length (a cosine schedule has no cap; it ends there)
    workers: int
    first_truth_seed: int = 0  # the ground truth's seeds are first_truth_seed .. + truth_seeds - 1


def full_plan(args: argparse.Namespace) -> Plan:
    cpu = train_recipe("cpu")
    if args.quick:
        return Plan(("l1_d16",), (2.0,), 2, 1, ("cosine_4k", "wsd_lr1e-2"), (250, 500, 1000, 2000), 2000, 100,
                    1000, args.workers)
    return Plan(tuple(args.shapes), tuple(args.sizes_x), args.truth_seeds, args.seeds, tuple(args.recipes),
                tuple(args.horizons), cpu.max_steps, cpu.eval_interval, 4000, args.workers, args.first_truth_seed)


def num_sequences(shape: str, size_x: float) -> int:
    """N holding `size_x` times the prior capacity (CPU_PLATEAU_BITS_PER_PARAM * params)."""
    spec = cell(shape, 1, train_recipe("cpu"), 0)
    return past_capacity(spec.params, spec.data, CPU_PLATEAU_BITS_PER_PARAM, size_x)


def cell(shape: str, num_sequences: int, train_spec: TrainSpec, seed: int) -> CellSpec:
    return CellSpec(model_spec(shape), DataSpec(VOCAB_SIZE, SEQ_LEN, num_sequences, NUM_NONMEMBERS), train_spec,
                    "fp32", seed)


def recipe_train(recipe: Recipe, plan: Plan, num_sequences: int) -> TrainSpec:
    """The recipe's TrainSpec for a dataset of `num_sequences`: the cap and evaluation cadence of the
    CPU recipe's batch, in sequences seen."""
    cpu = train_recipe("cpu")
    batch = recipe.batch_size or num_sequences
    per_step = cpu.batch_size / batch  # steps of this batch per step of the CPU recipe's
    steps = plan.cosine_steps if recipe.schedule == "cosine" else plan.cap_steps  # of the CPU recipe's batch
    return replace(cpu, schedule=recipe.schedule, lr=recipe.lr, batch_size=batch,
                   max_steps=max(1, round(steps * per_step)),
                   eval_interval=max(1, round(plan.eval_interval * per_step)), checkpoint_interval=NO_EVAL)


def stable_train(horizon_steps: int) -> TrainSpec:
    """The ground truth's long run: the CPU recipe's peak rate, constant after warm-up, to `horizon_steps`
    (evaluated there only)."""
    return replace(train_recipe("cpu"), schedule="constant", max_steps=horizon_steps, eval_interval=NO_EVAL,
                   checkpoint_interval=NO_EVAL)


def cooldown_train(horizon_steps: int) -> TrainSpec:
    """A branch from the long run at `horizon_steps`: wsd whose forced cool-down starts there and decays
    linearly to the floor over `cooldown_fraction` of the steps so far, evaluated at its end only."""
    cpu = train_recipe("cpu")
    spec = lambda steps: replace(cpu, schedule="wsd", max_steps=steps, eval_interval=NO_EVAL,
                                 checkpoint_interval=NO_EVAL)
    max_steps = horizon_steps + round(cpu.cooldown_fraction * horizon_steps)
    while forced_decay_start(spec(max_steps)) > horizon_steps:
        max_steps -= 1
    return spec(max_steps)


# -- jobs: what a worker runs ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TruthJob:
    """One seed of one (shape, size)'s ground truth: the long run and its cool-down branches."""

    shape: str
    num_sequences: int
    seed: int
    horizons_steps: tuple[int, ...]

    @property
    def label(self) -> str:
        return f"truth {self.shape} N={self.num_sequences} seed {self.seed}"

    def work(self) -> tuple[int, int, int]:
        """(batch, steps, evaluations) of what it trains: the basis of its planned time."""
        branches = sum(cooldown_train(h).max_steps - h for h in self.horizons_steps)
        return train_recipe("cpu").batch_size, max(self.horizons_steps) + branches, 2 * len(self.horizons_steps)

    def run(self) -> dict:
        return run_truth(self)


@dataclass(frozen=True)
class RecipeJob:
    recipe: str
    shape: str
    num_sequences: int
    seed: int
    train: TrainSpec

    @property
    def label(self) -> str:
        return f"{self.recipe} {self.shape} N={self.num_sequences} seed {self.seed}"

    def work(self) -> tuple[int, int, int]:
        """(batch, steps at most, evaluations at most)."""
        return self.train.batch_size, self.train.max_steps, self.train.max_steps // self.train.eval_interval

    def run(self) -> dict:
        return run_recipe(self)


def plan_jobs(plan: Plan) -> list[TruthJob | RecipeJob]:
    jobs: list[TruthJob | RecipeJob] = []
    for shape in plan.shapes:
        for size_x in plan.sizes_x:
            n = num_sequences(shape, size_x)
            jobs += [TruthJob(shape, n, seed, plan.horizons_steps)
                     for seed in range(plan.first_truth_seed, plan.first_truth_seed + plan.truth_seeds)]
            jobs += [RecipeJob(name, shape, n, seed, recipe_train(RECIPES[name], plan, n))
                     for name in plan.recipes for seed in range(plan.seeds)]
    return jobs


def handover(source: CheckpointStore, target: CheckpointStore) -> None:
    """Start `target`'s cell where `source`'s stands: its latest checkpoint, saved under the target's
    cell id, with the schedule's state cleared (the target's own rules decide its phase)."""
    state = source.load_latest()
    target.save(state["step"], {**state, "schedule": {"decay": None, "converged_step": None}})


def run_truth(job: TruthJob) -> dict:
    """The long run to each horizon in turn, each resumed from the previous one's checkpoint, and from
    each a cool-down branch: mem_bits at every horizon, before (stable) and after (annealed) cooling."""
    started = time.perf_counter()
    data = DataSpec(VOCAB_SIZE, SEQ_LEN, job.num_sequences, NUM_NONMEMBERS)
    members = synthetic_members(data, job.seed)
    evaluate = mem_bits_evaluator(data, members)
    stable, annealed = [], []
    with tempfile.TemporaryDirectory(prefix="memsweep-convergence-") as root:
        previous = None
        for horizon in job.horizons_steps:
            spec = cell(job.shape, job.num_sequences, stable_train(horizon), job.seed)
            store = CheckpointStore(root, spec.cell_id)
            if previous is not None:
                handover(previous, store)
            stable.append([horizon, train(spec, members, device=CPU, evaluate=evaluate,
                                          checkpoints=store).mem_history[-1][1]])
            branch = cell(job.shape, job.num_sequences, cooldown_train(horizon), job.seed)
            branch_store = CheckpointStore(root, branch.cell_id)
            handover(store, branch_store)
            cooled = train(branch, members, device=CPU, evaluate=evaluate, checkpoints=branch_store)
            annealed.append({"horizon_steps": horizon, "steps": cooled.steps, "mem_bits": cooled.mem_history[-1][1],
                             "converged": cooled.converged})
            print(f"  {job.label}: {horizon} steps, {stable[-1][1] / spec.params:.3f} bits/param stable, "
                  f"{annealed[-1]['mem_bits'] / spec.params:.3f} cooled ({time.perf_counter() - started:.0f} s)",
                  flush=True)
            previous = store
    return {"kind": "truth", **dataclasses.asdict(job), "params": spec.params, "stable_mem_bits": stable,
            "annealed": annealed, "wall_s": time.perf_counter() - started}


def run_recipe(job: RecipeJob) -> dict:
    started = time.perf_counter()
    spec = cell(job.shape, job.num_sequences, job.train, job.seed)
    members = synthetic_members(spec.data, job.seed)
    result = train(spec, members, device=CPU, evaluate=mem_bits_evaluator(spec.data, members))
    return {"kind": "recipe", "recipe": job.recipe, "shape": job.shape, "num_sequences": job.num_sequences,
            "seed": job.seed, "train": dataclasses.asdict(job.train), "params": spec.params,
            "flops_per_step": spec.train_flops_per_step, "steps": result.steps, "converged": result.converged,
            "converged_step": result.converged_step, "decay_start_step": result.decay_start_step,
            "gain_last_doubling": result.gain_last_doubling,
            "mem_history": [[s, v] for s, v in result.mem_history], "wall_s": time.perf_counter() - started}


def _one_thread() -> None:
    torch.set_num_threads(1)


def _run(job: TruthJob | RecipeJob) -> dict:
    print(f"  start {job.label} ({job.work()[1]:,} steps at most)", flush=True)
    return job.run()


# -- the plan's length -----------------------------------------------------------------------------------
BATCHES_TIMED = (64, 512)  # a step's cost is taken as linear in the batch between these


def calibrate(shapes: tuple[str, ...], steps: int) -> dict[str, dict]:
    """Seconds per training step (fixed part and per sequence of the batch) of each shape, measured here
    and now on one thread, from the difference of a short and a longer run (the set-up cancels)."""
    _one_thread()
    costs = {}
    for shape in shapes:
        per_batch = []
        for batch in BATCHES_TIMED:
            spec = lambda n: cell(shape, 512, replace(train_recipe("cpu"), batch_size=batch, max_steps=n,
                                                      eval_interval=NO_EVAL, checkpoint_interval=NO_EVAL), 0)
            members = synthetic_members(spec(1).data, 0)
            train(spec(3), members, device=CPU, evaluate=no_eval)  # warm-up: allocator, lazy kernels
            short = timed(lambda: train(spec(steps), members, device=CPU, evaluate=no_eval))
            long = timed(lambda: train(spec(3 * steps), members, device=CPU, evaluate=no_eval))
            per_batch.append(max(long - short, 1e-9) / (2 * steps))
        per_sequence = max((per_batch[1] - per_batch[0]) / (BATCHES_TIMED[1] - BATCHES_TIMED[0]), 0.0)
        costs[shape] = {"fixed_s": max(per_batch[0] - per_sequence * BATCHES_TIMED[0], 0.0),
                        "per_sequence_s": per_sequence, "step_s_batch64": per_batch[0]}
    return costs


def planned_s(job: TruthJob | RecipeJob, costs: dict[str, dict]) -> float:
    """The job's time by the measured costs, every run to its cap (an upper bound for the recipes);
    an evaluation scores the N members, a forward pass at about a third of a training step's cost."""
    cost, (batch, steps, evaluations) = costs[job.shape], job.work()
    return (steps * (cost["fixed_s"] + cost["per_sequence_s"] * batch)
            + evaluations * cost["per_sequence_s"] * job.num_sequences / 3)


def makespan_s(durations: list[float], workers: int) -> float:
    """The wall time of jobs taken longest first by `workers` processes (the pool's order)."""
    loads = [0.0] * workers
    for duration in sorted(durations, reverse=True):
        loads[loads.index(min(loads))] += duration
    return max(loads)


# -- the analysis ----------------------------------------------------------------------------------------
def finite_or_none(value: float) -> float | None:
    """An interval's end for JSON: None where it is unbounded."""
    return float(value) if math.isfinite(value) else None


def truth_summary(runs: list[dict]) -> dict:
    """The asymptote of one (shape, size) from its seeds' annealed curves: A fitted to their mean by
    measure.asymptote.fit_asymptote; the interval the union of the fit's and of the asymptotes fitted
    to each seed alone. Where the mean is not extrapolable (no saturation seen: the exponent at a
    bound, and the like), A is the longest horizon's mean, labelled a lower bound with the fit's
    reason, and the interval has no upper end (None)."""
    horizons = [a["horizon_steps"] for a in runs[0]["annealed"]]
    curves = np.array([[a["mem_bits"] for a in run["annealed"]] for run in runs])  # (seeds, horizons)
    mean = curves.mean(axis=0)
    params = runs[0]["params"]
    out = {"shape": runs[0]["shape"], "num_sequences": runs[0]["num_sequences"], "params": params,
           "seeds": [run["seed"] for run in runs], "horizons_steps": horizons,
           "annealed_mean_bits": mean.tolist(), "annealed_bits_by_seed": curves.tolist(),
           "stable_mean_bits": np.mean([[v for _, v in run["stable_mem_bits"]] for run in runs], axis=0).tolist(),
           "branch_converged": [[a["converged"] for a in run["annealed"]] for run in runs],
           "longest_annealed_bits": float(mean[-1])}
    fit = fit_asymptote(horizons, mean)
    if not fit.extrapolable:
        return {**out, "asymptote_bits": float(mean[-1]), "interval_bits": [float(curves[:, -1].min()), None],
                "asymptote_kind": f"longest horizon, a lower bound ({fit.reason})", "fit": None,
                "bits_per_param": float(mean[-1]) / params, "longest_over_asymptote": 1.0}
    per_seed = [f.asymptote_bits for f in (fit_asymptote(horizons, c) for c in curves) if f.extrapolable]
    interval = [min(fit.ci_low_bits, *per_seed), max(fit.ci_high_bits, *per_seed)]
    return {**out, "asymptote_bits": fit.asymptote_bits, "interval_bits": interval, "asymptote_kind": "fit",
            "fit": dataclasses.asdict(fit), "per_seed_asymptote_bits": per_seed,
            "bits_per_param": fit.asymptote_bits / params, "longest_over_asymptote": float(mean[-1]) / fit.asymptote_bits}


def first_reaching(history: list[list[float]], level: float) -> int | None:
    """The step of the first evaluation at or above `level` (None if none is)."""
    return next((int(step) for step, value in history if value >= level), None)


def recipe_row(run: dict, truth: dict) -> dict:
    """One recipe run judged against its (shape, size)'s asymptote A."""
    asymptote = truth["asymptote_bits"]
    final = run["mem_history"][-1][1]
    reached = first_reaching(run["mem_history"], REACHED_FRACTION * asymptote)
    within = abs(final - asymptote) <= RIGHT_TOLERANCE * asymptote
    flops = run["flops_per_step"]
    return {"recipe": run["recipe"], "shape": run["shape"], "num_sequences": run["num_sequences"], "seed": run["seed"],
            "batch_size": run["train"]["batch_size"], "asymptote_bits": asymptote,
            "asymptote_kind": truth["asymptote_kind"], "final_mem_bits": final,
            "fraction_of_asymptote": final / asymptote, "steps_to_98pct": reached,
            "flops_to_98pct": None if reached is None else reached * flops, "steps": run["steps"],
            "flops": run["steps"] * flops, "converged": run["converged"], "converged_step": run["converged_step"],
            "decay_start_step": run["decay_start_step"], "within_2pct": within,
            "converged_right": run["converged"] == within,
            "unconverged_within_2pct": (not run["converged"]) and within}


def recipe_summaries(rows: list[dict]) -> dict[str, dict]:
    """Per recipe, over its runs: the least fraction of A reached, how many runs reached 98% of A and
    were right about converging, and the FLOPs spent."""
    out = {}
    for name in dict.fromkeys(row["recipe"] for row in rows):
        mine = [row for row in rows if row["recipe"] == name]
        reached = [row["flops_to_98pct"] for row in mine if row["flops_to_98pct"] is not None]
        out[name] = {"runs": len(mine), "min_fraction_of_asymptote": min(r["fraction_of_asymptote"] for r in mine),
                     "reached_98pct": len(reached), "converged_right": sum(r["converged_right"] for r in mine),
                     "flops_total": sum(r["flops"] for r in mine),
                     "flops_to_98pct_max": max(reached) if len(reached) == len(mine) else None}
    return out


def analyse(runs: list[dict]) -> dict:
    """Everything computable from the runs finished so far."""
    truths = {}
    for run in runs:
        if run["kind"] == "truth":
            truths.setdefault((run["shape"], run["num_sequences"]), []).append(run)
    summaries = {key: truth_summary(sorted(seeds, key=lambda r: r["seed"])) for key, seeds in truths.items()}
    rows = [recipe_row(run, summaries[(run["shape"], run["num_sequences"])]) for run in runs
            if run["kind"] == "recipe" and (run["shape"], run["num_sequences"]) in summaries]
    return {"truth": list(summaries.values()), "rows": rows, "summary": recipe_summaries(rows)}


# -- the validation: extrapolating from a run's first branches ------------------------------------------
TARGET_COVERAGE = 0.90  # of A's interval, over the truth cells: the project's target
TARGET_BIAS = 0.03  # |A_k - A| / A of the extrapolation from the branches up to TARGET_LAST_HORIZON
TARGET_LAST_HORIZON = 16000
TRUTH_FIRST_BRANCH = 2000  # the long-run asymptote fits the branches from here on (earlier ones bias it)
PLANTED_DRAWS = 200  # noisy planted curves per (method, branches) for the interval's calibration


def truth_runs_in(files: list[tuple[str, dict]]) -> list[dict]:
    """The ground-truth runs of results files ((name, results) pairs), each with its file's name."""
    return [{**run, "file": name} for name, results in files for run in results["runs"] if run["kind"] == "truth"]


def run_key(run: dict) -> tuple:
    return run["shape"], run["num_sequences"], run["seed"]


def run_curve(run: dict) -> tuple[list[int], list[float]]:
    return [a["horizon_steps"] for a in run["annealed"]], [a["mem_bits"] for a in run["annealed"]]


def long_run_truths(runs: list[dict]) -> dict[tuple, dict]:
    """Per (shape, N, seed): its long-run asymptote, fitted (DEFAULT_METHOD) to the branches from
    TRUTH_FIRST_BRANCH on of the run that reaches the longest horizon (the 6 branches 2K..64K of the
    committed truth runs; runs of one seed share their trunk, bit for bit: the first such run)."""
    longest = {}
    for run in runs:
        if run_key(run) not in longest or run_curve(run)[0][-1] > run_curve(longest[run_key(run)])[0][-1]:
            longest[run_key(run)] = run
    truths = {}
    for key, run in longest.items():
        horizons, values = run_curve(run)
        used = [i for i, h in enumerate(horizons) if h >= TRUTH_FIRST_BRANCH]
        fit = fit_asymptote([horizons[i] for i in used], [values[i] for i in used])
        truths[key] = {"file": run["file"], "horizons_steps": [horizons[i] for i in used],
                       "extrapolable": fit.extrapolable, "reason": fit.reason, "asymptote_bits": fit.asymptote_bits,
                       "interval_bits": [fit.ci_low_bits, fit.ci_high_bits], "exponent": fit.exponent,
                       "last_branch_bits": values[-1]}
    return truths


def extrapolation_row(run: dict, start: int, stop: int, truth: dict, methods: tuple[str, ...]) -> dict:
    """The extrapolation from the run's branches start .. stop - 1 (a schedule whose first branch is
    the start's), judged against its long-run asymptote."""
    horizons, values = (c[start:stop] for c in run_curve(run))
    k, truth_a = len(horizons), truth["asymptote_bits"]
    row = {"file": run["file"], "shape": run["shape"], "num_sequences": run["num_sequences"], "seed": run["seed"],
           "first_branch_steps": horizons[0], "k": k, "last_horizon_steps": horizons[-1],
           "truth_asymptote_bits": truth_a, "truth_interval_bits": truth["interval_bits"],
           "truth_last_horizon_steps": truth["horizons_steps"][-1], "truth_last_branch_bits": truth["last_branch_bits"],
           "last_branch_bits": values[-1], "last_branch_bias": (values[-1] - truth_a) / truth_a}
    fits = {method: fit_asymptote(horizons, values, method) for method in methods}
    fit = fits[DEFAULT_METHOD]
    row.update(extrapolable=fit.extrapolable, reason=fit.reason, asymptote_bits=fit.asymptote_bits,
               exponent=fit.exponent, bias=None if not fit.extrapolable else (fit.asymptote_bits - truth_a) / truth_a,
               covers=None if not fit.extrapolable else bool(fit.ci_low_bits <= truth_a <= fit.ci_high_bits))
    row["intervals"] = {m: {"low": f.ci_low_bits, "high": f.ci_high_bits,
                            "covers": bool(f.ci_low_bits <= truth_a <= f.ci_high_bits),
                            "width": (f.ci_high_bits - f.ci_low_bits) / truth_a}
                        for m, f in fits.items() if f.extrapolable}
    return row


def extrapolation_rows(runs: list[dict], truths: dict, methods: tuple[str, ...]) -> list[dict]:
    """Every run, every first branch it has up to TRUTH_FIRST_BRANCH, every k from 3 up to the branches
    short of its truth's longest horizon; a window two runs share (the same trunk) is counted once."""
    rows, seen = [], set()
    for run in runs:
        truth = truths[run_key(run)]
        if not truth["extrapolable"]:
            continue
        horizons = run_curve(run)[0]
        for start in (i for i, h in enumerate(horizons) if h <= TRUTH_FIRST_BRANCH):
            for stop in range(start + MIN_BRANCHES - 1, len(horizons) + 1):
                window = (run_key(run), tuple(horizons[start:stop]))
                if horizons[stop - 1] < truth["horizons_steps"][-1] and window not in seen:
                    seen.add(window)
                    rows.append(extrapolation_row(run, start, stop, truth, methods))
    return sorted(rows, key=lambda r: (r["first_branch_steps"], r["k"], r["shape"], r["seed"]))


def group_summary(rows: list[dict], methods: tuple[str, ...]) -> dict:
    """Bias and coverage over some rows (one (first branch, k), say)."""
    fitted = [r for r in rows if r["extrapolable"]]
    biases = [abs(r["bias"]) for r in fitted]
    out = {"runs": len(rows), "extrapolable": len(fitted),
           "not_extrapolable_reasons": sorted({r["reason"] for r in rows if not r["extrapolable"]}),
           "mean_abs_bias": float(np.mean(biases)) if biases else None,
           "max_abs_bias": float(np.max(biases)) if biases else None,
           "mean_bias": float(np.mean([r["bias"] for r in fitted])) if fitted else None,
           "mean_abs_last_branch_bias": float(np.mean([abs(r["last_branch_bias"]) for r in rows]))}
    out["by_method"] = {}
    for method in methods:
        judged = [r["intervals"][method] for r in rows if method in r["intervals"]]
        out["by_method"][method] = {
            "judged": len(judged), "coverage": float(np.mean([j["covers"] for j in judged])) if judged else None,
            "median_width": float(np.median([j["width"] for j in judged])) if judged else None,
            "below_measured": sum(j["low"] < r["last_branch_bits"] for r in rows
                                  for j in [r["intervals"].get(method)] if j is not None)}
    out["coverage"] = out["by_method"][DEFAULT_METHOD]["coverage"]
    return out


def grouped(rows: list[dict], fields: tuple[str, ...], methods: tuple[str, ...]) -> list[dict]:
    keys = dict.fromkeys(tuple(r[f] for f in fields) for r in rows)
    return [{**dict(zip(fields, key)), **group_summary([r for r in rows if tuple(r[f] for f in fields) == key],
                                                        methods)} for key in keys]


def planted_coverage(methods: tuple[str, ...], draws: int = PLANTED_DRAWS, branches=(4, 5, 6)) -> dict:
    """The intervals' coverage where the model holds: curves A - B T^-c from 2K steps (A, c and the gap
    drawn as the truth runs show them), with Gaussian noise of NOISE_FLOOR x a(T_last) per branch."""
    out = {}
    for method in methods:
        out[method] = {}
        for n in branches:
            rng = np.random.default_rng(n)  # the same curves for every method
            horizons = 2000 * 2.0 ** np.arange(n)
            covered = fitted = 0
            for _ in range(draws):
                a, c, gap = rng.uniform(1e4, 5e4), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.3)
                clean = a - gap * a * (horizons / horizons[-1]) ** -c
                fit = fit_asymptote(horizons, clean + NOISE_FLOOR * clean[-1] * rng.standard_normal(n), method)
                fitted += fit.extrapolable
                covered += bool(fit.extrapolable and fit.ci_low_bits <= a <= fit.ci_high_bits)
            out[method][str(n)] = covered / fitted if fitted else None
    return out


def method_choice(rows: list[dict], planted: dict, methods: tuple[str, ...]) -> dict:
    """The interval method these rows (one first branch) pick. Honest: its coverage of the truth cells
    (every k extrapolable) and of planted curves (every count of branches) reaches TARGET_COVERAGE. Of
    the honest methods whose interval never reaches below the value already measured at the k-th
    branch (B >= 0: a(T) rises to A), the narrowest median interval at 4 branches; beside it, whether
    that is the shipped default."""
    overall = group_summary(rows, methods)["by_method"]
    four = group_summary([r for r in rows if r["k"] == MIN_BRANCHES], methods)["by_method"]
    honest = [m for m in methods if (overall[m]["coverage"] or 0) >= TARGET_COVERAGE
              and all((v or 0) >= TARGET_COVERAGE for v in planted[m].values())]
    sound = [m for m in honest if not overall[m]["below_measured"]]
    pick = min(sound, key=lambda m: four[m]["median_width"]) if sound else None
    figures = "; ".join(f"{m}: truth coverage {fmt(overall[m]['coverage'], '.0%')}, planted "
                        + "/".join(fmt(v, ".0%") for v in planted[m].values())
                        + f" (4/5/6 branches), below a(T_k) in {overall[m]['below_measured']} of "
                        f"{overall[m]['judged']}, median width at 4 branches {fmt(four[m]['median_width'], '.1%')}"
                        for m in methods)
    why = (f"'{pick}' is the narrowest interval that covers A in {TARGET_COVERAGE:.0%} or more of the truth "
           f"cells and of planted curves and never reaches below the measured a(T_k) ({figures})" if pick else
           f"no method covers A in {TARGET_COVERAGE:.0%} of the truth cells and of planted curves without "
           f"reaching below the measured a(T_k) ({figures})")
    return {"chosen": pick, "shipped_default": DEFAULT_METHOD, "default_is_chosen": pick == DEFAULT_METHOD,
            "honest": honest, "why": why, "truth_coverage": overall, "planted_coverage": planted}


def targets(rows: list[dict]) -> dict:
    """The project's two targets per first branch, judged on the shipped default: coverage >= 90% over
    every extrapolable truth cell and k, and |bias| <= 3% on every cell extrapolated from its branches
    up to 16K steps (k = 4 from a first branch at 2K)."""
    out = {}
    for first in sorted({r["first_branch_steps"] for r in rows}):
        fitted = [r for r in rows if r["first_branch_steps"] == first and r["extrapolable"]]
        coverage = float(np.mean([r["covers"] for r in fitted])) if fitted else None
        mine = [r for r in rows if r["first_branch_steps"] == first and r["last_horizon_steps"] == TARGET_LAST_HORIZON]
        biases = [abs(r["bias"]) for r in mine if r["extrapolable"]]
        out[str(first)] = {
            "coverage": coverage, "coverage_cells": len(fitted),
            "coverage_met": coverage is not None and coverage >= TARGET_COVERAGE,
            "bias_k": mine[0]["k"] if mine else None, "bias_cells": len(mine), "bias_extrapolable": len(biases),
            "mean_abs_bias": float(np.mean(biases)) if biases else None,
            "max_abs_bias": float(np.max(biases)) if biases else None,
            "bias_met": bool(biases) and len(biases) == len(mine) and max(biases) <= TARGET_BIAS}
    return out


def validate(files: list[tuple[str, dict]], methods: tuple[str, ...] = INTERVAL_METHODS,
             planted_draws: int = PLANTED_DRAWS) -> dict:
    """The validation of measure.asymptote on results files ((name, results) pairs, no training): per
    truth run and k, the extrapolation from its first k branches against its long-run asymptote."""
    runs = truth_runs_in(files)
    truths = long_run_truths(runs)
    rows = extrapolation_rows(runs, truths, methods)
    planted = planted_coverage(methods, planted_draws)
    return {"files": [name for name, _ in files], "default_method": DEFAULT_METHOD, "methods": list(methods),
            "noise_floor": NOISE_FLOOR, "min_branches": MIN_BRANCHES, "truth_first_branch": TRUTH_FIRST_BRANCH,
            "truths": [{"shape": s, "num_sequences": n, "seed": seed, **t} for (s, n, seed), t in truths.items()],
            "rows": rows, "by_k": grouped(rows, ("first_branch_steps", "k", "last_horizon_steps"), methods),
            "by_shape": grouped(rows, ("first_branch_steps", "k", "shape"), methods),
            "targets": targets(rows),
            "method_choice": {str(first): method_choice([r for r in rows if r["first_branch_steps"] == first],
                                                        planted, methods)
                              for first in sorted({r["first_branch_steps"] for r in rows})}}


def print_validation(v: dict) -> None:
    print(f"extrapolation from a run's first k branches vs its long-run asymptote (fit to its branches from "
          f"{TRUTH_FIRST_BRANCH}); interval: {v['default_method']}; files: {', '.join(v['files'])}")
    print(f"{'first':>5} {'k':>2} {'last T':>6} {'runs':>4} {'fit':>3} {'mean|bias|':>10} {'max|bias|':>9} "
          f"{'coverage':>8} {'width':>6} {'a(T_k) short':>12}")
    for g in v["by_k"]:
        head = f"{g['first_branch_steps']:>5} {g['k']:>2} {g['last_horizon_steps']:>6} {g['runs']:>4} {g['extrapolable']:>3}"
        if not g["extrapolable"]:
            print(f"{head}  not extrapolable: {'; '.join(g['not_extrapolable_reasons'])}")
            continue
        width = g["by_method"][v["default_method"]]["median_width"]
        print(f"{head} {g['mean_abs_bias']:>10.1%} {g['max_abs_bias']:>9.1%} {g['coverage']:>8.0%} {width:>6.1%} "
              f"{g['mean_abs_last_branch_bias']:>12.1%}")
    print(f"\n{'shape':7} {'seed':>4} {'first':>5} {'k':>2} {'A_k':>7} {'interval':>17} {'A':>7} {'a(Tmax)':>7} "
          f"{'bias':>6} {'covers':>6}")
    for r in v["rows"]:
        if not r["extrapolable"]:
            continue
        i = r["intervals"][v["default_method"]]
        print(f"{r['shape']:7} {r['seed']:>4} {r['first_branch_steps']:>5} {r['k']:>2} {r['asymptote_bits']:>7.0f} "
              f"[{i['low']:>7.0f}, {i['high']:>7.0f}] {r['truth_asymptote_bits']:>7.0f} {r['truth_last_branch_bits']:>7.0f} "
              f"{r['bias']:>+6.1%} {str(r['covers']):>6}")
    for first, t in v["targets"].items():
        print(f"\nfirst branch {first} steps: coverage {fmt(t['coverage'], '.0%')} over {t['coverage_cells']} cells "
              f"(target >= {TARGET_COVERAGE:.0%}: {'met' if t['coverage_met'] else 'NOT met'}); |bias| from branches "
              f"{first}..{TARGET_LAST_HORIZON} (k = {t['bias_k']}): mean {fmt(t['mean_abs_bias'], '.1%')}, max "
              f"{fmt(t['max_abs_bias'], '.1%')} over {t['bias_cells']} cells (target <= {TARGET_BIAS:.0%} on every "
              f"cell: {'met' if t['bias_met'] else 'NOT met'})")
        choice = v["method_choice"][first]
        print(f"  interval method chosen: {choice['chosen']} (shipped default {choice['shipped_default']}): "
              f"{choice['why']}")


def validate_files(paths: list[str], out: str, planted_draws: int = PLANTED_DRAWS) -> dict:
    """`--validate`: read results files, validate, write convergence-validation-<UTC>.json, print."""
    files = [(Path(p).name, json.loads(Path(p).read_text())) for p in paths]
    validation = {"machine": machine(), "started": datetime.now(timezone.utc).isoformat(),
                  **validate(files, planted_draws=planted_draws)}
    validation = json.loads(json.dumps(validation, default=lambda value: value.item()))  # numpy scalars: plain
    path = results_path(out, "convergence-validation-")
    save_results(validation, path)
    print_validation(validation)
    print(f"wrote {path}")
    return validation


# -- the run and its output ------------------------------------------------------------------------------
def estimate(plan: Plan, jobs: list, costs: dict[str, dict]) -> dict:
    durations = [planned_s(job, costs) for job in jobs]
    return {"jobs": len(jobs), "truth_steps": sum(job.work()[1] for job in jobs if isinstance(job, TruthJob)),
            "recipe_steps_at_most": sum(job.work()[1] for job in jobs if isinstance(job, RecipeJob)),
            "at_most_s": makespan_s(durations, plan.workers), "work_s": sum(durations), "workers": plan.workers,
            "step_costs": costs}


def print_estimate(est: dict) -> None:
    per_step = ", ".join(f"{shape} {c['step_s_batch64'] * 1e3:.1f} ms" for shape, c in est["step_costs"].items())
    print(f"plan: {est['jobs']} jobs; ground truth {est['truth_steps']:,} steps, recipes at most "
          f"{est['recipe_steps_at_most']:,}; a batch-64 step measured now: {per_step}", flush=True)
    print(f"expected: at most {est['at_most_s'] / 60:.0f} min on {est['workers']} workers "
          f"(every recipe to its cap; {est['work_s'] / 60:.0f} worker-minutes)", flush=True)


def run_plan(plan: Plan, jobs: list, results: dict, path) -> None:
    """Run the jobs on a pool, longest first; after each, record it, analyse, rewrite the results file
    and print progress with an upper bound of the time left."""
    costs = results["estimate"]["step_costs"]
    pending = {job: planned_s(job, costs) for job in sorted(jobs, key=lambda j: planned_s(j, costs), reverse=True)}
    began, spent_planned, spent_s = time.perf_counter(), 0.0, 0.0
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's threads
    with ProcessPoolExecutor(plan.workers, mp_context=context, initializer=_one_thread) as pool:
        futures = {pool.submit(_run, job): job for job in pending}
        for done, future in enumerate(as_completed(futures), 1):
            job, outcome = futures[future], "done"
            try:
                run = future.result()
            except Exception as error:  # a failed job is recorded; the study goes on without it
                results["failed"].append({"job": job.label, "error": repr(error)})
                pending.pop(job)
                outcome = f"FAILED ({error!r})"
            else:
                results["runs"].append(run)
                spent_planned, spent_s = spent_planned + pending.pop(job), spent_s + run["wall_s"]
            results.update(analyse(results["runs"]), stage=f"{done}/{len(futures)} jobs")
            save_results(results, path)
            speed = spent_s / spent_planned if spent_planned else 1.0
            left = makespan_s(list(pending.values()), plan.workers) * speed
            print(f"[{done}/{len(futures)}] {job.label} {outcome}; {(time.perf_counter() - began) / 60:.1f} min in, "
                  f"at most ~{left / 60:.0f} min left", flush=True)


def fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: dict) -> None:
    print("\nground truth: asymptote A of annealed mem_bits (fit to the seeds' mean), bits/param")
    print(f"{'shape':8} {'N':>5} {'A bits':>9} {'interval':>19} {'A/param':>8} {'a(Tmax)/A':>9} {'c':>5}")
    for t in results["truth"]:
        low, high = t["interval_bits"]
        print(f"{t['shape']:8} {t['num_sequences']:>5} {t['asymptote_bits']:>9.0f} "
              f"[{fmt(low, '8.0f')}, {fmt(high, '8.0f')}] {t['bits_per_param']:>8.3f} "
              f"{fmt(t.get('longest_over_asymptote')):>9} "
              f"{fmt(t['fit']['exponent'] if t['fit'] else None, '.2f'):>5}"
              + ("" if t["asymptote_kind"] == "fit" else f"  A is the {t['asymptote_kind']}"))
    print(f"\n{'recipe':17} {'shape':7} {'N':>5} {'final/A':>7} {'steps98':>7} {'GFLOP98':>8} {'steps':>6} "
          f"{'GFLOP':>7} {'conv':>5} {'right':>5}")
    for r in results["rows"]:
        gflop98 = None if r["flops_to_98pct"] is None else r["flops_to_98pct"] / 1e9
        print(f"{r['recipe']:17} {r['shape']:7} {r['num_sequences']:>5} {r['fraction_of_asymptote']:>7.3f} "
              f"{fmt(r['steps_to_98pct'], 'd'):>7} {fmt(gflop98, '.0f'):>8} {r['steps']:>6} {r['flops'] / 1e9:>7.0f} "
              f"{str(r['converged']):>5} {str(r['converged_right']):>5}"
              + ("  (said unconverged, within 2%)" if r["unconverged_within_2pct"] else ""))
    for failure in results["failed"]:
        print(f"FAILED {failure['job']}: {failure['error']}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.convergence", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a check of the script: ~2 min on 2 cores")
    parser.add_argument("--dry-run", action="store_true", help="measure step costs, print the plan's length, stop")
    parser.add_argument("--shapes", nargs="+", default=["l1_d16", "l2_d16", "l1_d32"])
    parser.add_argument("--sizes-x", nargs="+", type=float, default=[8.0],
                        help="dataset sizes in multiples of the prior capacity (2.7 bits/param)")
    parser.add_argument("--truth-seeds", type=int, default=2)
    parser.add_argument("--first-truth-seed", type=int, default=0, help="the ground truth's first seed")
    parser.add_argument("--seeds", type=int, default=1, help="seeds of each recipe run")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--horizons", nargs="+", type=int, default=list(HORIZONS_STEPS),
                        help="steps of the ground truth's long run at which a cool-down branches off")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--validate", nargs="+", metavar="FILE",
                        help="train nothing: validate the asymptote's extrapolation on these results files")
    parser.add_argument("--planted-draws", type=int, default=PLANTED_DRAWS,
                        help="with --validate: noisy planted curves per method and number of branches")
    args = parser.parse_args(argv)
    if args.validate:
        return validate_files(args.validate, args.out, args.planted_draws)
    plan = full_plan(args)
    jobs = plan_jobs(plan)
    est = estimate(plan, jobs, calibrate(plan.shapes, 20 if args.quick else 50))
    print_estimate(est)
    results = {"machine": machine(), "started": datetime.now(timezone.utc).isoformat(), "quick": args.quick,
               "plan": dataclasses.asdict(plan), "estimate": est, "runs": [], "failed": [], "truth": [], "rows": [],
               "summary": {}, "stage": "planned"}
    if args.dry_run:
        return results
    path = results_path(args.out, "convergence-")
    print(f"writing {path} after each job", flush=True)
    started = time.perf_counter()
    run_plan(plan, jobs, results, path)
    results["wall_s"] = time.perf_counter() - started
    save_results(results, path)
    print_table(results)
    return results


if __name__ == "__main__":
    main()
