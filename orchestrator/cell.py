"""Run one cell end to end: train, measure, record. Used by `memsweep run` and by every Ray worker.

A cell is idempotent: its MLflow run is found by its cell-id tag (a retry continues the same run, a
cell already FINISHED is not trained again), training resumes from the cell's latest complete
checkpoint, and the run is marked FINISHED only after its final metrics and per-sequence artifact are
recorded. A cell that raises is marked FAILED with its error; one that is cancelled is marked KILLED.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from measure.memorization import (
    PAPER_ALPHA_BITS_PER_PARAM,
    mem_bits_against_reference,
    mem_bits_per_sequence,
    predicted_mem_bits,
    summarize_synthetic,
)
from measure.mia import mia_metrics
from models.checkpoint import CheckpointStore
from models.data import mia_member_subset, synthetic_members, synthetic_nonmembers
from models.gpt import GPT
from models.precision import check_supported, resolve_device
from models.scoring import extraction_rates, greedy_correct, nll_bits
from models.spec import Cell, CellSpec, flatten, to_dict
from models.text import TextData, load_text_data, stored_tokenizer
from models.train import ProgressFn, TrainResult, load_trained, train

EXTRACTION_PREFIXES = (8, 16, 32)  # tokens of a sequence given before greedy decoding (SCIENCE.md)
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


# -- text cells ----------------------------------------------------------------------------------------
@dataclass
class ReferenceScores:
    """A text cell's sequences scored by its reference model: nll_bits of the pool, the non-members
    and the test set (the reference is trained once, in its own cell, and only read here)."""

    members: np.ndarray
    nonmembers: np.ndarray
    test: np.ndarray


def load_text_cell_data(cell: Cell) -> TextData:
    """The cell's three splits, tokenized with the tokenizer the driver stored for the sweep."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # Ray workers fork; keep tokenizers serial
    data = cell.spec.data
    tokenizer = stored_tokenizer(cell.options.storage, data.tokenizer_hash) if data.tokenizer_hash else None
    return load_text_data(data, tokenizer)


def reference_scores(cell: Cell, data: TextData, device) -> ReferenceScores | None:
    reference = cell.spec.reference
    if reference is None:
        return None
    model = load_trained(reference, CheckpointStore(cell.options.storage, reference.cell_id), device)
    batch = cell.options.eval_batch_size
    return ReferenceScores(nll_bits(model, data.pool, batch), nll_bits(model, data.nonmembers, batch),
                           nll_bits(model, data.test, batch))


def text_mem_bits(spec: CellSpec, member_nll: np.ndarray, ref: ReferenceScores | None) -> np.ndarray:
    """Memorized bits per training sequence: unintended memorization against the reference, or, for a
    cell without one (a reference itself), against the uniform code of S*log2(V) bits."""
    if ref is None:
        return mem_bits_per_sequence(member_nll, spec.data.seq_len, spec.data.vocab_size)
    return mem_bits_against_reference(member_nll, ref.members)


