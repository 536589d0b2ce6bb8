"""Memorization capacity on a lent GPU, in one call of about 8 minutes: the paper's own l1_d32 row in
fp32 and bf16, and the laptop shape, on the branches schedule with the asymptote extrapolated.

    python -m bench.capacity_probe [--device cuda] [--budget-s 130] [--paper-size-x 2] [--out DIR] [--runs NAME ...]
    python -m bench.capacity_probe --device cpu --quick      # the same code on toy sizes (CI)

Three runs, each within `--budget-s` seconds (its measurement of the step time included):

- paper_l1_d32_fp32, paper_l1_d32_bf16: l1_d32 on the paper's data (V=2048, S=64) holding
  `--paper-size-x` times the capacity the paper reports for that row (4.23 bits/param fp32; the bf16
  run gets the same data), so past capacity, with the paper recipe (conf/train/paper.yaml: branches from
  1,000 steps, the asymptote fitted from 2,000, batch 2048, lr 1e-3, warm-up 1,000); the paper reports
  4.23 bits/param fp32 and 3.93 bf16. At 2x (966 sequences) a batch of 2048 holds the whole dataset
  about twice: full-batch training, in effect.
- laptop_l1_d16: l1_d16 (V=64, S=32) with the CPU recipe (conf/train/cpu.yaml: branches from 500 steps,
  the asymptote from 2,000) on datasets 2x and 8x past its CPU plateau (2.7 bits/param), one pack, its
  horizons capped at 32,000 steps.

Every run trains on the `branches` schedule (models/progress.py): a constant-rate trunk, and at each
horizon T (first_branch, then its doublings) a branch that cools down over cooldown_fraction * T steps
and is measured, a(T); a cell converges when |a(T) - a(T/2)| < converge_tol * a(T). After timing a step
and an evaluation, a run takes the largest horizon cap (a doubling of first_branch, at most the wanted
steps) whose whole cost fits the budget: TrainSpec.steps_through(last horizon) steps (the trunk and every
branch), an evaluation at each branch's end and one every eval_interval steps of the trunk (at most
cap/16, for its curve). first_branch and asymptote_from stay the recipe's; when the budget holds fewer
than 4 branches from asymptote_from the run says so (`asymptote_plan`): the asymptote will be "not
extrapolable" and the measured value is a lower bound on it. (--quick alone shrinks the paper recipe's
horizons, to exercise the fit on toy sizes.)

Per cell: the measured mem_bits (its last branch, the cell's model) and bits/param, whether it converged
(the annealed rule) and at which horizon, every branch (T, a(T), exposures), and the asymptote that the
branches from asymptote_from extrapolate to (measure.asymptote, as measure.cell.training_metrics gives
the sweep's cells: `mem_bits_asymptote` with its 95% interval, bits/param, `fraction_of_asymptote`), or
why it is not extrapolable, beside the paper's value. Writes bench/results/capacity_probe-<UTC time>.json
after each run. Imports torch, numpy, PyYAML, scipy and this repository's models/ and measure/ only
(what the GPU image holds; not measure.cell, which needs pyarrow).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from datetime import datetime, timezone

import torch

from bench.common import (
    CPU_PLATEAU_BITS_PER_PARAM,
    NO_EVAL,
    RESULTS,
    machine,
    mem_bits_evaluator,
    model_spec,
    past_capacity,
    results_path,
    save_results,
    sync,
    timed,
    train_recipe,
)
from measure.asymptote import MIN_BRANCHES, asymptote_metrics, fit_asymptote
from measure.paper import reference_rows
from models.data import synthetic_members
from models.packed import train_packed
from models.spec import CellSpec, DataSpec, TrainSpec
from models.train import train

PAPER_DATA = DataSpec(vocab_size=2048, seq_len=64, num_sequences=1, num_nonmembers=256)
LAPTOP_DATA = DataSpec(vocab_size=64, seq_len=32, num_sequences=1, num_nonmembers=256)
LAPTOP_SIZES_X = (2.0, 8.0)  # the laptop shape's datasets, in multiples of its CPU plateau
LAPTOP_TARGET_STEPS = 8 * 4000  # horizons up to 32,000 steps: the CPU recipe's cap
TRUNK_EVALUATIONS = 16  # the trunk's curve: at most cap/16 steps between evaluations (the rule reads branches)
QUICK_BRANCHES = {"first_branch": 10, "asymptote_from": 10, "warmup_steps": 2}  # --quick: 4 branches in ~110 steps
BUDGET_MARGIN = 0.9  # of the time left after measuring: steps jitter, evaluations too
RUNS = ("paper_l1_d32_fp32", "paper_l1_d32_bf16", "laptop_l1_d16")  # the names `probes` gives its runs


@dataclasses.dataclass(frozen=True)
class Probe:
    """One run: cells of one recipe (a pack when several) and what bounds its horizons."""

    name: str
    cells: tuple[CellSpec, ...]  # their train.max_steps is provisional until the cap is measured
    target_steps: int  # the last horizon wanted at most; the budget may allow fewer
    paper_bits_per_param: float | None = None  # the paper's figure for this row, where it has one


def paper_row() -> dict:
    """The paper's l1_d32 row of capacity_by_precision.csv."""
    return next(r for r in reference_rows("capacity_by_precision.csv") if r["n_layer"] == 1 and r["d_model"] == 32)


