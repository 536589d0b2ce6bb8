"""Run one cell end to end: load its data, train, score, measure, record. Used by `memsweep run` and by
every Ray worker.

    outcome = run_cell(cell)            # one cell in its own MLflow run
    outcomes = run_pack(cells)          # compatible cells trained together (models/packed.py)

The science is not here: models/ trains and scores (per-sequence code lengths in bits), measure/ turns
those scores into every final metric and the per-sequence table (measure/cell.py), and this module
hands one to the other and records the result.

A cell is idempotent: its MLflow run is found by its cell-id tag (a retry continues the same run, a
cell already FINISHED is not trained again), training resumes from the cell's latest complete
checkpoint, and the run is marked FINISHED only after its final metrics and per-sequence artifact are
recorded. A cell that raises is marked FAILED with its error; one that is cancelled is marked KILLED.

Beside its metrics a cell's run records what a user needs to read, compare and redo it: the spec's
values as params, its resolved configuration as `config.yaml` headed by the `memsweep run ...` line
that reproduces it (also the `memsweep.reproduce` tag), its dataset as a run input, where its
checkpoints are (`memsweep.checkpoint`), the launch that finished it, and for a text cell its
reference's run (linked both ways).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import time
import traceback
from dataclasses import dataclass

import numpy as np
import yaml

from measure.cell import CellShape, Measurement, ReferenceScores, Scores, dataset_mem_bits, measure_cell, training_metrics
from models.checkpoint import CheckpointStore
from models.data import mia_member_subset, synthetic_members, synthetic_nonmembers
from models.gpt import GPT
from models.precision import check_supported, resolve_device
from models.scoring import greedy_correct, nll_bits
from models.spec import Cell, CellSpec, ReferenceOptions, to_dict
from models.storage import under
from models.text import TextData, load_text_data, stored_tokenizer
from models.train import EvaluateFn, ProgressFn, TrainResult, load_trained, train
from orchestrator.corpus import REFERENCE_DESCRIPTION, REFERENCE_EXPERIMENT
from orchestrator.tracking import (
    REDACTED,
    SECRET_WORDS,
    TAG_FINISHED_BY,
    TAG_SWEEP,
    CellOutcome,
    DatasetRecord,
    MetricBuffer,
    Tracker,
    redact,
)

TAG_REPRODUCE = "memsweep.reproduce"  # the `memsweep run ...` line that gives the same cell and numbers
TAG_CHECKPOINT = "memsweep.checkpoint"  # the cell's checkpoint folder (its latest step once FINISHED)
TAG_REFERENCE_CELL = "memsweep.reference_cell_id"  # on a text cell: its reference's cell id ...
TAG_REFERENCE_RUN = "memsweep.reference_run_id"  # ... and run
TAG_REFERENCE_FOR = "memsweep.reference_for"  # on a reference run: `<this>.<cell id>` = that cell's run id
CONFIG_ARTIFACT = "config.yaml"
ADHOC_DESCRIPTION = ("Cells run one at a time by `memsweep run`: one run per cell (tag memsweep.cell_id), "
                     "named by its shape and its id's hash; config.yaml and the memsweep.reproduce tag "
                     "give the command that reproduces it.")


def cell_shape(spec: CellSpec) -> CellShape:
    """What measure/ needs to know of a cell besides its scores."""
    data = spec.data
    return CellShape(kind=data.kind, seq_len=data.seq_len, vocab_size=data.vocab_size, params=spec.params,
                     params_paper=spec.params_paper, precision=spec.precision)


# -- the data a cell trains on and is measured with ---------------------------------------------------
@dataclass(frozen=True)
class CellData:
    """A cell's sequences, (n, S) int64 tokens each, and for a text cell its reference model's scores."""

    members: np.ndarray  # the training set (a text cell's pool)
    nonmembers: np.ndarray  # fresh (synthetic) or held-out (text) sequences for membership inference
    test: np.ndarray | None = None  # text: the test split (test loss, extraction); may be empty
    reference: ReferenceScores | None = None  # text: nll_bits of the three splits under the reference


def load_cell_data(cell: Cell, device) -> CellData:
    """Generate (synthetic) or read and tokenize (text) the cell's sequences; score a text cell's
    sequences with its reference model, which was trained first in its own cell."""
    spec = cell.spec
    if not spec.is_text:
        return CellData(synthetic_members(spec.data, spec.seed), synthetic_nonmembers(spec.data, spec.seed))
    data = load_text_cell_data(cell)
    return CellData(data.pool, data.nonmembers, data.test, reference_scores(cell, data, device))


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


# -- scoring and measuring --------------------------------------------------------------------------
def evaluation(cell: Cell, data: CellData) -> EvaluateFn:
    """The evaluation training runs every `eval_interval` steps: the training set's mem_bits."""
    shape, batch = cell_shape(cell.spec), cell.options.eval_batch_size
    reference = data.reference.members if data.reference is not None else None
    return lambda model: {"mem_bits": dataset_mem_bits(shape, nll_bits(model, data.members, batch), reference)}


