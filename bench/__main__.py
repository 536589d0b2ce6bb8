"""Benchmarks of memsweep's layers, each a ratio of two things timed in the same run.

    python -m bench [--quick] [--repeats N] [--out bench/results]

Every figure is measured `--repeats` times (baseline and subject back to back, so machine load hits
both alike) and reported as median, min and max of the ratio:

1. train_vs_bare: throughput of `models.train.train` over a bare PyTorch loop (same model, same
   batches, AdamW, clipping) -- target >= 0.95.
2. packed_k8 / packed_k32: K tiny cells (l1_d16) trained one after another over the same cells
   trained as one pack by `models.packed.train_packed` -- target >= 2.5 for K=8 on 2 cores;
   packed_k8_all_cores: the same with each side at its faster thread count (1 or one per core).
3. sweep_*: a grid of l1_d16 cells through memsweep on an embedded local Ray cluster (packing off,
   then on) over the ideal (the cells' time run one after another, over the workers), over the same
   cells run sequentially in one process, and over the same grid through Ray Tune's grid_search
   (bench/sweep_bench.py; needs the `bench` extra) -- targets <= 1.10 over ideal, <= 1.0 over Tune.
   Cells of ~3 s with --quick, ~20 s otherwise; --sweep-repeats times (1 with --quick, 2 otherwise).
4. score_vs_train: scoring throughput (forward only, `nll_bits`, tokens/s) over training throughput.
5. mfu_single / mfu_packed_k8: achieved training FLOP/s (CellSpec.train_flops_per_step) over the
   fp32 matrix-multiply peak measured here (torch.mm of large square matrices).
Writes bench/results/<UTC timestamp>.json with the machine's description and load. The pieces timed
(the tiny cell, the bare loop, sequential and packed training) live in bench/common.py, shared with
bench.gpu; bench/README.md says what each figure measures and its last measured value.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import datetime, timezone

import torch

from bench.common import (
    RESULTS,
    machine,
    memsweep_train,
    packed,
    packed_vs_sequential,
    ratio_stats,
    score_vs_train,
    sequential,
    timed,
    tiny_cell,
    train_vs_bare,
    write_results,
)
from bench.sweep_bench import figure_sweep  # figure 3; Ray and Ray Tune load only when it runs
from models.data import synthetic_members


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of torch.mm on two n x n fp32 matrices, the best of `repeats`: MFU's denominator."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2.0 * n**3 / best


# -- figures ----------------------------------------------------------------------------------------
def figure_train_vs_bare(steps: int, repeats: int) -> dict:
    return {"what": "memsweep train() throughput / bare PyTorch loop throughput",
            **train_vs_bare(tiny_cell(128, 0, steps), repeats)}


def figure_packed(k: int, steps: int, repeats: int) -> dict:
    figure = packed_vs_sequential([tiny_cell(64 + 16 * (i % 8), i, steps) for i in range(k)], repeats)
    del figure["members"], figure["results"]
    return {"what": f"{k} l1_d16 cells one after another / the same {k} cells as one pack (time ratio)",
            "target": ">= 2.5 (K=8, 2 CPU cores)" if k == 8 else None, **figure}


def figure_packed_all_cores(k: int, steps: int, repeats: int) -> dict:
    """Figure 2 with every core: each side timed at 1 thread and at one per core, and its faster time
    kept (a lone tiny cell gains little from a second thread; a pack's larger products gain more)."""
    specs = [tiny_cell(64 + 16 * (i % 8), i, steps) for i in range(k)]
    members = [synthetic_members(s.data, s.seed) for s in specs]
    cores, before = os.cpu_count() or 1, torch.get_num_threads()
    ratios, best_threads, gains = [], [], {"sequential": [], "packed": []}
    try:
        for _ in range(repeats):
            seq, pack = {}, {}
            for threads in sorted({1, cores}):
                torch.set_num_threads(threads)
                seq[threads] = timed(lambda: sequential(specs, members))
                pack[threads] = timed(lambda: packed(specs, members))
            ratios.append(min(seq.values()) / min(pack.values()))
            best_threads.append({"sequential": min(seq, key=seq.get), "packed": min(pack, key=pack.get)})
            gains["sequential"].append(seq[1] / seq[cores])
            gains["packed"].append(pack[1] / pack[cores])
    finally:
        torch.set_num_threads(before)
    return {"what": f"{k} l1_d16 cells one after another / as one pack, each at its faster thread count "
                    f"(1 or {cores})", "target": ">= 2.5 (K=8, 2 CPU cores)" if k == 8 else None,
            "steps": steps, "best_threads": best_threads,
            # each side's time on 1 thread over its time on one per core: what the other cores add
            "thread_gain": {side: ratio_stats(values) for side, values in gains.items()}, **ratio_stats(ratios)}


def figure_score_vs_train(steps: int, repeats: int) -> dict:
    return {"what": "scoring tokens/s (nll_bits, forward only) / training tokens/s",
            **score_vs_train(tiny_cell(1024, 0, steps), repeats)}


def figure_mfu(steps: int, repeats: int, k: int) -> dict:
    specs = [tiny_cell(64 + i, i, steps) for i in range(k)]
    members = [synthetic_members(s.data, s.seed) for s in specs]
    flops = specs[0].train_flops_per_step * steps * k
    ratios, peaks = [], []
    for _ in range(repeats):
        peak = matmul_peak_flops()
        run = timed(lambda: packed(specs, members) if k > 1 else memsweep_train(specs[0], members[0]))
        ratios.append(flops / run / peak)
        peaks.append(peak)
    return {"what": f"achieved training FLOP/s ({'pack of %d' % k if k > 1 else 'one cell'}, l1_d16) / "
                    "torch.mm fp32 peak", "steps": steps, "peak_flops": peaks, **ratio_stats(ratios)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (about two minutes on 2 cores)")
    parser.add_argument("--repeats", type=int, help="repeats of each figure (default: 2 quick, 3 full)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--only", nargs="*", help="figure names to run (default: all)")
    parser.add_argument("--sweep-repeats", type=int, help="repeats of figure 3 (default: 1 quick, 2 full)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared machine spinning OpenMP threads swamp tiny models)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 3)
    torch.set_num_threads(args.threads)
    steps = 60 if args.quick else 300
    figures = {
        "train_vs_bare": lambda: figure_train_vs_bare(3 * steps, args.repeats),
        "packed_k8": lambda: figure_packed(8, steps, args.repeats),
        "packed_k8_all_cores": lambda: figure_packed_all_cores(8, steps, args.repeats),
        "packed_k32": lambda: figure_packed(32, steps // 2 if args.quick else steps, args.repeats),
        "sweep": lambda: figure_sweep(args.quick, args.sweep_repeats or (1 if args.quick else 2), workers=2),
        "score_vs_train": lambda: figure_score_vs_train(steps, args.repeats),
        "mfu_single": lambda: figure_mfu(steps, args.repeats, 1),
        "mfu_packed_k8": lambda: figure_mfu(steps, args.repeats, 8),
    }
    results = {"machine": machine(), "quick": args.quick, "repeats": args.repeats,
               "started": datetime.now(timezone.utc).isoformat(), "load_before": os.getloadavg(), "figures": {}}
    for name, run in figures.items():
        if args.only and name not in args.only:
            continue
        load = os.getloadavg()[0]
        started = time.perf_counter()
        figure = run()
        figure.update({"load_1min": load, "wall_s": time.perf_counter() - started})
        results["figures"][name] = figure
        for label, r in ({name: figure} if "median" in figure else figure["ratios"]).items():
            print(f"{label:30s} median {r['median']:8.3f}  [{r['min']:.3f}, {r['max']:.3f}]  "
                  f"load {load:.1f}  {r.get('what', figure['what'])}", flush=True)
    results["load_after"] = os.getloadavg()
    write_results(results, args.out)
    return results


if __name__ == "__main__":
    main()
