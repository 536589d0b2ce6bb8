"""What a sweep costs before it runs: training FLOPs at the step cap, and device-hours on the devices the
benchmarks measured.

The FLOPs are the spec's own estimate (`resources.train_flops`: `CellSpec.train_flops_per_step` times
`train.max_steps`, a cap, so an early stop spends less). Device-hours come from `bench.gpu`'s shipped results
(bench/results/gpu-*.json): the training tokens/s of the 16 paper shapes in fp32 and bf16 (V=2048,
S=64, batch 2048), turned into achieved FLOP/s per (shape, precision) with the same FLOPs formula, and a
lone tiny cell's step time, which bounds every step from below (a small step waits on kernel launches,
not arithmetic). A cell whose shape the table lacks takes the median FLOP/s of its precision and is
counted as extrapolated; `amp_bf16` takes bf16's figures. The hours are one cell per GPU at a time:
packing and fractional sharing (orchestrator/resources.py) lower them for small cells.

Beside the cap, every figure is also given at each cell's expected steps (`expected_steps`): an
estimate of where the convergence rule stops it, from what the project's runs showed, never a
measurement.
"""

from __future__ import annotations

import glob
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from measure.memorization import PAPER_ALPHA_BITS_PER_PARAM
from models.spec import CellSpec, DataSpec, ModelSpec, TrainSpec
from orchestrator.resources import train_flops

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
TABLE_DATA = {"vocab_size": 2048, "seq_len": 64}  # the configuration bench.gpu's paper_shapes trains
TABLE_BATCH = 2048
PRECISION_ROW = {"fp32": "fp32", "bf16": "bf16", "amp_bf16": "bf16"}
UNITS = ["", "K", "M", "G", "T", "P", "E", "Z", "Y"]
# expected_steps' two figures, from the runs its docstring lists
CONVERGING_RATIO = 0.55  # H(X) / predicted capacity up to which cells were seen to converge
CONVERGE_EPOCHS = 8500  # passes over its data by which such a cell had converged, at most


def flops_text(value: float) -> str:
    """FLOPs in readable units: 382 PFLOP, 1.83 ZFLOP."""
    exponent = 0
    while abs(value) >= 1000 and exponent < len(UNITS) - 1:
        value, exponent = value / 1000, exponent + 1
    return f"{value:.3g} {UNITS[exponent]}FLOP"


def hours_text(hours: float) -> str:
    """Device time readable at every scale: 13,362 device-hours, 4.2 device-minutes, 7 device-seconds."""
    if hours >= 1:
        return f"{hours:,.0f} device-hours" if hours >= 100 else f"{hours:.1f} device-hours"
    if hours * 60 >= 1:
        return f"{hours * 60:.1f} device-minutes"
    return f"{hours * 3600:.2g} device-seconds"


@dataclass(frozen=True)
class DeviceThroughput:
    """What one device kind was measured to do (one bench.gpu results file)."""

    device: str
    source: str  # the results file, relative to the repository
    flops_per_s: dict  # (shape "l1_d128", precision "fp32"|"bf16") -> achieved training FLOP/s
    min_step_s: float  # a lone tiny cell's step: launch-bound, the floor of every step

    def step_seconds(self, spec: CellSpec) -> tuple[float, bool]:
        """(seconds of one training step of `spec`, whether its shape was missing from the table)."""
        row = PRECISION_ROW.get(spec.precision, "fp32")
        rate = self.flops_per_s.get((spec.shape_slug, row))
        extrapolated = rate is None
        if extrapolated:
            rate = statistics.median(v for (_, p), v in self.flops_per_s.items() if p == row)
        return max(self.min_step_s, spec.train_flops_per_step / rate), extrapolated