def score(spec: CellSpec, model: GPT, data: CellData, batch: int) -> Scores:
    """Every per-sequence score the cell's final metrics need (measure.cell.Scores), scored `batch`
    sequences at a time."""
    members, nonmembers = nll_bits(model, data.members, batch), nll_bits(model, data.nonmembers, batch)
    subset = mia_member_subset(spec.data, spec.seed)
    if not spec.is_text:
        return Scores(members, nonmembers, subset)
    has_test = len(data.test) > 0
    return Scores(members, nonmembers, subset, reference=data.reference,
                  test=nll_bits(model, data.test, batch) if has_test else None,
                  train_correct=greedy_correct(model, data.members[subset], batch),
                  test_correct=greedy_correct(model, data.test, batch) if has_test else None)


def measure_model(spec: CellSpec, model: GPT, data: CellData, batch: int) -> Measurement:
    """A model's scores on the cell's data, measured: every final metric but how it trained."""
    return measure_cell(cell_shape(spec), score(spec, model, data, batch))


def measured(cell: Cell, result: TrainResult, data: CellData) -> Measurement:
    """The trained cell's final metrics (its scores measured, then how it trained) and per-sequence table."""
    measurement = measure_model(cell.spec, result.model, data, cell.options.eval_batch_size)
    train = cell.spec.train
    measurement.metrics.update(training_metrics(result, cell.spec.data.num_sequences, train.batch_size,
                                                train.asymptote_from))
    return measurement


def train_and_measure(
    cell: Cell, log=lambda metrics, step: None, progress: ProgressFn = lambda step, metrics: None
) -> tuple[Measurement, TrainResult]:
    """Train the cell (resuming from its checkpoint) and measure it; no tracking involved."""
    spec, options = cell.spec, cell.options
    device = resolve_device(options.device)
    check_supported(spec.precision, device)
    data = load_cell_data(cell, device)
    result = train(spec, data.members, device=device, evaluate=evaluation(cell, data),
                   checkpoints=CheckpointStore(options.storage, spec.cell_id), log=log, progress=progress)
    return measured(cell, result, data), result


