"""Memorization capacity on a lent GPU, in one call of about 8 minutes: the paper's own l1_d32 row in
fp32 and bf16, and the laptop shape trained 8x longer than the laptop sweep did.

    python -m bench.capacity_probe [--device cuda] [--budget-s 130] [--paper-size-x 2] [--out DIR] [--runs NAME ...]
    python -m bench.capacity_probe --device cpu --quick      # the same code on toy sizes (CI)

Three runs, each within `--budget-s` seconds (its measurement of the step time included):

- paper_l1_d32_fp32, paper_l1_d32_bf16: l1_d32 on the paper's data (V=2048, S=64) holding
  `--paper-size-x` times the capacity the paper reports for that row (4.23 bits/param fp32; the bf16
  run gets the same data), so past capacity, with the paper recipe (conf/train/paper.yaml: wsd, batch
  2048, lr 1e-3); the paper reports 4.23 bits/param fp32 and 3.93 bf16. At 2x (966 sequences) a batch
  of 2048 holds the whole dataset about twice: full-batch training, in effect.
- laptop_l1_d16: l1_d16 (V=64, S=32) with the CPU recipe (conf/train/cpu.yaml) on datasets 2x and 8x
  past its CPU plateau (2.7 bits/param), one pack, capped at 32,000 steps: 8x the 4,000 steps of the
  laptop sweep when issue 14 was filed.

Each recipe's `max_steps` is a cap derived from the step time measured first, so that the wsd cool-down,
forced to end at the cap, ends within the budget; evaluations come every cap/40 steps (at most the
recipe's own interval), the warm-up is at most a tenth of the cap. Prints bits per parameter against
steps and where the convergence rule stopped each cell (converged, or the cap); writes
bench/results/capacity_probe-<UTC time>.json after each run. Imports torch, numpy, PyYAML, scipy and
this repository's models/ and measure/ only (what the GPU image holds).
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
from measure.paper import reference_rows
from models.data import synthetic_members
from models.packed import train_packed
from models.spec import CellSpec, DataSpec
from models.train import train

PAPER_DATA = DataSpec(vocab_size=2048, seq_len=64, num_sequences=1, num_nonmembers=256)
LAPTOP_DATA = DataSpec(vocab_size=64, seq_len=32, num_sequences=1, num_nonmembers=256)
LAPTOP_SIZES_X = (2.0, 8.0)  # the laptop shape's datasets, in multiples of its CPU plateau
LAPTOP_TARGET_STEPS = 8 * 4000  # 8x the laptop sweep's 4,000 steps (the cosine recipe of issue 14's time)
EVALUATIONS = 40  # per run, so the rule sees the curve's doublings (the paper recipe's 5,000 suits 10^6 steps)
BUDGET_MARGIN = 0.9  # of the time left after measuring: steps jitter, evaluations too
RUNS = ("paper_l1_d32_fp32", "paper_l1_d32_bf16", "laptop_l1_d16")  # the names `probes` gives its runs


@dataclasses.dataclass(frozen=True)
class Probe:
    """One run: cells of one recipe (a pack when several) and what bounds its steps."""

    name: str
    cells: tuple[CellSpec, ...]  # their train.max_steps is provisional until the cap is measured
    target_steps: int  # the most steps wanted; the budget may allow fewer
    paper_bits_per_param: float | None = None  # the paper's figure for this row, where it has one


def paper_row() -> dict:
    """The paper's l1_d32 row of capacity_by_precision.csv."""
    return next(r for r in reference_rows("capacity_by_precision.csv") if r["n_layer"] == 1 and r["d_model"] == 32)