def probes(args: argparse.Namespace) -> list[Probe]:
    paper, cpu, row = train_recipe("paper"), train_recipe("cpu"), paper_row()
    if args.quick:  # toy sizes: a check of the code, not a measurement (short horizons, so the fit runs)
        paper = dataclasses.replace(paper, batch_size=8, **QUICK_BRANCHES)
    paper, cpu = (dataclasses.replace(r, schedule="branches") for r in (paper, cpu))
    shape = model_spec("l1_d32")
    params = CellSpec(shape, PAPER_DATA, paper, "fp32", 0).params
    n_paper = 64 if args.quick else past_capacity(params, PAPER_DATA, row["bits_per_param_fp32"], args.paper_size_x)
    data = dataclasses.replace(PAPER_DATA, num_sequences=n_paper)
    out = [Probe(f"paper_l1_d32_{precision}", (CellSpec(shape, data, paper, precision, 0),), paper.max_steps,
                 row[f"bits_per_param_{precision}"]) for precision in ("fp32", "bf16")]
    laptop = model_spec("l1_d16")
    laptop_params = CellSpec(laptop, LAPTOP_DATA, cpu, "fp32", 0).params
    cells = tuple(CellSpec(laptop, dataclasses.replace(LAPTOP_DATA, num_sequences=past_capacity(
        laptop_params, LAPTOP_DATA, CPU_PLATEAU_BITS_PER_PARAM, x)), cpu, "fp32", 0) for x in LAPTOP_SIZES_X)
    return out + [Probe("laptop_l1_d16", cells, LAPTOP_TARGET_STEPS)]