# -- what a run records beside its metrics ----------------------------------------------------------
def _hydra_value(value) -> str:
    """A value as Hydra's override grammar reads it back to the same type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    plain = re.fullmatch(r"[A-Za-z_/][\w./:-]*", value) and value.lower() not in ("null", "true", "false", "nan", "inf")
    return value if plain else "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def reproduce_overrides(cell: Cell) -> list[str]:
    """Overrides that compose exactly this cell's spec whatever conf/'s defaults are now: every typed
    value, so `memsweep run` with them gives the same cell id (and, on the same kind of device and
    thread count, the same numbers)."""
    spec = cell.spec
    data = {k: v for k, v in dataclasses.asdict(spec.data).items() if k not in ("kind", "tokenizer_hash")}
    sections = {"model": dataclasses.asdict(spec.model), "data": data, "train": dataclasses.asdict(spec.train)}
    if spec.is_text:
        options = cell.reference_options or ReferenceOptions()
        sections["data.reference"] = (dataclasses.asdict(options) if spec.reference is not None
                                      else {"enabled": False})
    overrides = [f"data={spec.data.kind}", f"precision={spec.precision}", f"seed={spec.seed}"]
    for section, values in sections.items():
        overrides += [f"{section}.{key}={_hydra_value(value)}" for key, value in values.items()]
    return overrides


def reproduce_command(cell: Cell) -> str:
    return "memsweep run " + " ".join(shlex.quote(o) for o in reproduce_overrides(cell))


def _redacted(node):
    """A config with secrets masked: values of secret-named keys, and passwords inside strings."""
    if isinstance(node, dict):
        return {k: REDACTED if SECRET_WORDS.search(str(k)) and v is not None else _redacted(v)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_redacted(v) for v in node]
    return redact(node) if isinstance(node, str) else node


def config_yaml(cell: Cell) -> str:
    """The run's config.yaml: the reproducing command, then the resolved configuration the cell was
    composed from (a reference cell, made without one, has its spec)."""
    body = cell.config or {"spec": to_dict(cell.spec)}
    header = (f"# memsweep cell {cell.cell_id}\n"
              "# Reproduce it (same cell id; the same numbers on the same kind of device, on one thread as\n"
              "# Ray workers train):\n"
              f"#   OMP_NUM_THREADS=1 {reproduce_command(cell)}\n"
              "# Only model, data, precision, train and seed change its numbers (its params); the rest of\n"
              "# the configuration below says where and how it ran.\n")
    return header + yaml.safe_dump(_redacted(body), sort_keys=False, default_flow_style=False)


def dataset_record(spec: CellSpec) -> DatasetRecord:
    """The cell's training data as a run input: the synthetic generator's parameters, or the corpus
    URI and the tokenizer (its hash) with the split that draws the sequences from it."""
    data = dataclasses.asdict(spec.data)
    if spec.is_text:
        source = {"uri": redact(data.pop("corpus_uri")), **{k: v for k, v in data.items() if k != "kind"}}
        name = f"{source['uri'].rstrip('/').rsplit('/', 1)[-1]}-s{spec.data.seq_len}-n{spec.data.num_sequences}"
        kind = "memsweep.corpus"
    else:
        source = {"generator": "models.data.synthetic_members", "seed": spec.seed,
                  **{k: v for k, v in data.items() if k != "kind"}}
        name = f"synthetic-v{spec.data.vocab_size}-s{spec.data.seq_len}-n{spec.data.num_sequences}-seed{spec.seed}"
        kind = "memsweep.synthetic"
    text = json.dumps(source, sort_keys=True)
    profile = {"num_sequences": spec.data.num_sequences, "seq_len": spec.data.seq_len,
               "num_tokens": spec.data.num_sequences * spec.data.seq_len}
    return DatasetRecord(name=name, digest=hashlib.sha256(text.encode()).hexdigest()[:16], source_type=kind,
                         source=text, profile=json.dumps(profile))


def _reference_run_id(cell: Cell, tracker: Tracker, reference: CellOutcome | None) -> str | None:
    """The run of a text cell's reference: the outcome this process waited for, else found by tag."""
    if reference is not None and reference.run_id:
        return reference.run_id
    runs = tracker.cell_runs(REFERENCE_EXPERIMENT, cell.spec.reference.cell_id)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    return (finished or runs)[0].info.run_id if runs else None


def _link_reference(cell: Cell, tracker: Tracker, run_id: str, reference: CellOutcome | None) -> None:
    """A text cell's run names its reference's cell and run; the reference's run gets one tag per cell
    measured against it (one key each, so cells recording at once never overwrite each other)."""
    ref_run = _reference_run_id(cell, tracker, reference)
    tags = {TAG_REFERENCE_CELL: cell.spec.reference.cell_id}
    if ref_run:
        tags[TAG_REFERENCE_RUN] = ref_run
        tracker.set_tags(ref_run, {f"{TAG_REFERENCE_FOR}.{cell.cell_id}": run_id})
    tracker.set_tags(run_id, tags)


def _describe_run(cell: Cell, tracker: Tracker, run_id: str, reference: CellOutcome | None) -> None:
    """Everything an opened run records before training: params, config.yaml, dataset, links."""
    tracker.log_params(run_id, cell.recorded_params())
    tracker.log_text(run_id, config_yaml(cell), CONFIG_ARTIFACT)
    tracker.log_dataset(run_id, dataset_record(cell.spec))
    if cell.spec.reference is not None:
        _link_reference(cell, tracker, run_id, reference)
    description = {REFERENCE_EXPERIMENT: REFERENCE_DESCRIPTION, "adhoc": ADHOC_DESCRIPTION}.get(cell.options.experiment)
    if description:  # a sweep's experiment is described by its launch
        tracker.describe(cell.options.experiment, description, replace=False)