def measure_text_cell(spec: CellSpec, model: GPT, data: TextData, ref: ReferenceScores | None,
                      batch_size: int) -> tuple[dict[str, float], pa.Table]:
    """Every final number of SCIENCE.md for a text cell, and the per-sequence table behind them.

    The loss attack (and, with a reference, the reference attack) scores min(N, M) members against as
    many non-members; extraction is measured on those members and on the test set. Test loss is on the
    test set (on the non-members when the split has no test set)."""
    S, N = spec.data.seq_len, spec.data.num_sequences
    member_nll = nll_bits(model, data.pool, batch_size)
    nonmember_nll = nll_bits(model, data.nonmembers, batch_size)
    test_nll = nll_bits(model, data.test, batch_size) if len(data.test) else nonmember_nll
    per_sequence_mem = text_mem_bits(spec, member_nll, ref)
    mem_bits = float(per_sequence_mem.sum())
    entropy_bits = float(ref.members.sum()) if ref else N * spec.data.seq_len * float(np.log2(spec.data.vocab_size))
    subset = mia_member_subset(spec.data, spec.seed)
    k = len(subset)
    metrics = {
        "params": float(spec.params),
        "params_paper": float(spec.params_paper),
        "entropy_bits": entropy_bits,
        "capacity_ratio": entropy_bits / (PAPER_ALPHA_BITS_PER_PARAM[spec.precision] * spec.params),
        "mem_bits": mem_bits,
        "mem_bits_per_sequence": mem_bits / N,
        "bits_per_param": mem_bits / spec.params,
        "sequences_per_param": N / spec.params,
        "train_nll_bits_per_token": float(member_nll.mean() / S),
        "test_nll_bits_per_token": float(test_nll.mean() / S),
        "nonmember_nll_bits_per_token": float(nonmember_nll.mean() / S),
        **mia_metrics(-member_nll[subset], -nonmember_nll[:k]).as_dict("loss"),
    }
    if ref is not None:
        metrics.update({
            "reference_train_nll_bits_per_token": float(ref.members.mean() / S),
            "reference_test_nll_bits_per_token": float((ref.test if len(data.test) else ref.nonmembers).mean() / S),
            **mia_metrics((ref.members - member_nll)[subset],
                          (ref.nonmembers - nonmember_nll)[:k]).as_dict("reference"),
        })
    train_correct = greedy_correct(model, data.pool[subset], batch_size)
    test_correct = greedy_correct(model, data.test, batch_size) if len(data.test) else None
    for prefix, rate in extraction_rates(train_correct, EXTRACTION_PREFIXES).items():
        metrics[f"extract_train_p{prefix}"] = rate
    if test_correct is not None:
        for prefix, rate in extraction_rates(test_correct, EXTRACTION_PREFIXES).items():
            metrics[f"extract_test_p{prefix}"] = rate
    return metrics, _text_table(spec, data, member_nll, nonmember_nll, test_nll, per_sequence_mem, ref,
                                subset, train_correct, test_correct)


def _correct_tail(correct: np.ndarray) -> np.ndarray:
    """Per sequence, how many final positions the model predicts greedily: a prefix of k tokens
    extracts the sequence exactly when S - correct_tail <= k."""
    wrong = ~correct[:, ::-1]
    return np.where(wrong.any(axis=1), wrong.argmax(axis=1), correct.shape[1]).astype(np.int64)


def _text_table(spec, data, member_nll, nonmember_nll, test_nll, per_sequence_mem, ref, subset,
                train_correct, test_correct) -> pa.Table:
    """One row per sequence: split (member, nonmember, test), index in its split, nll_bits, the
    reference's nll_bits (null without a reference), mem_bits (members only), in_mia, and
    correct_tail (members scored for extraction and test rows; -1 elsewhere)."""
    N, M, T = len(data.pool), len(data.nonmembers), len(data.test)
    k = len(subset)
    in_mia = np.zeros(N, dtype=bool)
    in_mia[subset] = True
    member_tail = np.full(N, -1, dtype=np.int64)
    member_tail[subset] = _correct_tail(train_correct)
    test_tail = _correct_tail(test_correct) if test_correct is not None else np.empty(0, dtype=np.int64)
    ref_nll = (np.concatenate([ref.members, ref.nonmembers, ref.test]) if ref is not None
               else np.full(N + M + T, np.nan))
    return pa.table({
        "split": pa.array(["member"] * N + ["nonmember"] * M + ["test"] * T),
        "index": pa.array(np.concatenate([np.arange(N), np.arange(M), np.arange(T)]).astype(np.int64)),
        "nll_bits": pa.array(np.concatenate([member_nll, nonmember_nll, test_nll[:T]])),  # no test set: none
        "reference_nll_bits": pa.array(ref_nll, from_pandas=True),
        "mem_bits": pa.array(np.concatenate([per_sequence_mem, np.full(M + T, np.nan)]), from_pandas=True),
        "in_mia": pa.array(np.concatenate([in_mia, np.arange(M) < k, np.zeros(T, dtype=bool)])),
        "correct_tail": pa.array(np.concatenate([member_tail, np.full(M, -1, dtype=np.int64), test_tail])),
    })


