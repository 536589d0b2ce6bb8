"""Run one cell end to end: train, measure, record. Used by `memsweep run` and by every Ray worker.

A cell is idempotent: its MLflow run is found by its cell-id tag (a retry continues the same run, a
cell already FINISHED is not trained again), training resumes from the cell's latest complete
checkpoint, and the run is marked FINISHED only after its final metrics and per-sequence artifact are
recorded. A cell that raises is marked FAILED with its error; one that is cancelled is marked KILLED.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from measure.memorization import PAPER_ALPHA_BITS_PER_PARAM, predicted_mem_bits, summarize_synthetic
from measure.mia import mia_metrics
from models.checkpoint import CheckpointStore
from models.data import mia_member_subset, synthetic_members, synthetic_nonmembers
from models.gpt import GPT
from models.precision import check_supported, resolve_device
from models.scoring import nll_bits
from models.spec import Cell, CellSpec, flatten, to_dict
from models.train import ProgressFn, TrainResult, train
from orchestrator.tracking import TAG_SWEEP, MetricBuffer, Tracker


@dataclass
class CellOutcome:
    cell_id: str
    run_id: str | None
    status: str  # FINISHED, FAILED or KILLED
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    already_finished: bool = False  # found FINISHED in the tracker; nothing was trained


def memorization_metrics(spec: CellSpec, model: GPT, members: np.ndarray, batch_size: int) -> dict:
    """The step-curve evaluation: dataset memorization of the members, in bits."""
    nll = nll_bits(model, members, batch_size)
    return {"mem_bits": summarize_synthetic(nll, spec.data.seq_len, spec.data.vocab_size).mem_bits}


def measure_cell(
    spec: CellSpec, model: GPT, members: np.ndarray, nonmembers: np.ndarray, batch_size: int
) -> tuple[dict[str, float], pa.Table]:
    """Every final number of SCIENCE.md for a synthetic cell, and the per-sequence table behind them."""
    S, V, N = spec.data.seq_len, spec.data.vocab_size, spec.data.num_sequences
    member_nll = nll_bits(model, members, batch_size)  # (N,) bits
    nonmember_nll = nll_bits(model, nonmembers, batch_size)  # (M,) bits
    summary = summarize_synthetic(member_nll, S, V)
    subset = mia_member_subset(spec.data, spec.seed)  # min(N, M) members ...
    mia_nonmembers = len(subset)  # ... against as many non-members (i.i.d.: the first ones), so
    # the classes are balanced and random guessing scores F1 = 0.5 even when N < M.
    loss_attack = mia_metrics(-member_nll[subset], -nonmember_nll[:mia_nonmembers])  # score = -nll_bits
    metrics = {
        "params": float(spec.params),
        "params_paper": float(spec.params_paper),
        "entropy_bits": summary.entropy_bits,
        "mem_bits": summary.mem_bits,
        "mem_bits_unclipped": summary.mem_bits_unclipped,
        "mem_fraction": summary.mem_fraction,
        "bits_per_param": summary.mem_bits / spec.params,
        "predicted_mem_bits": float(predicted_mem_bits(
            PAPER_ALPHA_BITS_PER_PARAM[spec.precision], spec.params, summary.entropy_bits)),
        "sequences_per_param": N / spec.params,
        "train_nll_bits_per_token": float(member_nll.mean() / S),
        "test_nll_bits_per_token": float(nonmember_nll.mean() / S),
        **loss_attack.as_dict("loss"),
    }
    in_mia = np.zeros(N, dtype=bool)
    in_mia[subset] = True
    per_sequence = pa.table({
        "split": pa.array(["member"] * N + ["nonmember"] * len(nonmembers)),
        "index": pa.array(np.concatenate([np.arange(N), np.arange(len(nonmembers))]).astype(np.int64)),
        "nll_bits": pa.array(np.concatenate([member_nll, nonmember_nll])),
        "mem_bits": pa.array(np.maximum(0.0, spec.data.sequence_bits - np.concatenate([member_nll, nonmember_nll]))),
        "in_mia": pa.array(np.concatenate([in_mia, np.arange(len(nonmembers)) < mia_nonmembers])),
    })
    return metrics, per_sequence


def train_and_measure(
    cell: Cell, log=lambda metrics, step: None, progress: ProgressFn = lambda step, metrics: None
) -> tuple[dict[str, float], pa.Table, TrainResult]:
    """Train the cell (resuming from its checkpoint) and measure it; no tracking involved."""
    spec, options = cell.spec, cell.options
    device = resolve_device(options.device)
    check_supported(spec.precision, device)
    members = synthetic_members(spec.data, spec.seed)
    nonmembers = synthetic_nonmembers(spec.data, spec.seed)
    result = train(
        spec,
        members,
        device=device,
        evaluate=lambda model: memorization_metrics(spec, model, members, options.eval_batch_size),
        checkpoints=CheckpointStore(options.storage, spec.cell_id),
        log=log,
        progress=progress,
    )
    metrics, table = measure_cell(spec, result.model, members, nonmembers, options.eval_batch_size)
    metrics.update({
        "steps": float(result.steps),
        "converged": float(result.converged),
        "resumed_from_step": float(result.resumed_from_step),
        "wall_s": result.wall_s,
        "tokens_per_s": result.tokens_per_s,
    })
    return metrics, table, result


def run_cell(
    cell: Cell,
    *,
    parent_run_id: str | None = None,
    progress: ProgressFn = lambda step, metrics: None,
    tracker: Tracker | None = None,
    tags: dict | None = None,
) -> CellOutcome:
    """Train, measure and record one cell into its own MLflow run. Never raises for a failure of the
    cell itself (it is recorded FAILED); re-raises cancellation after marking the run KILLED."""
    spec, options = cell.spec, cell.options
    tracker = tracker or Tracker(options.tracking_uri, options.artifact_root)
    run_id, finished = tracker.open_cell_run(
        options.experiment, spec.cell_id, run_name=spec.slug,
        tags={TAG_SWEEP: options.sweep, "precision": spec.precision, **options.tags},
        parent_run_id=parent_run_id,
    )
    if finished:
        return CellOutcome(spec.cell_id, run_id, "FINISHED", already_finished=True)
    try:
        if tags:  # where this attempt runs (a retry on another node overwrites them)
            tracker.set_tags(run_id, tags)
        tracker.log_params(run_id, flatten(cell.config or to_dict(spec)))
        curves = MetricBuffer(tracker, run_id)
        started = time.perf_counter()
        metrics, table, _ = train_and_measure(cell, log=curves, progress=progress)
        curves.flush()
        final_step = int(metrics["steps"])
        tracker.log_metrics(run_id, [(k, v, final_step) for k, v in metrics.items()])
        tracker.log_table(run_id, table)
        tracker.set_tags(run_id, {"cell_wall_s": f"{time.perf_counter() - started:.1f}"})
        tracker.finish(run_id)
        return CellOutcome(spec.cell_id, run_id, "FINISHED", metrics)
    except (KeyboardInterrupt, SystemExit) as err:
        tracker.fail(run_id, f"cancelled: {type(err).__name__}", status="KILLED")
        raise
    except Exception as err:  # the cell failed; the sweep goes on
        error = f"{type(err).__name__}: {err}"
        tracker.fail(run_id, f"{error}\n{traceback.format_exc(limit=8)}")
        return CellOutcome(spec.cell_id, run_id, "FAILED", error=error)
