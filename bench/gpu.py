"""memsweep's benchmarks on a GPU, in one run that fits a short lease of the card.

    python -m bench.gpu [--quick] [--out DIR] [--budget-s 420] [--device cuda]

Each figure is a ratio of two things timed in this run, back to back, repeated; results go to
`<out>/gpu-<UTC timestamp>.json` after every section (a run cut short keeps what it measured) and a
table is printed last. Sections, in order:

- peaks: the card's matrix-multiply rates (fp32 without TF32, TF32, bf16) measured here, the
  denominators of every MFU below.
- train_vs_bare: `models.train.train` over a bare PyTorch loop on a paper shape (l4_d128, V=2048, S=64,
  batch 2048), as figure 1 on the CPU.
- packed: K cells of l1_d32 trained one after another over the same K cells as one pack, for the tiny
  data of the laptop sweep (V=64, S=32, batch 64: launch-bound, packing's real case; K = 8 and 32,
  fp32 and bf16, batched reductions, plus K=32 with the CPU's bit-exact per-cell reductions) and for the
  paper's data (V=2048, S=64, batch 2048; K=8). Each pack is also checked against its cells trained
  alone: relative difference of the members' mean NLL and of the weights (equal up to float rounding).
- paper_shapes: training tokens/s and MFU of one cell of each of the paper's 16 shapes (paper data,
  batch 2048) in fp32 and bf16, and for the shapes of d <= 64 a pack of 8 over one cell (tokens/s).
- fractional: packs as Ray tasks on one GPU with the fractional `num_gpus` that
  `orchestrator.resources` computes (several packs share the card) over the same packs each holding
  the whole GPU (one at a time). Needs `ray` (carried as a wheel to a bare GPU machine).
- crossover: a pack of 8 over one after another as a cell's step grows (where packing stops paying).
- score_vs_train; laptop_grid: the laptop sweep's 12 cells through Ray on one GPU, unpacked (fractional
  tasks) over packed.
- profile: the top operators of a training step, fp32 against bf16 (not yet run on a GPU).

On a machine without CUDA, `--device cpu --quick` runs the same code on toy sizes (a check of the
script, not a benchmark; the CPU figures are `python -m bench`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from bench.common import (
    NO_EVAL,
    RESULTS,
    machine,
    memsweep_train,
    packed,
    packed_vs_sequential,
    score_vs_train,
    sequential,
    sync,
    timed,
    train_vs_bare,
    with_steps,
)
from models.data import synthetic_members
from models.scoring import nll_bits
from models.spec import CellSpec, DataSpec, ModelSpec, TrainSpec

ROOT = Path(__file__).resolve().parent.parent
TINY = DataSpec(64, 32, 128, 256)  # the laptop sweep's data: V=64, S=32
PAPER = DataSpec(2048, 64, 1024, 256)  # the paper's synthetic data: V=2048, S=64


def cell(shape: str, data: DataSpec, steps: int, batch_size: int, seed: int = 0, precision: str = "fp32",
         num_sequences: int | None = None, lr: float = 1e-2) -> CellSpec:
    layers, width = (int(x) for x in shape[1:].split("_d"))
    model = ModelSpec(shape, layers, max(1, width // 32) if width >= 32 else 2, width)
    data = dataclasses.replace(data, num_sequences=num_sequences or data.num_sequences)
    return CellSpec(model, data, TrainSpec(max_steps=steps, batch_size=batch_size, lr=lr, warmup_steps=10,
                                           eval_interval=NO_EVAL, checkpoint_interval=NO_EVAL), precision, seed)


def paper_shapes() -> list[str]:
    """The paper's 16 shapes, from conf/model (l1_d16 and l2_d16 are this project's CPU shapes)."""
    names = sorted(p.stem for p in (ROOT / "conf" / "model").glob("l*_d*.yaml"))
    return [n for n in names if n not in ("l1_d16", "l2_d16")]


# -- sections ---------------------------------------------------------------------------------------
def section_peaks(device: torch.device, quick: bool) -> dict:
    n = 1024 if device.type == "cpu" else 8192
    out = {}
    for label, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                               ("bf16", torch.bfloat16, False)):
        if device.type == "cpu" and label != "fp32":
            continue
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            torch.mm(a, b)
        reps = 10
        seconds = timed(lambda: [torch.mm(a, b) for _ in range(reps)], device)
        out[f"{label}_flops"] = 2.0 * n**3 * reps / seconds
    torch.backends.cuda.matmul.allow_tf32 = False  # memsweep's fp32 is full fp32 (PyTorch's default)
    return out


def section_train_vs_bare(device: torch.device, quick: bool) -> dict:
    specs = {"tiny_l1_d32": cell("l1_d32", TINY, 20 if device.type == "cpu" else 300, 64)}
    if device.type == "cuda":
        specs["paper_l4_d128"] = cell("l4_d128", PAPER, 15 if quick else 40, 2048, num_sequences=4096, lr=1e-3)
    out = {}
    for label, spec in specs.items():
        out[label] = {"what": f"memsweep train() throughput / bare PyTorch loop ({spec.model.name}, "
                              f"V={spec.data.vocab_size}, S={spec.data.seq_len}, batch {spec.train.batch_size})",
                      **train_vs_bare(spec, 2 if quick else 3, device)}
    return {"what": "memsweep's step over a bare loop", "ratios": out}


def agreement(seq_results: list, pack_results: list, members: list) -> dict:
    """How far each packed cell is from the same cell trained alone: members' mean NLL and weights."""
    nll_rel, w_rel = [], []
    for alone, pack, m in zip(seq_results, pack_results, members):
        a = float(np.mean(nll_bits(alone.model, m[:512])))
        b = float(np.mean(nll_bits(pack.model, m[:512])))
        nll_rel.append(abs(a - b) / abs(a))
        wa = torch.cat([p.detach().float().flatten() for p in alone.model.parameters()])
        wb = torch.cat([p.detach().float().flatten() for p in pack.model.parameters()])
        w_rel.append(float((wa - wb).norm() / wa.norm()))
    return {"nll_rel_diff_max": max(nll_rel), "nll_rel_diff_median": statistics.median(nll_rel),
            "weights_rel_diff_max": max(w_rel)}