def probes(args: argparse.Namespace) -> list[Probe]:
    paper, cpu, row = train_recipe("paper"), train_recipe("cpu"), paper_row()
    if args.quick:  # toy sizes: a check of the code, not a measurement
        paper = dataclasses.replace(paper, batch_size=32)
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
    """`spec` capped at `cap_steps`: evaluations every cap/40 steps at most, a warm-up of at most a tenth."""
    hp = spec.train
    return dataclasses.replace(spec, train=dataclasses.replace(
        hp, max_steps=cap_steps, eval_interval=max(1, min(hp.eval_interval, cap_steps // EVALUATIONS)),
        warmup_steps=min(hp.warmup_steps, cap_steps // 10), checkpoint_interval=NO_EVAL))


def train_cells(cells: tuple[CellSpec, ...], device: torch.device, evaluated: bool = True) -> list:
    """Train the cells (alone, or as one pack), evaluating mem_bits on their cadence; with `evaluated`
    False (to time steps) only at the end, where train() always evaluates."""
    members = [synthetic_members(c.data, c.seed) for c in cells]
    if not evaluated:
        cells = tuple(dataclasses.replace(c, train=dataclasses.replace(c.train, eval_interval=NO_EVAL))
                      for c in cells)
    evaluates = [mem_bits_evaluator(c.data, m) for c, m in zip(cells, members)]
    if len(cells) == 1:
        return [train(cells[0], members[0], device=device, evaluate=evaluates[0])]
    return train_packed(list(cells), members, device=device, evaluates=evaluates)


def measured_costs(probe: Probe, device: torch.device, steps: int) -> dict:
    """Seconds per training step of the probe's cells together (the difference of a run of `steps`
    and one of 3 * `steps`, so set-up cancels) and per evaluation of one cell, after a warm-up."""
    cells = tuple(with_cap(c, 3 * steps) for c in probe.cells)
    short = tuple(with_cap(c, steps) for c in probe.cells)
    train_cells(tuple(with_cap(c, 5) for c in probe.cells), device, evaluated=False)  # kernels, allocator
    trained = {}
    short_s = timed(lambda: trained.update(results=train_cells(short, device, evaluated=False)), device)
    long_s = timed(lambda: train_cells(cells, device, evaluated=False), device)
    model = trained["results"][0].model
    evaluate = mem_bits_evaluator(short[0].data, synthetic_members(short[0].data, short[0].seed))
    evaluate(model)  # warm-up
    eval_s = timed(lambda: evaluate(model), device)
    return {"step_s": max(long_s - short_s, 1e-9) / (2 * steps), "eval_s": eval_s}


def cap_within(budget_s: float, costs: dict, num_cells: int, template: CellSpec, target_steps: int) -> int:
    """The largest cap whose steps and evaluations (every cell's) fit `budget_s`, at most the target."""
    def seconds(cap: int) -> float:
        interval = with_cap(template, cap).train.eval_interval
        return cap * costs["step_s"] + (cap // interval + 2) * num_cells * costs["eval_s"]

    low, high = 1, target_steps
    while low < high:  # binary search: seconds() grows with the cap
        middle = (low + high + 1) // 2
        low, high = (middle, high) if seconds(middle) <= budget_s else (low, middle - 1)
    return low


def run_probe(probe: Probe, device: torch.device, budget_s: float, calibration_steps: int) -> dict:
    began = time.perf_counter()
    costs = measured_costs(probe, device, calibration_steps)
    left_s = BUDGET_MARGIN * (budget_s - (time.perf_counter() - began))
    cap = cap_within(left_s, costs, len(probe.cells), probe.cells[0], probe.target_steps)
    cells = tuple(with_cap(c, cap) for c in probe.cells)
    print(f"{probe.name}: {costs['step_s'] * 1e3:.2f} ms a step, {costs['eval_s'] * 1e3:.1f} ms an evaluation: "
          f"cap {cap:,} steps (wanted {probe.target_steps:,})", flush=True)
    started = time.perf_counter()
    results = train_cells(cells, device)
    sync(device)
    train_s = time.perf_counter() - started
    return {"name": probe.name, "budget_s": budget_s, "cap_steps": cap, "target_steps": probe.target_steps,
            **costs, "train_s": train_s, "wall_s": time.perf_counter() - began,
            "paper_bits_per_param": probe.paper_bits_per_param,
            "cells": [cell_record(c, r) for c, r in zip(cells, results)]}


def cell_record(spec: CellSpec, result) -> dict:
    """What a cell reached (its last evaluation) and where the rule stopped it; bits per parameter over
    `params` (every trainable parameter) and over the paper's count."""
    final = result.mem_history[-1][1]
    return {"shape": spec.model.name, "precision": spec.precision, "vocab_size": spec.data.vocab_size,
            "seq_len": spec.data.seq_len, "num_sequences": spec.data.num_sequences,
            "entropy_bits": spec.data.entropy_bits, "params": spec.params, "params_paper": spec.params_paper,
            "train": dataclasses.asdict(spec.train), "steps": result.steps, "converged": result.converged,
            "converged_step": result.converged_step, "decay_start_step": result.decay_start_step,
            "gain_last_doubling": result.gain_last_doubling, "mem_bits": final,
            "bits_per_param": final / spec.params, "bits_per_param_paper_count": final / spec.params_paper,
            "curve": [[step, bits, bits / spec.params] for step, bits in result.mem_history]}


def stopped(cell: dict) -> str:
    if cell["converged"]:
        return f"converged at step {cell['converged_step']:,}"
    decay = cell["decay_start_step"]
    return f"unconverged at the cap ({cell['steps']:,} steps; cool-down from {decay:,})" if decay else "unconverged"


def print_probe(run: dict) -> None:
    """Bits per parameter at each doubling of the steps and at the end, and where the rule stopped."""
    for cell in run["cells"]:
        paper = f"; the paper: {run['paper_bits_per_param']}" if run["paper_bits_per_param"] else ""
        print(f"  {run['name']} N={cell['num_sequences']} ({cell['entropy_bits'] / cell['params']:.1f} bits of data "
              f"per param): {cell['bits_per_param']:.3f} bits/param, {stopped(cell)}{paper}")
        shown, next_step = [], 1
        for step, _, per_param in cell["curve"]:
            if step >= next_step or step == cell["curve"][-1][0]:
                shown.append(f"{step:,}: {per_param:.3f}")
                next_step = 2 * step
        print("    steps: bits/param  " + "  ".join(shown), flush=True)


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
               "started": datetime.now(timezone.utc).isoformat(), "runs": []}
    path = results_path(args.out, "capacity_probe-")
    for probe in probes(args):
        if args.runs and probe.name not in args.runs:
            continue
        run = run_probe(probe, device, budget_s, 5 if args.quick else 50)
        results["runs"].append(run)
        save_results(results, path)
        print_probe(run)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