# -- recording --------------------------------------------------------------------------------------
def _open_run(cell: Cell, tracker: Tracker, parent_run_id: str | None, tags: dict | None,
              reference: CellOutcome | None = None) -> tuple[str, bool]:
    """The cell's run, found by its cell-id tag (created if new); True when it already FINISHED."""
    options = cell.options
    run_id, finished = tracker.open_cell_run(
        options.experiment, cell.cell_id, run_name=cell.run_name,
        tags={TAG_SWEEP: options.sweep, **options.tags}, parent_run_id=parent_run_id,
    )
    if not finished:  # where this attempt runs (a retry on another node overwrites them)
        tracker.set_tags(run_id, {TAG_REPRODUCE: reproduce_command(cell),
                                  TAG_CHECKPOINT: redact(under(options.storage, cell.cell_id)), **(tags or {})})
        _describe_run(cell, tracker, run_id, reference)
    return run_id, finished


def _record(tracker: Tracker, cell: Cell, run_id: str, measurement: Measurement, curves: MetricBuffer,
            started: float, parent_run_id: str | None) -> None:
    """Final metrics, the per-sequence artifact and the final checkpoint's place, then FINISHED."""
    curves.flush()
    final_step = int(measurement.metrics["steps"])
    tracker.log_metrics(run_id, [(k, v, final_step) for k, v in measurement.metrics.items()])
    tracker.log_table(run_id, measurement.per_sequence)
    checkpoints = CheckpointStore(cell.options.storage, cell.cell_id)
    step = checkpoints.latest_step()
    where = under(cell.options.storage, cell.cell_id, *([f"step-{step:09d}"] if step is not None else []))
    tags = {"memsweep.cell_wall_s": f"{time.perf_counter() - started:.1f}", TAG_CHECKPOINT: redact(where)}
    if parent_run_id:
        tags[TAG_FINISHED_BY] = parent_run_id
    tracker.set_tags(run_id, tags)
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
    measure=None,
) -> CellOutcome:
    """Train, measure and record one cell into its own MLflow run. Never raises for a failure of the
    cell itself (it is recorded FAILED); re-raises cancellation after marking the run KILLED.
    `reference` is the outcome of the cell's reference when this process waited for it: a reference
    that did not finish fails the cell without training it. `measure` stands in for
    `train_and_measure` (same signature) where a cell's numbers are planted rather than trained: tests
    of what is built around cells, which then records them exactly as a trained cell's."""
    options = cell.options
    tracker = tracker or Tracker(options.tracking_uri, options.artifact_root)
    run_id, finished = _open_run(cell, tracker, parent_run_id, tags, reference)
    if finished:
        return CellOutcome(cell.cell_id, run_id, "FINISHED", already_finished=True)
    try:
        if reference is not None and reference.status != "FINISHED":
            raise RuntimeError(f"reference cell {reference.cell_id} {reference.status}: {reference.error}")
        curves = MetricBuffer(tracker, run_id)
        started = time.perf_counter()
        measurement, _ = (measure or train_and_measure)(cell, log=curves, progress=progress)
        _record(tracker, cell, run_id, measurement, curves, started, parent_run_id)
        return CellOutcome(cell.cell_id, run_id, "FINISHED", measurement.metrics)
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
            data = [load_cell_data(c, device) for c in todo]
            curves = [MetricBuffer(tracker, runs[c.cell_id]) for c in todo]
            started = time.perf_counter()
            results = train_packed(
                [c.spec for c in todo], [d.members for d in data], device=device,
                evaluates=[evaluation(c, d) for c, d in zip(todo, data)],
                checkpoints=[CheckpointStore(c.options.storage, c.cell_id) for c in todo],
                logs=curves, isolate_errors=True,
            )
            for cell, cell_data, curve, result in zip(todo, data, curves, results):
                run_id = runs[cell.cell_id]
                try:
                    if isinstance(result, BaseException):
                        raise result
                    measurement = measured(cell, result, cell_data)
                    _record(tracker, cell, run_id, measurement, curve, started, parent_run_id)
                    outcomes[cell.cell_id] = CellOutcome(cell.cell_id, run_id, "FINISHED", measurement.metrics)
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