def packed_figure(specs: list[CellSpec], device: torch.device, repeats: int, exact: bool | None = None) -> dict:
    figure = packed_vs_sequential(specs, repeats, device, exact)
    members, results = figure.pop("members"), figure.pop("results")
    s = specs[0]
    flops = s.train_flops_per_step * s.train.max_steps * len(specs)
    return {"what": f"{len(specs)} {s.model.name} cells (V={s.data.vocab_size}, S={s.data.seq_len}, batch "
                    f"{s.train.batch_size}, {s.precision}) one after another / as one pack"
                    + ("" if exact is None else f" (exact={exact})"),
            "packed_flops_per_s": flops / min(figure["packed_s"]),
            "sequential_flops_per_s": flops / min(figure["sequential_s"]),
            "agreement": agreement(results["sequential"], results["packed"], members), **figure}


def section_packed(device: torch.device, quick: bool) -> dict:
    repeats = 2
    steps = 10 if device.type == "cpu" else (50 if quick else 100)
    tiny = lambda k, precision="fp32": [cell("l1_d32", TINY, steps, 64, seed=i, precision=precision,
                                             num_sequences=64 + 16 * (i % 8)) for i in range(k)]
    figures = {"tiny_k8_fp32": lambda: packed_figure(tiny(8), device, repeats),
               "tiny_k32_fp32": lambda: packed_figure(tiny(32), device, repeats)}
    if device.type == "cuda":
        figures["tiny_k32_bf16"] = lambda: packed_figure(tiny(32, "bf16"), device, repeats)
        figures["tiny_k32_fp32_exact"] = lambda: packed_figure(tiny(32), device, 1, exact=True)
        paper_steps = 10 if quick else 25
        figures["paper_k8_fp32"] = lambda: packed_figure(
            [cell("l1_d32", PAPER, paper_steps, 2048, seed=i, lr=1e-3, num_sequences=4096) for i in range(8)],
            device, repeats)
    out = {}
    for name, run in figures.items():
        out[name] = run()
        print(f"  packed {name}: {out[name]['median']:.2f}x  {out[name]['agreement']}", flush=True)
    return {"what": "packed training over the same cells one after another (time ratio)",
            "target": ">= 10 for 32 cells of l1_d32 on a GPU", "ratios": out}


def throughput(spec: CellSpec, device: torch.device, k: int = 1) -> float:
    """Training tokens/s of one cell (k=1, train()) or a pack of k, after a short warm-up run."""
    specs = [dataclasses.replace(spec, seed=i) for i in range(k)]
    members = [synthetic_members(s.data, s.seed) for s in specs]
    run = (lambda ss: sequential(ss, members, device)) if k == 1 else (lambda ss: packed(ss, members, device))
    run([with_steps(s, 2) for s in specs])
    seconds = timed(lambda: run(specs), device)
    return k * spec.train.max_steps * spec.train.batch_size * spec.data.seq_len / seconds