def with_cap(spec: CellSpec, cap_steps: int) -> CellSpec:
    """`spec` on the branches schedule with its horizons capped at `cap_steps` (max_steps): the trunk
    evaluated every cap/16 steps at most; the recipe's warm-up, first_branch and asymptote_from, except
    that a cap below first_branch (one branch, at the cap) gets a warm-up of at most a tenth of it."""
    hp = spec.train
    warmup = hp.warmup_steps if cap_steps >= hp.first_branch else min(hp.warmup_steps, cap_steps // 10)
    return dataclasses.replace(spec, train=dataclasses.replace(
        hp, schedule="branches", max_steps=cap_steps, warmup_steps=warmup, checkpoint_interval=NO_EVAL,
        eval_interval=max(1, min(hp.eval_interval, cap_steps // TRUNK_EVALUATIONS))))


def train_cells(cells: tuple[CellSpec, ...], device: torch.device, evaluated: bool = True) -> list:
    """Train the cells (alone, or as one pack), evaluating mem_bits on their cadence; with `evaluated`
    False (to time steps) only at each branch's end, where train() always evaluates."""
    members = [synthetic_members(c.data, c.seed) for c in cells]
    if not evaluated:
        cells = tuple(dataclasses.replace(c, train=dataclasses.replace(c.train, eval_interval=NO_EVAL))
                      for c in cells)
    evaluates = [mem_bits_evaluator(c.data, m) for c, m in zip(cells, members)]
    if len(cells) == 1:
        return [train(cells[0], members[0], device=device, evaluate=evaluates[0])]
    return train_packed(list(cells), members, device=device, evaluates=evaluates)


def measured_costs(probe: Probe, device: torch.device, steps: int) -> dict:
    """Seconds per training step of the probe's cells together and per evaluation of one cell, after a
    warm-up: the difference of a run of `steps` and one of 3 * `steps` (each with its one branch; the
    faster of two tries of each) over the difference of their steps, so set-up cancels; at least half
    the long run's seconds per step, so that noise cannot make a step look free (and the cap endless)."""
    cells = tuple(with_cap(c, 3 * steps) for c in probe.cells)
    short = tuple(with_cap(c, steps) for c in probe.cells)
    train_cells(tuple(with_cap(c, 5) for c in probe.cells), device, evaluated=False)  # kernels, allocator
    trained = {}
    short_s = min(timed(lambda: trained.update(results=train_cells(short, device, evaluated=False)), device)
                  for _ in range(2))
    long_s = min(timed(lambda: train_cells(cells, device, evaluated=False), device) for _ in range(2))
    model = trained["results"][0].model
    evaluate = mem_bits_evaluator(short[0].data, synthetic_members(short[0].data, short[0].seed))
    evaluate(model)  # warm-up
    eval_s = min(timed(lambda: evaluate(model), device) for _ in range(2))
    long_steps, more_steps = cells[0].train.steps_at_cap, cells[0].train.steps_at_cap - short[0].train.steps_at_cap
    step_s = max((long_s - short_s) / more_steps, 0.5 * long_s / long_steps)
    return {"step_s": step_s, "eval_s": eval_s, "calibration_s": [short_s, long_s]}


def run_seconds(hp: TrainSpec, costs: dict, num_cells: int) -> float:
    """What a run to the last horizon of `hp` costs: every step (the trunk's and every branch's, all
    cells' together), an evaluation per cell at each branch's end and every eval_interval of the trunk."""
    evaluations = len(hp.horizons) + hp.horizons[-1] // hp.eval_interval
    return hp.steps_at_cap * costs["step_s"] + evaluations * num_cells * costs["eval_s"]


def cap_within(budget_s: float, costs: dict, num_cells: int, template: CellSpec, target_steps: int) -> int:
    """The largest horizon cap (first_branch doubled, at most the target) whose whole run fits
    `budget_s`; when not even first_branch fits, the most steps below it that do (one branch, at the cap)."""
    def fits(cap: int) -> bool:
        return run_seconds(with_cap(template, cap).train, costs, num_cells) <= budget_s

    best, horizon = None, template.train.first_branch
    while horizon <= target_steps and fits(horizon):
        best, horizon = horizon, 2 * horizon
    if best is not None:
        return best
    low, high = 1, max(1, min(template.train.first_branch - 1, target_steps))
    while low < high:  # binary search: the cost grows with the cap
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def asymptote_plan(hp: TrainSpec, costs: dict, num_cells: int, template: CellSpec) -> dict:
    """Whether the capped run can extrapolate: the horizons it has from asymptote_from on (4 needed);
    if too few, the horizon that 4 would need and what that run would cost at the measured step."""
    fitted = [h for h in hp.horizons if h >= hp.asymptote_from]
    plan = {"horizons": list(hp.horizons), "asymptote_from": hp.asymptote_from, "fitted_horizons": fitted,
            "extrapolable_at_cap": len(fitted) >= MIN_BRANCHES, "note": None}
    if plan["extrapolable_at_cap"]:
        return plan
    first = next(h for h in (hp.first_branch * 2 ** k for k in range(64)) if h >= hp.asymptote_from)
    needed = with_cap(template, first * 2 ** (MIN_BRANCHES - 1)).train
    plan.update(needed_cap_steps=needed.max_steps, needed_steps=needed.steps_at_cap,
                needed_s=run_seconds(needed, costs, num_cells))
    plan["note"] = (f"the budget holds {len(fitted)} branch{'es' if len(fitted) != 1 else ''} from asymptote_from = "
                    f"{hp.asymptote_from:,} steps (horizons to {hp.horizons[-1]:,}); an extrapolation needs "
                    f"{MIN_BRANCHES} (horizons to {needed.max_steps:,}: {needed.steps_at_cap:,} steps, about "
                    f"{plan['needed_s']:.0f} s): the asymptote is not extrapolable and the measured value is "
                    "a lower bound on it")
    return plan


def run_probe(probe: Probe, device: torch.device, budget_s: float, calibration_steps: int) -> dict:
    began = time.perf_counter()
    costs = measured_costs(probe, device, calibration_steps)
    left_s = BUDGET_MARGIN * (budget_s - (time.perf_counter() - began))
    cap = cap_within(left_s, costs, len(probe.cells), probe.cells[0], probe.target_steps)
    cells = tuple(with_cap(c, cap) for c in probe.cells)
    hp = cells[0].train
    plan = asymptote_plan(hp, costs, len(cells), probe.cells[0])
    print(f"{probe.name}: {costs['step_s'] * 1e3:.2f} ms a step, {costs['eval_s'] * 1e3:.1f} ms an evaluation: "
          f"horizons {', '.join(f'{h:,}' for h in hp.horizons)} ({hp.steps_at_cap:,} steps at most, about "
          f"{run_seconds(hp, costs, len(cells)):.0f} s; wanted to {probe.target_steps:,})", flush=True)
    if plan["note"]:
        print(f"  {probe.name}: {plan['note']}", flush=True)
    started = time.perf_counter()
    results = train_cells(cells, device)
    sync(device)
    train_s = time.perf_counter() - started
    print(f"{probe.name}: trained in {train_s:.0f} s, {time.perf_counter() - began:.0f} s of its {budget_s:.0f} s "
          "budget in all", flush=True)
    return {"name": probe.name, "budget_s": budget_s, "cap_steps": cap, "steps_at_cap": hp.steps_at_cap,
            "target_steps": probe.target_steps, **costs, "train_s": train_s,
            "wall_s": time.perf_counter() - began, "paper_bits_per_param": probe.paper_bits_per_param,
            "asymptote_plan": plan, "cells": [cell_record(c, r) for c, r in zip(cells, results)]}


def cell_record(spec: CellSpec, result) -> dict:
    """What a cell measured (its last branch, the cell's model), whether the annealed rule converged,
    every branch, and the asymptote its branches from asymptote_from extrapolate to (the sweep's metrics,
    measure.asymptote.asymptote_metrics as measure.cell.training_metrics calls it, and the fit's reason
    when not extrapolable: then the measured value is a lower bound). Bits per parameter over `params`
    (every trainable parameter) and, for the measured value, over the paper's count."""
    hp, params = spec.train, spec.params
    horizons, _, annealed = zip(*result.branches)
    measured = annealed[-1]
    fit = fit_asymptote(horizons, annealed, from_steps=hp.asymptote_from)
    metrics = asymptote_metrics(horizons, annealed, measured, from_steps=hp.asymptote_from)
    record = {
        "shape": spec.model.name, "precision": spec.precision, "vocab_size": spec.data.vocab_size,
        "seq_len": spec.data.seq_len, "num_sequences": spec.data.num_sequences,
        "entropy_bits": spec.data.entropy_bits, "params": params, "params_paper": spec.params_paper,
        "train": dataclasses.asdict(hp), "steps": result.steps, "steps_trained": result.steps_trained,
        "converged": result.converged, "converged_horizon": horizons[-1] if result.converged else None,
        "gain_last_doubling": result.gain_last_doubling, "last_horizon": horizons[-1],
        "mem_bits": measured, "bits_per_param": measured / params,
        "bits_per_param_paper_count": measured / spec.params_paper,
        "exposures": result.steps * hp.batch_size / spec.data.num_sequences,
        "branches": [{"horizon": t, "end_step": e, "mem_bits": a, "bits_per_param": a / params,
                      "exposures": e * hp.batch_size / spec.data.num_sequences}
                     for t, e, a in result.branches],
        "asymptote_from": hp.asymptote_from, "asymptote_branches": fit.num_branches,
        "asymptote_extrapolable": fit.extrapolable, "asymptote_reason": fit.reason,
        "curve": [[step, bits, bits / params] for step, bits in result.mem_history],  # the trunk's
    }
    if fit.extrapolable:
        record.update({name: metrics[name] for name in ("mem_bits_asymptote", "mem_bits_asymptote_ci_low",
                                                         "mem_bits_asymptote_ci_high", "fraction_of_asymptote")})
        record["asymptote_exponent"] = metrics.get("asymptote_exponent")
        record.update(bits_per_param_asymptote=metrics["mem_bits_asymptote"] / params,
                      bits_per_param_asymptote_ci_low=metrics["mem_bits_asymptote_ci_low"] / params,
                      bits_per_param_asymptote_ci_high=metrics["mem_bits_asymptote_ci_high"] / params)
    else:
        record.update(mem_bits_lower_bound=measured, bits_per_param_lower_bound=measured / params)
    return record


def stopped(cell: dict) -> str:
    """Where the annealed rule left the cell."""
    tol = cell["train"]["converge_tol"]
    if cell["converged"]:
        return f"converged at T={cell['converged_horizon']:,} (a(T) within {tol:.0%} of a(T/2))"
    gain = cell["gain_last_doubling"]
    moved = f", a(T) moved {gain:+.1%} over the last doubling" if gain is not None else ""
    return f"unconverged at the cap (T={cell['last_horizon']:,}{moved})"


def extrapolated(cell: dict) -> str:
    """The asymptote in bits/param with its interval and the measured share of it, or why there is none."""
    if cell["asymptote_extrapolable"]:
        return (f"extrapolated {cell['bits_per_param_asymptote']:.3f} bits/param "
                f"[{cell['bits_per_param_asymptote_ci_low']:.3f}, {cell['bits_per_param_asymptote_ci_high']:.3f}] "
                f"from {cell['asymptote_branches']} branches, measured {cell['fraction_of_asymptote']:.1%} of it")
    return (f"extrapolated: not extrapolable ({cell['asymptote_reason']}), measured "
            f"{cell['bits_per_param_lower_bound']:.3f} bits/param is a lower bound")


def print_probe(run: dict) -> None:
    """Per cell: measured and extrapolated bits per parameter, the rule's verdict, every branch."""
    for cell in run["cells"]:
        paper = f"; the paper: {run['paper_bits_per_param']}" if run["paper_bits_per_param"] else ""
        print(f"  {run['name']} N={cell['num_sequences']} ({cell['entropy_bits'] / cell['params']:.1f} bits of data "
              f"per param): measured {cell['bits_per_param']:.3f} bits/param, {stopped(cell)}; "
              f"{extrapolated(cell)}{paper}")
        print("    T: a(T) bits/param (exposures)  " + "  ".join(
            f"{b['horizon']:,}: {b['bits_per_param']:.3f} ({b['exposures']:,.0f})" for b in cell["branches"]),
            flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.capacity_probe", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="toy sizes and budgets: a check of the script")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds per run (default 130; 8 with --quick)")
    parser.add_argument("--paper-size-x", type=float, default=2.0,
                        help="the paper row's dataset, in multiples of its reported fp32 capacity")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--runs", nargs="*", choices=RUNS, help="the runs to make (default: all three)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu --quick to check the script)")
    torch.set_num_threads(1)
    budget_s = args.budget_s or (8.0 if args.quick else 130.0)
    results = {"machine": machine(), "device": str(device), "quick": args.quick, "budget_s_per_run": budget_s,
               "schedule": "branches", "started": datetime.now(timezone.utc).isoformat(), "runs": []}
    path = results_path(args.out, "capacity_probe-")
    for probe in probes(args):
        if args.runs and probe.name not in args.runs:
            continue
        run = run_probe(probe, device, budget_s, 10 if args.quick else 50)
        results["runs"].append(run)
        save_results(results, path)
        print_probe(run)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