def _table_spec(shape: str) -> CellSpec:
    """The cell bench.gpu trained for a paper shape (its FLOPs per token convert tokens/s to FLOP/s)."""
    layers, width = (int(part[1:]) for part in shape.split("_"))
    return CellSpec(model=ModelSpec(name=shape, n_layer=layers, n_embd=width, n_head=max(1, width // 32)),
                    data=DataSpec(num_sequences=1, num_nonmembers=1, **TABLE_DATA), train=TrainSpec(max_steps=1, batch_size=TABLE_BATCH, lr=1e-3),
                    precision="fp32", seed=0)


def _throughput(path: str, results: dict) -> DeviceThroughput | None:
    sections = results.get("sections", {})
    shapes = sections.get("paper_shapes", {}).get("shapes")
    if not shapes:
        return None
    rates = {}
    for shape, rows in shapes.items():
        spec = _table_spec(shape)
        per_token = spec.train_flops_per_step / (TABLE_BATCH * TABLE_DATA["seq_len"])
        rates.update({(shape, precision): row["tokens_per_s"] * per_token for precision, row in rows.items()
                      if isinstance(row, dict) and "tokens_per_s" in row})  # beside them: pack8_over_one
    return DeviceThroughput(results.get("machine", {}).get("gpu") or results.get("device", "?"),
                            os.path.relpath(path, RESULTS.parent.parent), rates, _min_step_s(path))


def _min_step_s(path: str) -> float:
    """The launch-bound step of a lone tiny cell, from the same device's crossover measurement (the
    newest results file of that device that has one); 0 when none was measured."""
    steps = []
    for other in sorted(glob.glob(os.path.join(os.path.dirname(path), "gpu-*.json"))):
        rows = json.loads(Path(other).read_text()).get("sections", {}).get("crossover", {}).get("rows", [])
        steps += [row["sequential_ms_per_cell_step"] / 1000 for row in rows if "sequential_ms_per_cell_step" in row]
    return min(steps, default=0.0)


def measured_throughputs(results: Path = RESULTS) -> list[DeviceThroughput]:
    """One entry per device kind: the newest results file of each that measured the paper shapes."""
    newest: dict[str, DeviceThroughput] = {}
    for path in sorted(glob.glob(str(results / "gpu-*.json"))):  # names sort by time
        found = _throughput(path, json.loads(Path(path).read_text()))
        if found is not None:
            newest[found.device] = found
    return list(newest.values())


def expected_steps(spec: CellSpec) -> int:
    """The optimizer steps `spec` is expected to take before it stops: an estimate, not a measurement.

    A cell stops once its memorization settles (models/progress.py): under the branches schedule once
    two annealed branches a doubling apart agree within `converge_tol`, under wsd once mem_bits moved by
    less than `converge_tol` over a doubling of the steps after its cool-down. Where runs saw that
    happen, by H(X) / predicted capacity (the paper's alpha x params), all on train=cpu (batch 64); the
    l1_d16 and l2_d16 runs were made for this estimate under wsd (V=64, S=32, seed 0, caps of 8,000 or
    16,000 steps, 2026-12-01):

    - Up to CONVERGING_RATIO, every cell converged, after at most CONVERGE_EPOCHS passes over its
      data: l1_d16 and l2_d16 at 0.1-0.2 of capacity at 600-1,000 steps (the floor below), at 0.4
      after 2,462 and 3,394 passes (N = 39, 66), at 0.55 after 5,434 and 8,270 (N = 53, 89). Under
      branches the estimate is the first horizon past CONVERGE_EPOCHS passes (and at least the second
      horizon: the rule needs two branches), with the trunk's steps and every branch to it; under wsd
      CONVERGE_EPOCHS passes, and never less than its rules allow (a cool-down triggered at the second
      evaluation, or the first past warm-up, lasting `cooldown_fraction` of it).
    - Above it, no cell converged before its cap: l1_d16 at 0.7 and 0.81 (N = 68, 79) and l2_d16 at
      0.7 (N = 114) reached caps of 16,000, 8,000 and 16,000 steps unconverged; bench.convergence
      (convergence-20261130T234551Z.json) ran 18 cells at ~8x capacity, every one to its cap. The
      estimate is the cap (TrainSpec.steps_at_cap), an upper bound where the cap is far longer
      than these runs (the paper recipe's 10^6 steps).
    - Text cells (capacity in bits unknown), cosine (it decays until the cap) and constant-rate runs
      (not measured): the cap.

    The passes were measured on the CPU recipe only: applied to another recipe (the paper's: batch
    2,048) they are an extrapolation."""
    train, data = spec.train, spec.data
    cap = train.steps_at_cap
    if spec.is_text or train.schedule not in ("wsd", "branches"):
        return cap
    if data.entropy_bits > CONVERGING_RATIO * PAPER_ALPHA_BITS_PER_PARAM[spec.precision] * spec.params:
        return cap
    passes = math.ceil(CONVERGE_EPOCHS * data.num_sequences / train.batch_size)
    if train.schedule == "branches":
        return min(cap, train.steps_to_horizon_at_least(max(2 * train.first_branch, passes)))
    first_trigger = train.eval_interval * max(2, math.ceil(train.warmup_steps / train.eval_interval))
    earliest = first_trigger + max(1, round(train.cooldown_fraction * first_trigger))
    return min(train.max_steps, max(earliest, passes))


@dataclass
class PlanCost:
    """A plan's totals: cells, FLOPs and device-hours per measured device kind, each at the step cap
    and at the expected steps (`expected_steps`, an estimate)."""

    cells: int = 0
    flops: float = 0.0
    flops_expected: float = 0.0
    device_hours: dict = field(default_factory=dict)  # device -> hours at the cap, one cell per GPU at a time
    device_hours_expected: dict = field(default_factory=dict)  # device -> hours at the expected steps
    extrapolated: dict = field(default_factory=dict)  # device -> cells whose shape its table lacks
    sources: dict = field(default_factory=dict)  # device -> results file

    def lines(self) -> list[str]:
        out = [f"totals of the {self.cells:,} cells that would run: {flops_text(self.flops)} of training at the step "
               f"cap (train.max_steps), {flops_text(self.flops_expected)} at the expected steps to convergence "
               f"(an estimate: cells up to {CONVERGING_RATIO:g} of their predicted capacity stop early, "
               "the rest at the cap)"]
        for device, hours in self.device_hours.items():
            guessed = self.extrapolated[device]
            out.append(f"  {device}: {hours_text(hours)} at the cap, {hours_text(self.device_hours_expected[device])} "
                       f"expected, one cell at a time (bench.gpu, {self.sources[device]})"
                       + (f"; {guessed:,} cells of shapes it did not measure use its median rate" if guessed else ""))
        if not self.device_hours:
            out.append("  no device throughput measured (bench/results/gpu-*.json): device-hours unknown")
        return out

    def as_dict(self) -> dict:
        return {"cells": self.cells, "train_flops": self.flops, "expected_train_flops": self.flops_expected,
                "device_hours": self.device_hours, "expected_device_hours": self.device_hours_expected,
                "extrapolated_cells": self.extrapolated, "throughput_sources": self.sources}


def cell_hours(spec: CellSpec, throughput: DeviceThroughput, steps: int | None = None) -> tuple[float, bool]:
    """(hours of `steps` training steps of `spec`, default its cap; whether its shape was extrapolated)."""
    seconds, extrapolated = throughput.step_seconds(spec)
    return seconds * (spec.train.steps_at_cap if steps is None else steps) / 3600, extrapolated


def plan_cost(specs: list[CellSpec], throughputs: list[DeviceThroughput]) -> PlanCost:
    expected = [expected_steps(s) for s in specs]
    cost = PlanCost(cells=len(specs), flops=sum(train_flops(s) for s in specs),
                    flops_expected=sum(s.train_flops_per_step * n for s, n in zip(specs, expected)))
    for throughput in throughputs:
        hours = [cell_hours(s, throughput) for s in specs]
        cost.device_hours[throughput.device] = sum(h for h, _ in hours)
        cost.device_hours_expected[throughput.device] = sum(cell_hours(s, throughput, n)[0]
                                                            for s, n in zip(specs, expected))
        cost.extrapolated[throughput.device] = sum(e for _, e in hours)
        cost.sources[throughput.device] = throughput.source
    return cost


def cell_rows(plan, throughputs: list[DeviceThroughput]) -> list[dict]:
    """`launch --dry-run`'s record of every cell of `plan`, in plain numbers (bytes, FLOPs, hours): its
    id and state, parameters, H(X) and the paper's predicted mem_bits (synthetic cells only: a corpus's
    H(X) is unknown), memory estimate, training FLOPs at the step cap and at its expected steps (an
    estimate: `expected_steps`), the Ray request it would make on this cluster's CPUs (GPU requests
    are decided when the driver sees the cluster), and its hours on each measured device at both."""
    from measure.memorization import predicted_mem_bits
    from orchestrator.resources import estimate_memory_bytes, request_for

    on_gpu = plan.cluster.declares_gpus
    rows = []
    for cell in plan.cells:
        spec = cell.spec
        steps = expected_steps(spec)
        row = {"cell_id": cell.cell_id, "state": plan.state(cell), "params": spec.params,
               "entropy_bits": None if spec.is_text else spec.data.entropy_bits,
               "predicted_mem_bits": None if spec.is_text else predicted_mem_bits(
                   PAPER_ALPHA_BITS_PER_PARAM[spec.precision], spec.params, spec.data.entropy_bits),
               "memory_bytes": estimate_memory_bytes(spec, cell.options.eval_batch_size),
               "train_flops": train_flops(spec), "expected_steps": steps,
               "expected_train_flops": spec.train_flops_per_step * steps,
               "request": request_for(spec, plan.cluster, on_gpu, cell.options.eval_batch_size)}
        for throughput in throughputs:
            row[f"hours[{throughput.device}]"] = cell_hours(spec, throughput)[0]
            row[f"expected_hours[{throughput.device}]"] = cell_hours(spec, throughput, steps)[0]
        rows.append(row)
    return rows