def section_paper_shapes(device: torch.device, quick: bool, peaks: dict) -> dict:
    shapes = ["l1_d32"] if device.type == "cpu" else paper_shapes()
    data, batch = (TINY, 64) if device.type == "cpu" else (PAPER, 2048)
    steps = 3 if device.type == "cpu" else (5 if quick else 10)
    rows = {}
    for shape in shapes:
        row = {}
        for precision in ("fp32", "bf16"):
            spec = cell(shape, data, steps, batch, precision=precision, num_sequences=4096, lr=1e-3)
            tps = throughput(spec, device)
            peak = peaks.get(f"{precision}_flops") or peaks.get("fp32_flops")
            flops = tps / (batch * data.seq_len) * spec.train_flops_per_step
            row[precision] = {"tokens_per_s": tps, "mfu": flops / peak if peak else None}
        if int(shape.split("_d")[1]) <= 64:
            spec = cell(shape, data, steps, batch, num_sequences=4096, lr=1e-3)
            row["pack8_over_one"] = throughput(spec, device, k=8) / row["fp32"]["tokens_per_s"]
        rows[shape] = row
        print(f"  {shape}: " + json.dumps(row), flush=True)
    return {"what": f"training tokens/s and MFU per paper shape (V={data.vocab_size}, S={data.seq_len}, "
                    f"batch {batch}); pack8_over_one: tokens/s of a pack of 8 over one cell", "shapes": rows}


def _pack_task_body(specs: list[CellSpec], device_name: str) -> dict:
    """What one Ray task does: train a pack on the GPU Ray assigned it; when and where it ran."""
    torch.set_num_threads(1)
    device = torch.device(device_name)
    members = [synthetic_members(s.data, s.seed) for s in specs]
    start = time.time()
    (sequential if len(specs) == 1 else packed)(specs, members, device)
    sync(device)
    return {"start": start, "end": time.time(), "pid": os.getpid(),
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "cells": len(specs)}


def section_fractional(device: torch.device, quick: bool) -> dict:
    import ray

    from orchestrator.resources import ClusterOptions, pack_request, request_for

    steps = 10 if device.type == "cpu" else (300 if quick else 600)
    packs = [[cell("l1_d32", TINY, steps, 64, seed=4 * j + i, num_sequences=64 + 16 * i) for i in range(4)]
             for j in range(4)]
    cluster = ClusterOptions(gpu_memory_gb=_gpu_memory_gb(device), max_cells_per_gpu=16)
    request = pack_request([request_for(s, cluster, on_gpu=True) for s in packs[0]])
    ray_start_s = _start_ray()
    try:
        task = ray.remote(_pack_task_body)

        def run(num_gpus: float) -> tuple[float, list[dict]]:
            options = {"num_cpus": 1, "num_gpus": num_gpus}
            begin = time.time()
            results = ray.get([task.options(**options).remote(p, device.type) for p in packs])
            return time.time() - begin, results

        small = [[with_steps(s, 2) for s in p] for p in packs]
        ray.get([task.options(num_cpus=1, num_gpus=request["num_gpus"]).remote(p, device.type)
                 for p in small])  # warm the workers (torch import, CUDA context)
        shared_s, shared = run(request["num_gpus"])
        whole_s, whole = run(1.0)
        overlap = lambda rs: max(sum(1 for r in rs if r["start"] <= t["start"] < r["end"]) for t in rs)
        return {"what": "4 packs of 4 l1_d32 cells as Ray tasks: each holding the whole GPU (one at a time) "
                        "/ with memsweep's fractional request (sharing it)",
                "median": whole_s / shared_s, "min": whole_s / shared_s, "max": whole_s / shared_s,
                "fractional_num_gpus": request["num_gpus"], "shared_s": shared_s, "whole_s": whole_s,
                "max_concurrent_shared": overlap(shared), "max_concurrent_whole": overlap(whole),
                "visible_devices": sorted({str(r["visible"]) for r in shared}), "ray_start_s": ray_start_s,
                "steps": steps}
    finally:
        ray.shutdown()


