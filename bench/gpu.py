"""memsweep's benchmarks on a GPU, in one run that fits a short lease of the card.

    python -m bench.gpu [--quick] [--out DIR] [--budget-s 420] [--device cuda] [--only SECTION ...]

Each figure is a ratio of two things timed in this run, back to back, repeated; results go to
`<out>/gpu-<UTC timestamp>.json` after every section (a run cut short keeps what it measured) and a
table is printed last. Sections, in this order unless `--only` names some (then in its order):

- peaks: the card's matrix-multiply rates (fp32 without TF32, TF32, bf16) measured here, the
  denominators of every MFU below.
- train_vs_bare: `models.train.train` over a bare PyTorch loop on a paper shape (l4_d128, V=2048, S=64,
  batch 2048), as figure 1 on the CPU.
- packed: K cells of l1_d32 trained one after another over the same K cells as one pack, for the tiny
  data of the laptop sweep (V=64, S=32, batch 64: launch-bound, packing's real case; K = 8 and 32,
  fp32 and bf16, batched reductions, plus K=32 with the CPU's bit-exact per-cell reductions) and for the
  paper's data (V=2048, S=64, batch 2048; K=8). Each pack is also checked against its cells trained
  alone: relative difference of the members' mean NLL and of the weights (equal up to float rounding).
- lone_cell: a lone cell's seconds per step with the step before issue 19 (`LEGACY_STEP`: a host
  synchronisation per step, foreach AdamW) and today's (no per-step synchronisation, fused AdamW): the
  paper's l1_d32 cell (batch 2048) in fp32 and bf16, and the launch-bound tiny l1_d32 cell (batch 64).
- compiled: the same cells with today's step compiled (torch.compile's default mode, and its CUDA-graph
  mode `reduce-overhead`), over lone_cell's step before issue 19.
- paper_shapes: training tokens/s and MFU of one cell of each of the paper's 16 shapes (paper data,
  batch 2048) in fp32 and bf16, each with the step before issue 19 and today's (`after_over_before`),
  and for the shapes of d <= 64 a pack of 8 over one cell (tokens/s).
- fractional: packs as Ray tasks on one GPU with the fractional `num_gpus` that
  `orchestrator.resources` computes (several packs share the card) over the same packs each holding
  the whole GPU (one at a time). Needs `ray` (carried as a wheel to a bare GPU machine).
- crossover: a pack of 8 over one after another as a cell's step grows (where packing stops paying).
- score_vs_train; laptop_grid: the laptop sweep's 12 cells through Ray on one GPU, unpacked (fractional
  tasks) over packed.
- profile: where a step's time goes (torch.profiler), fp32 against bf16, before and after: device time
  per step by operator category (matmul, attention, loss, layer norm, embedding, optimizer, casts and
  copies, other elementwise), the host's time waiting on the device, kernel launches per step, and the
  top operators.

Every step time is taken inside one training run, between two device synchronisations made from its
`progress` callback after the first steps and at the last: set-up, compilation and CUDA-graph capture
stay out of it.

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
    no_eval,
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
from models.packed import train_packed
from models.scoring import nll_bits
from models.spec import CellSpec, DataSpec, ModelSpec, TrainSpec
from models.train import LEGACY_STEP, StepOptions, train

ROOT = Path(__file__).resolve().parent.parent
TINY = DataSpec(64, 32, 128, 256)  # the laptop sweep's data: V=64, S=32
PAPER = DataSpec(2048, 64, 1024, 256)  # the paper's synthetic data: V=2048, S=64
# Issue 19's before and after: the step as it was, and today's default step.
STEPS = {"before": LEGACY_STEP, "after": StepOptions()}
WARM_STEPS = 5  # steps a timed run takes before its clock starts: compilation, CUDA graphs, allocator


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


def step_seconds(specs: list[CellSpec], device: torch.device, options: StepOptions = STEPS["after"],
                 profiler=None) -> float:
    """Seconds per optimizer step of `specs` trained alone (one spec) or as one pack, once running: timed
    inside the run between a device synchronisation after WARM_STEPS steps and one at the last step
    (the clock of `profiler`, if given, runs between the same two points)."""
    last, marks = specs[0].train.max_steps, {}

    def progress(step: int, metrics: dict) -> None:
        if step in (WARM_STEPS, last):
            sync(device)
            marks[step] = time.perf_counter()
            if profiler is not None:
                (profiler.start if step == WARM_STEPS else profiler.stop)()

    members = [synthetic_members(s.data, s.seed) for s in specs]
    if len(specs) == 1:
        train(specs[0], members[0], device=device, evaluate=no_eval, progress=progress, options=options)
    else:
        train_packed(specs, members, device=device, evaluates=[no_eval] * len(specs), options=options,
                     progresses=[progress] + [lambda step, metrics: None] * (len(specs) - 1))
    return (marks[last] - marks[WARM_STEPS]) / (last - WARM_STEPS)


def throughput(spec: CellSpec, device: torch.device, k: int = 1, options: StepOptions = STEPS["after"]) -> float:
    """Training tokens/s of one cell (k=1) or a pack of k, once running."""
    specs = [dataclasses.replace(spec, seed=i) for i in range(k)]
    return k * spec.train.batch_size * spec.data.seq_len / step_seconds(specs, device, options)


def lone_cells(device: torch.device, quick: bool) -> dict[str, CellSpec]:
    """The lone cells whose step time issue 19 is about: the paper's l1_d32 cell (batch 2048) in fp32
    and bf16, and the launch-bound tiny one (batch 64); on a CPU the tiny one alone."""
    steps = WARM_STEPS + (5 if device.type == "cpu" else (30 if quick else 60))
    cells = {"paper_l1_d32_fp32": cell("l1_d32", PAPER, steps, 2048, num_sequences=4096, lr=1e-3),
             "paper_l1_d32_bf16": cell("l1_d32", PAPER, steps, 2048, precision="bf16", num_sequences=4096, lr=1e-3),
             "tiny_l1_d32_fp32": cell("l1_d32", TINY, steps, 64, num_sequences=256)}
    return {"tiny_l1_d32_fp32": cells["tiny_l1_d32_fp32"]} if device.type == "cpu" else cells


def lone_cell_figures(specs: dict[str, CellSpec], variants: dict[str, StepOptions], device: torch.device,
                      before_ms: dict[str, float]) -> dict:
    """ms per step of each lone cell in each variant, and its speedup over `before_ms` (the step
    before issue 19; else this call's own "before" variant). A variant that fails (a compile mode) is
    recorded as its error."""
    out = {}
    for label, spec in specs.items():
        row = {}
        for name, options in variants.items():
            try:
                row[name] = {"ms_per_step": 1e3 * step_seconds([spec], device, options)}
            except Exception as err:  # a compile mode that fails here must not lose the other figures
                row[name] = {"error": f"{type(err).__name__}: {err}"}
            finally:
                torch._dynamo.reset()  # each variant compiles afresh, none inherits another's graphs
        before = before_ms.get(label) or row.get("before", {}).get("ms_per_step")
        for figure in row.values():
            if "ms_per_step" in figure and before:
                figure["speedup"] = before / figure["ms_per_step"]
        out[label] = row
        print(f"  lone {label}: " + "  ".join(f"{n} {f.get('ms_per_step', float('nan')):.2f} ms"
                                             for n, f in row.items()), flush=True)
    return out


def section_lone_cell(device: torch.device, quick: bool) -> dict:
    """A lone cell's step time before and after issue 19 (set-up left out); `speedup`: steps/s over
    the step before issue 19."""
    return {"what": "a lone cell's ms per step: before issue 19 and after; speedup over before",
            "target": ">= 2 for paper_l1_d32 (steps/s over before)",
            "cells": lone_cell_figures(lone_cells(device, quick), STEPS, device, {})}


def section_compiled(device: torch.device, quick: bool, lone: dict) -> dict:
    """The same lone cells with today's step compiled: torch.compile's default mode and, on CUDA, its
    CUDA graphs (`reduce-overhead`); compilation left out of the figure; speedup over lone_cell's before."""
    variants = {"compiled": StepOptions(compile_mode="default")}
    if device.type == "cuda":
        variants["cuda_graphs"] = StepOptions(compile_mode="reduce-overhead")
    before = {label: row["before"]["ms_per_step"] for label, row in lone.get("cells", {}).items()
              if "ms_per_step" in row.get("before", {})}
    cells = lone_cell_figures(lone_cells(device, quick), variants, device, before)
    return {"what": "a lone cell's ms per step with today's step compiled (MEMSWEEP_COMPILE); speedup over "
                    "lone_cell's before", "cells": cells}


def section_paper_shapes(device: torch.device, quick: bool, peaks: dict) -> dict:
    shapes = ["l1_d32"] if device.type == "cpu" else paper_shapes()
    data, batch = (TINY, 64) if device.type == "cpu" else (PAPER, 2048)
    steps = WARM_STEPS + (3 if device.type == "cpu" else (5 if quick else 10))
    rows = {}
    for shape in shapes:
        row = {}
        for precision in ("fp32", "bf16"):
            spec = cell(shape, data, steps, batch, precision=precision, num_sequences=4096, lr=1e-3)
            peak = peaks.get(f"{precision}_flops") or peaks.get("fp32_flops")
            figure = {}
            for when, options in STEPS.items():
                tps = throughput(spec, device, options=options)
                flops = tps / (batch * data.seq_len) * spec.train_flops_per_step
                figure[when] = {"tokens_per_s": tps, "mfu": flops / peak if peak else None}
            figure["after_over_before"] = figure["after"]["tokens_per_s"] / figure["before"]["tokens_per_s"]
            row[precision] = figure
        row["bf16_over_fp32"] = row["bf16"]["after"]["tokens_per_s"] / row["fp32"]["after"]["tokens_per_s"]
        if int(shape.split("_d")[1]) <= 64:
            spec = cell(shape, data, steps, batch, num_sequences=4096, lr=1e-3)
            row["pack8_over_one"] = throughput(spec, device, k=8) / row["fp32"]["after"]["tokens_per_s"]
        rows[shape] = row
        print(f"  {shape}: " + json.dumps(row), flush=True)
    return {"what": f"training tokens/s and MFU per paper shape (V={data.vocab_size}, S={data.seq_len}, "
                    f"batch {batch}), before issue 19 and after; pack8_over_one: tokens/s of a pack of 8 "
                    "over one cell", "targets": "bf16 mfu >= 0.3 at d=256; bf16_over_fp32 >= 3 at d >= 128",
            "shapes": rows}


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


# Operator categories of the profile, first match wins: (category, substrings of an aten op's name).
CATEGORIES = (
    ("attention", ("attention",)),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")),
    ("optimizer", ("adam", "aten::_foreach")),  # AdamW and the clip's foreach norms and scaling
    ("loss", ("softmax", "nll_loss", "cross_entropy")),
    ("layer_norm", ("layer_norm",)),
    ("embedding", ("embedding",)),
    ("casts_and_copies", ("aten::copy_", "aten::_to_copy")),
    ("elementwise_and_other", ("aten::",)),
)
HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def op_category(name: str) -> str | None:
    """The category of an aten operator (None for anything else: runtime calls, kernels themselves,
    which on a GPU are counted through the operator that launched them)."""
    if not name.startswith("aten::") or name in HOST_WAITS:
        return None
    lowered = name.lower()
    return next(category for category, keys in CATEGORIES if any(k.lower() in lowered for k in keys))


def profile_breakdown(events, steps: int, on_gpu: bool) -> dict:
    """torch.profiler's key averages -> per step: the device time (on a CPU, the host's) by category,
    its top operators, the host's time waiting on the device, and kernel launches."""
    self_time = (lambda e: e.self_device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)
    ops = [e for e in events if op_category(e.key) is not None and self_time(e) > 0]
    busy = sum(self_time(e) for e in ops) or 1.0
    categories = {}
    for e in ops:
        categories[op_category(e.key)] = categories.get(op_category(e.key), 0.0) + self_time(e)
    top = sorted(ops, key=self_time, reverse=True)[:10]
    return {"busy_ms_per_step": busy / 1e3 / steps,
            "share": {c: t / busy for c, t in sorted(categories.items(), key=lambda kv: -kv[1])},
            "host_wait_ms_per_step": sum(e.self_cpu_time_total for e in events if e.key in HOST_WAITS) / 1e3 / steps,
            "launches_per_step": sum(e.count for e in events if e.key in LAUNCHES) / steps,
            "top": [{"op": e.key, "share": self_time(e) / busy, "calls_per_step": e.count / steps} for e in top]}


def section_profile(device: torch.device, quick: bool) -> dict:
    """Where a training step's time goes, fp32 against bf16, before and after issue 19 (torch.profiler
    over the steps after the warm-up): device time by operator category, busy time over wall time
    (under 1: the device waits for the host), the host's waits on the device and kernel launches."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    shapes = ([("l1_d32", TINY, 64)] if device.type == "cpu"
              else [("l1_d32", PAPER, 2048), ("l8_d256", PAPER, 2048)])
    steps, out = WARM_STEPS + (3 if device.type == "cpu" else 6), {}
    for shape, data, batch in shapes:
        for precision in ("fp32", "bf16"):
            spec = cell(shape, data, steps, batch, precision=precision, num_sequences=4096, lr=1e-3)
            for when, options in STEPS.items():
                prof = profile(activities=activities)
                seconds = step_seconds([spec], device, options, profiler=prof)
                run = out[f"{shape}_{precision}_{when}"] = {
                    "ms_per_step": 1e3 * seconds,
                    **profile_breakdown(prof.key_averages(), steps - WARM_STEPS, device.type == "cuda")}
                run["busy_over_wall"] = run["busy_ms_per_step"] / run["ms_per_step"]
                print(f"  profile {shape} {precision} {when}: {run['ms_per_step']:.2f} ms/step, busy "
                      f"{run['busy_over_wall']:.0%}, waits {run['host_wait_ms_per_step']:.2f} ms; "
                      + ", ".join(f"{c} {v:.0%}" for c, v in list(run["share"].items())[:5]), flush=True)
    return {"what": "where a step's time goes, by operator category, fp32 and bf16, before and after issue 19",
            "runs": out}


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
    parser.add_argument("--only", nargs="*", help="section names to run, in this order (default: all)")
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
        "lone_cell": lambda: section_lone_cell(device, args.quick),
        "compiled": lambda: section_compiled(device, args.quick, results["sections"].get("lone_cell", {})),
        "train_vs_bare": lambda: section_train_vs_bare(device, args.quick),
        "packed": lambda: section_packed(device, args.quick),
        "fractional": lambda: section_fractional(device, args.quick),
        "paper_shapes": lambda: section_paper_shapes(device, args.quick, results["sections"].get("peaks", {})),
        "crossover": lambda: section_crossover(device, args.quick),
        "score_vs_train": lambda: section_score_vs_train(device, args.quick),
        "laptop_grid": lambda: section_laptop_grid(device, args.quick),
        "profile": lambda: section_profile(device, args.quick),
    }
    unknown = set(args.only or ()) - set(sections)
    if unknown:
        parser.error(f"--only: no section {', '.join(sorted(unknown))} (sections: {', '.join(sections)})")
    for name in args.only or sections:  # in the order given
        run = sections[name]
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
            print(f"{shape:10s} " + "   ".join(
                f"{p} {row[p]['after']['tokens_per_s']:11.0f} tok/s mfu {row[p]['after']['mfu'] or 0:.3f} "
                f"({row[p]['after_over_before']:.2f}x before)" for p in ("fp32", "bf16"))
                + f"   bf16/fp32 {row['bf16_over_fp32']:.2f}"
                + (f"   pack8/one {row['pack8_over_one']:.2f}" if "pack8_over_one" in row else ""))
        for label, row in section.get("cells", {}).items():
            print(f"lone {label:24s} " + "  ".join(
                f"{n} {f['ms_per_step']:.2f} ms ({f.get('speedup', float('nan')):.2f}x)" if "ms_per_step" in f
                else f"{n} failed"
                for n, f in row.items()))
        for label, run in section.get("runs", {}).items():
            print(f"profile {label:24s} {run['ms_per_step']:8.2f} ms/step busy {run['busy_over_wall']:4.0%} "
                  f"waits {run['host_wait_ms_per_step']:.2f} ms  launches {run['launches_per_step']:.0f}  "
                  + ", ".join(f"{c} {v:.0%}" for c, v in list(run["share"].items())[:4]))


if __name__ == "__main__":
    main()