def _train_and_measure_text(cell: Cell, device, log, progress) -> tuple[dict[str, float], pa.Table, TrainResult]:
    spec, options = cell.spec, cell.options
    data = load_text_cell_data(cell)
    ref = reference_scores(cell, data, device)

    def evaluate(model: GPT) -> dict:
        member_nll = nll_bits(model, data.pool, options.eval_batch_size)
        return {"mem_bits": float(text_mem_bits(spec, member_nll, ref).sum())}

    result = train(spec, data.pool, device=device, evaluate=evaluate,
                   checkpoints=CheckpointStore(options.storage, spec.cell_id), log=log, progress=progress)
    metrics, table = measure_text_cell(spec, result.model, data, ref, options.eval_batch_size)
    metrics.update(_train_metrics(result))
    return metrics, table, result


# -- one cell ------------------------------------------------------------------------------------------
def train_and_measure(
    cell: Cell, log=lambda metrics, step: None, progress: ProgressFn = lambda step, metrics: None
) -> tuple[dict[str, float], pa.Table, TrainResult]:
    """Train the cell (resuming from its checkpoint) and measure it; no tracking involved."""
    spec, options = cell.spec, cell.options
    device = resolve_device(options.device)
    check_supported(spec.precision, device)
    if spec.is_text:
        return _train_and_measure_text(cell, device, log, progress)
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
    metrics.update(_train_metrics(result))
    return metrics, table, result


def _open_run(cell: Cell, tracker: Tracker, parent_run_id: str | None, tags: dict | None) -> tuple[str, bool]:
    """The cell's run, found by its cell-id tag (created if new); True when it already FINISHED."""
    spec, options = cell.spec, cell.options
    run_id, finished = tracker.open_cell_run(
        options.experiment, spec.cell_id, run_name=spec.slug,
        tags={TAG_SWEEP: options.sweep, "precision": spec.precision, **options.tags},
        parent_run_id=parent_run_id,
    )
    if not finished:
        if tags:  # where this attempt runs (a retry on another node overwrites them)
            tracker.set_tags(run_id, tags)
        tracker.log_params(run_id, flatten(cell.config or to_dict(spec)))
    return run_id, finished


def _record(tracker: Tracker, run_id: str, metrics: dict, table: pa.Table, curves: MetricBuffer,
            started: float) -> None:
    """Final metrics and the per-sequence artifact, then FINISHED (in that order)."""
    curves.flush()
    final_step = int(metrics["steps"])
    tracker.log_metrics(run_id, [(k, v, final_step) for k, v in metrics.items()])
    tracker.log_table(run_id, table)
    tracker.set_tags(run_id, {"cell_wall_s": f"{time.perf_counter() - started:.1f}"})
    tracker.finish(run_id)


def _failed(tracker: Tracker, cell: Cell, run_id: str, err: BaseException) -> CellOutcome:
    error = f"{type(err).__name__}: {err}"
    trace = "".join(traceback.format_exception(err, limit=8))
    tracker.fail(run_id, f"{error}\n{trace}")
    return CellOutcome(cell.cell_id, run_id, "FAILED", error=error)


def run_cell(
    cell: Cell,
    *,
    parent_run_id: str | None = None,
    progress: ProgressFn = lambda step, metrics: None,
    tracker: Tracker | None = None,
    tags: dict | None = None,
    reference: CellOutcome | None = None,
) -> CellOutcome:
    """Train, measure and record one cell into its own MLflow run. Never raises for a failure of the
    cell itself (it is recorded FAILED); re-raises cancellation after marking the run KILLED.
    `reference` is the outcome of the cell's reference when this process waited for it: a reference
    that did not finish fails the cell without training it."""
    options = cell.options
    tracker = tracker or Tracker(options.tracking_uri, options.artifact_root)
    run_id, finished = _open_run(cell, tracker, parent_run_id, tags)
    if finished:
        return CellOutcome(cell.cell_id, run_id, "FINISHED", already_finished=True)
    try:
        if reference is not None and reference.status != "FINISHED":
            raise RuntimeError(f"reference cell {reference.cell_id} {reference.status}: {reference.error}")
        curves = MetricBuffer(tracker, run_id)
        started = time.perf_counter()
        metrics, table, _ = train_and_measure(cell, log=curves, progress=progress)
        _record(tracker, run_id, metrics, table, curves, started)
        return CellOutcome(cell.cell_id, run_id, "FINISHED", metrics)
    except (KeyboardInterrupt, SystemExit) as err:
        tracker.fail(run_id, f"cancelled: {type(err).__name__}", status="KILLED")
        raise
    except Exception as err:  # the cell failed; the sweep goes on
        return _failed(tracker, cell, run_id, err)