def section_crossover(device: torch.device, quick: bool) -> dict:
    """Where packing stops paying: a pack of 8 over the same 8 cells one after another, as a cell's
    step grows (batch size, vocabulary, width), against the cell's training FLOPs per step."""
    steps = 5 if device.type == "cpu" else 30
    grid = [("l1_d32", TINY, 64), ("l1_d32", TINY, 512), ("l1_d32", PAPER, 16), ("l1_d32", PAPER, 64),
            ("l1_d32", PAPER, 256), ("l1_d32", PAPER, 1024), ("l4_d128", PAPER, 64), ("l4_d128", PAPER, 512)]
    if device.type == "cpu":
        grid = grid[:2]
    rows = []
    for shape, data, batch in grid:
        specs = [cell(shape, data, steps, batch, seed=i, lr=1e-3, num_sequences=2048) for i in range(8)]
        figure = packed_vs_sequential(specs, 1, device)
        rows.append({"shape": shape, "vocab_size": data.vocab_size, "seq_len": data.seq_len, "batch_size": batch,
                     "cell_gflops_per_step": specs[0].train_flops_per_step / 1e9, "ratio": figure["median"],
                     "sequential_ms_per_cell_step": 1e3 * figure["sequential_s"][0] / (8 * steps)})
        print(f"  crossover {rows[-1]}", flush=True)
    return {"what": "pack of 8 over one after another, by a cell's FLOPs per step", "rows": rows}


def section_score_vs_train(device: torch.device, quick: bool) -> dict:
    specs = {"tiny_l1_d32": cell("l1_d32", TINY, 50, 64, num_sequences=4096)}
    if device.type == "cuda":
        specs["paper_l4_d128"] = cell("l4_d128", PAPER, 10, 2048, num_sequences=8192, lr=1e-3)
    out = {label: {"what": f"scoring tokens/s (nll_bits) / training tokens/s ({label})",
                   **score_vs_train(spec, 3, device)} for label, spec in specs.items()}
    return {"what": "scoring over training throughput", "ratios": out}


def section_laptop_grid(device: torch.device, quick: bool) -> dict:
    """The laptop sweep's 12 cells on one GPU through Ray, as memsweep would run them unpacked (12 tasks
    of a fractional GPU each, sharing the card) and packed (plan_packs' packs, their fractions summed)."""
    import ray

    from orchestrator.resources import ClusterOptions, PackOptions, pack_request, plan_packs, request_for

    steps = 10 if device.type == "cpu" else (400 if quick else 1000)
    specs = [cell(shape, TINY, steps, 64, num_sequences=n)
             for shape in ("l1_d16", "l2_d16") for n in (16, 32, 64, 128, 256, 512)]
    cluster = ClusterOptions(gpu_memory_gb=_gpu_memory_gb(device))
    requests = [request_for(s, cluster, on_gpu=True) for s in specs]
    groups = plan_packs(specs, PackOptions(), slots=1)
    _start_ray()
    try:
        task = ray.remote(_pack_task_body)

        def run(batches: list[list[int]]) -> float:
            begin = time.time()
            ray.get([task.options(num_cpus=1, num_gpus=pack_request([requests[i] for i in b])["num_gpus"])
                     .remote([specs[i] for i in b], device.type) for b in batches])
            return time.time() - begin

        warm = [[with_steps(s, 2)] for s in specs]
        ray.get([task.options(num_cpus=1, num_gpus=requests[0]["num_gpus"]).remote(w, device.type) for w in warm])
        unpacked = run([[i] for i in range(len(specs))])
        packed_s = run(groups)
        return {"what": "laptop grid (12 cells, no evaluations) on one GPU through Ray: unpacked (12 fractional "
                        "tasks) / packed (plan_packs)", "median": unpacked / packed_s, "min": unpacked / packed_s,
                "max": unpacked / packed_s, "unpacked_s": unpacked, "packed_s": packed_s, "packs": groups,
                "cell_num_gpus": requests[0]["num_gpus"], "steps": steps}
    finally:
        ray.shutdown()


def section_profile(device: torch.device, quick: bool) -> dict:
    """Where a training step's time goes, fp32 against bf16 (torch.profiler): the top operators by
    self time on the device (on the CPU with --device cpu), per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    shapes = ([("l1_d32", TINY, 64)] if device.type == "cpu"
              else [("l1_d32", PAPER, 2048), ("l8_d256", PAPER, 2048)])
    steps, out = 3 if device.type == "cpu" else 6, {}
    self_time = ((lambda e: e.self_device_time_total) if device.type == "cuda"
                 else (lambda e: e.self_cpu_time_total))
    for shape, data, batch in shapes:
        for precision in ("fp32", "bf16"):
            spec = cell(shape, data, steps, batch, precision=precision, num_sequences=4096, lr=1e-3)
            members = synthetic_members(spec.data, spec.seed)
            memsweep_train(with_steps(spec, 2), members, device)
            with profile(activities=activities) as prof:
                seconds = timed(lambda: memsweep_train(spec, members, device), device)
            events = sorted(prof.key_averages(), key=self_time, reverse=True)
            total = sum(self_time(e) for e in events) or 1.0
            run = out[f"{shape}_{precision}"] = {
                "ms_per_step": 1e3 * seconds / steps, "busy_ms_per_step": total / 1e3 / steps,
                "top": [{"op": e.key, "share": self_time(e) / total, "calls_per_step": e.count / steps}
                        for e in events[:12]]}
            print(f"  profile {shape} {precision}: {run['ms_per_step']:.1f} ms/step; "
                  + ", ".join(f"{t['op'][:40]} {t['share']:.0%}" for t in run["top"][:4]), flush=True)
    return {"what": "top operators of a training step by self time, fp32 and bf16", "runs": out}


def _gpu_memory_gb(device: torch.device) -> float:
    """The card's memory, which sizes memsweep's fractional GPU requests (80 GB when checking on a CPU)."""
    return torch.cuda.get_device_properties(device).total_memory / 1024**3 if device.type == "cuda" else 80.0


def _start_ray() -> float:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    started = time.perf_counter()
    # address="local": a cluster of its own, never one another process left running on this machine
    ray.init(address="local", num_cpus=14, num_gpus=1, include_dashboard=False, log_to_driver=False,
             object_store_memory=10**9, _node_ip_address="127.0.0.1")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="skip the sections that would start after this many seconds")
    parser.add_argument("--only", nargs="*", help="section names to run (default: all)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu --quick to check the script)")
    torch.set_num_threads(1)
    results = {"machine": machine(), "device": str(device), "quick": args.quick,
               "started": datetime.now(timezone.utc).isoformat(), "sections": {}}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        results["machine"].update({"gpu_memory_gb": props.total_memory / 1024**3,
                                   "multiprocessors": props.multi_processor_count})
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.out) / f"gpu-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    sections = {
        "peaks": lambda: section_peaks(device, args.quick),
        "train_vs_bare": lambda: section_train_vs_bare(device, args.quick),
        "packed": lambda: section_packed(device, args.quick),
        "fractional": lambda: section_fractional(device, args.quick),
        "paper_shapes": lambda: section_paper_shapes(device, args.quick, results["sections"].get("peaks", {})),
        "crossover": lambda: section_crossover(device, args.quick),
        "score_vs_train": lambda: section_score_vs_train(device, args.quick),
        "laptop_grid": lambda: section_laptop_grid(device, args.quick),
        "profile": lambda: section_profile(device, args.quick),
    }
    for name, run in sections.items():
        if args.only and name not in args.only:
            continue
        elapsed = time.perf_counter() - began
        if elapsed > args.budget_s:
            results["sections"][name] = {"skipped": f"budget: {elapsed:.0f} s spent"}
            continue
        print(f"== {name} (at {elapsed:.0f} s)", flush=True)
        t0 = time.perf_counter()
        try:
            results["sections"][name] = run()
        except Exception as err:  # a section that breaks must not lose the others' figures
            results["sections"][name] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
            print(traceback.format_exc(), flush=True)
        results["sections"][name]["wall_s"] = time.perf_counter() - t0
        path.write_text(json.dumps(results, indent=2, default=str))
    results["wall_s"] = time.perf_counter() - began
    path.write_text(json.dumps(results, indent=2, default=str))
    print_table(results)
    print(f"wrote {path}")
    return results


def print_table(results: dict) -> None:
    print(f"\n{results['machine'].get('gpu') or results['machine']['cpu']}  torch {results['machine']['torch']}")
    for name, section in results["sections"].items():
        if "error" in section or "skipped" in section:
            print(f"{name:28s} {section.get('error') or section.get('skipped')}")
            continue
        for label, fig in (section.get("ratios") or ({name: section} if "median" in section else {})).items():
            print(f"{label:28s} median {fig['median']:8.2f}  [{fig['min']:.2f}, {fig['max']:.2f}]  {fig['what']}")
        if name == "peaks":
            print("peaks " + "  ".join(f"{k} {v / 1e12:.1f} TFLOP/s" for k, v in section.items() if k.endswith("flops")))
        for row in section.get("rows", []):
            print(f"crossover {row['shape']:8s} V={row['vocab_size']:<5d} batch {row['batch_size']:<5d} "
                  f"{row['cell_gflops_per_step']:9.2f} GFLOP/step  pack8/sequential {row['ratio']:.2f}")
        for shape, row in section.get("shapes", {}).items():
            print(f"{shape:10s} fp32 {row['fp32']['tokens_per_s']:12.0f} tok/s mfu {row['fp32']['mfu'] or 0:.3f}   "
                  f"bf16 {row['bf16']['tokens_per_s']:12.0f} tok/s mfu {row['bf16']['mfu'] or 0:.3f}"
                  + (f"   pack8/one {row['pack8_over_one']:.2f}" if "pack8_over_one" in row else ""))


if __name__ == "__main__":
    main()