def run_pack(
    cells: list[Cell],
    *,
    parent_run_id: str | None = None,
    tracker: Tracker | None = None,
    tags: dict | None = None,
) -> list[CellOutcome]:
    """Train compatible cells as one pack (models.packed), then measure and record each into its own
    MLflow run, exactly as `run_cell` would: each cell resumes from its own checkpoint, a cell already
    FINISHED is skipped, and a cell that fails (its storage, its evaluation) is recorded FAILED while
    the others go on. Re-raises cancellation after marking the unfinished runs KILLED."""
    from models.packed import train_packed

    if len(cells) == 1:
        return [run_cell(cells[0], parent_run_id=parent_run_id, tracker=tracker, tags=tags)]
    options = cells[0].options
    tracker = tracker or Tracker(options.tracking_uri, options.artifact_root)
    outcomes: dict[str, CellOutcome] = {}
    todo, runs = [], {}
    for cell in cells:
        run_id, finished = _open_run(cell, tracker, parent_run_id, tags)
        runs[cell.cell_id] = run_id
        if finished:
            outcomes[cell.cell_id] = CellOutcome(cell.cell_id, run_id, "FINISHED", already_finished=True)
        else:
            todo.append(cell)
    try:
        if todo:
            device = resolve_device(options.device)
            for cell in todo:
                check_supported(cell.spec.precision, device)
            members = [synthetic_members(c.spec.data, c.spec.seed) for c in todo]
            curves = [MetricBuffer(tracker, runs[c.cell_id]) for c in todo]
            started = time.perf_counter()
            results = train_packed(
                [c.spec for c in todo], members, device=device,
                evaluates=[(lambda model, c=c, m=m: memorization_metrics(c.spec, model, m, c.options.eval_batch_size))
                           for c, m in zip(todo, members)],
                checkpoints=[CheckpointStore(c.options.storage, c.cell_id) for c in todo],
                logs=curves, isolate_errors=True,
            )
            for cell, m, curve, result in zip(todo, members, curves, results):
                run_id = runs[cell.cell_id]
                try:
                    if isinstance(result, BaseException):
                        raise result
                    metrics, table = _measured(cell, result, m)
                    _record(tracker, run_id, metrics, table, curve, started)
                    outcomes[cell.cell_id] = CellOutcome(cell.cell_id, run_id, "FINISHED", metrics)
                except Exception as err:
                    outcomes[cell.cell_id] = _failed(tracker, cell, run_id, err)
    except (KeyboardInterrupt, SystemExit) as err:
        for cell in todo:
            if cell.cell_id not in outcomes:
                tracker.fail(runs[cell.cell_id], f"cancelled: {type(err).__name__}", status="KILLED")
        raise
    except Exception as err:  # the pack itself failed: every cell not yet recorded fails with it
        for cell in todo:
            if cell.cell_id not in outcomes:
                outcomes[cell.cell_id] = _failed(tracker, cell, runs[cell.cell_id], err)
    return [outcomes[c.cell_id] for c in cells]


def _measured(cell: Cell, result: TrainResult, members: np.ndarray) -> tuple[dict, pa.Table]:
    spec = cell.spec
    nonmembers = synthetic_nonmembers(spec.data, spec.seed)
    metrics, table = measure_cell(spec, result.model, members, nonmembers, cell.options.eval_batch_size)
    metrics.update(_train_metrics(result))
    return metrics, table


def _train_metrics(result: TrainResult) -> dict:
    return {
        "steps": float(result.steps),
        "converged": float(result.converged),
        "resumed_from_step": float(result.resumed_from_step),
        "wall_s": result.wall_s,
        "tokens_per_s": result.tokens_per_s,
    }
