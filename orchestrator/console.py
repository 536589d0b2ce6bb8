"""Terminal output: progress bars and one-screen summaries (rich)."""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from measure.metrics import EXTRACTION_PREFIXES, extraction_name
from models.spec import CellSpec

# Progress and messages go to stderr; tables (plans, summaries, status) to stdout, so they can be piped.
# Without a terminal, a wide fixed width keeps cell ids whole in logs.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
out = Console(width=None if sys.stdout.isatty() else 200)


def _si(value: float) -> str:
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    exponent = min(4, max(0, int(math.floor(math.log10(abs(value)) / 3))))
    return f"{value / 1000 ** exponent:.3g}{['', 'K', 'M', 'G', 'T'][exponent]}"


@contextmanager
def training_progress(spec: CellSpec, enabled: bool = True):
    """A progress bar over optimizer steps; yields the `progress(step, metrics)` callback."""
    if not enabled:
        yield lambda step, metrics: None
        return
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f} bits/token  mem {task.fields[mem]}"),
        TimeElapsedColumn(), TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        train = spec.train  # the bar counts the current model's steps: under branches a branch's, then the trunk's
        last = train.horizons[-1] + train.branch_length(train.horizons[-1]) if train.schedule == "branches" else train.max_steps
        task = bar.add_task(spec.readable_slug, total=last, loss=float("nan"), mem="-")

        def update(step: int, metrics: dict) -> None:
            fields = {"loss": metrics["train_loss_bits_per_token"]}
            if "mem_bits" in metrics:
                fields["mem"] = f"{_si(metrics['mem_bits'])} bits"
            bar.update(task, completed=step, **fields)

        yield update
        bar.update(task, total=bar.tasks[0].completed)  # an early stop ends the bar where it stopped


def cell_summary(spec: CellSpec, metrics: dict, run_id: str | None, cell_id: str) -> Table:
    """The one-screen summary `memsweep run` prints."""
    table = Table(title=f"cell {cell_id}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column(style="dim")
    if spec.is_text:
        rows = _text_summary_rows(spec, metrics)
    else:
        rows = _synthetic_summary_rows(spec, metrics)
    rows += _convergence_rows(spec, metrics)
    rows += [
        ("steps", f"{int(metrics['steps'])}", f"resumed from {int(metrics['resumed_from_step'])}" if metrics["resumed_from_step"] else ""),
        ("wall time", f"{metrics['wall_s']:.1f} s", f"{_si(metrics['tokens_per_s'])} tokens/s"),
        ("run", run_id or "-", ""),
    ]
    for row in rows:
        table.add_row(*row)
    return table


def _convergence_rows(spec: CellSpec, metrics: dict) -> list[tuple]:
    """Whether the cell converged and by which rule, how often it saw its data, and (branches) the
    asymptote its annealed branches extrapolate to."""
    tol = f"{spec.train.converge_tol:g}"
    if spec.train.schedule == "branches":
        rule = f"a(T) and a(T/2), both annealed, within {tol}"
        bound = f"mem_bits is a lower bound: a(T) still moved by more than {tol} over the last doubling"
    else:
        rule, bound = f"mem_bits moved < {tol} over the last doubling after the decay", "mem_bits is a lower bound"
    rows = [("converged", "yes" if metrics["converged"] else "no", rule if metrics["converged"] else bound)]
    if "last_horizon_steps" in metrics:
        rows.append(("branches", f"{int(metrics['num_branches'])}",
                     f"the model is the branch of horizon {int(metrics['last_horizon_steps']):,} steps"))
    if "exposures" in metrics:
        rows.append(("exposures", f"{metrics['exposures']:,.1f}", "passes over each training sequence"))
    if metrics.get("mem_bits_asymptote") is not None:
        rows.append(("asymptote", f"{_si(metrics['mem_bits_asymptote'])} bits",
                     f"[{_si(metrics['mem_bits_asymptote_ci_low'])}, {_si(metrics['mem_bits_asymptote_ci_high'])}] "
                     f"an extrapolation; reached {metrics['fraction_of_asymptote']:.3f}"))
    elif "asymptote_extrapolable" in metrics:
        rows.append(("asymptote", "not extrapolable", f"needs at least 4 branches; the cell has {int(metrics.get('num_branches', 0))}"
                     if metrics.get("num_branches", 0) < 4 else "the fit's exponent sits at a bound"))
    return rows


def _text_summary_rows(spec: CellSpec, metrics: dict) -> list[tuple]:
    d = spec.data
    against = "against the reference" if spec.reference is not None else "against the uniform code"
    rows = [
        ("params", _si(metrics.get("params", spec.params)), f"paper count {_si(spec.params_paper)}"),
        ("data", f"{d.num_sequences} x {d.seq_len} tokens", f"{d.corpus_uri}, {d.tokenizer} V={d.vocab_size}"),
        ("mem_bits", f"{_si(metrics['mem_bits'])} bits", f"{metrics['mem_bits_per_sequence']:.2f} per sequence, {against}"),
        ("MIA AUC (loss)", f"{metrics['loss_auc']:.3f}", f"balanced F1 {metrics['loss_f1']:.3f}"),
    ]
    if "reference_auc" in metrics:
        rows.append(("MIA AUC (reference)", f"{metrics['reference_auc']:.3f}", f"balanced F1 {metrics['reference_f1']:.3f}"))
    rows.append(("test loss", f"{metrics['test_nll_bits_per_token']:.3f} bits/token",
                 f"train {metrics['train_nll_bits_per_token']:.3f}"))
    for k in EXTRACTION_PREFIXES:
        if extraction_name("train", k) in metrics:
            rows.append((f"extraction, {k}-token prefix", f"{metrics[extraction_name('train', k)]:.3f}",
                         f"test {metrics.get(extraction_name('test', k), float('nan')):.3f}"))
    return rows


def _synthetic_summary_rows(spec: CellSpec, metrics: dict) -> list[tuple]:
    h = metrics.get("entropy_bits", spec.data.entropy_bits)
    return [
        ("params", _si(metrics.get("params", spec.params)), f"paper count {_si(spec.params_paper)}"),
        ("H(X)", f"{_si(h)} bits", f"{spec.data.num_sequences} x {spec.data.seq_len} tokens, V={spec.data.vocab_size}"),
        ("mem_bits", f"{_si(metrics['mem_bits'])} bits", f"predicted {_si(metrics['predicted_mem_bits'])} (paper alpha)"),
        ("noise floor", f"{_si(metrics['mem_bits_floor'])} bits", "the same estimator on non-members, scaled to N"),
        ("mem_fraction", f"{metrics['mem_fraction']:.3f}", "of H(X)"),
        ("bits per parameter", f"{metrics['bits_per_param']:.3f}", "mem_bits / params"),
        ("MIA AUC (loss)", f"{metrics['loss_auc']:.3f}", f"balanced F1 {metrics['loss_f1']:.3f}"),
        ("test loss", f"{metrics['test_nll_bits_per_token']:.3f} bits/token", f"log2 V = {math.log2(spec.data.vocab_size):.3f}"),
    ]


class SweepProgress:
    """Live sweep progress: done / running / failed / pending with an ETA, and a line per finished cell
    (so logs of non-interactive runs show every result)."""

    def __init__(self, total: int):
        self.total = total
        self.counts = {"done": 0, "running": 0, "failed": 0, "pending": total}
        self.bar = Progress(
            TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(),
            TextColumn("done {task.fields[done]}  running {task.fields[running]}  "
                       "failed [red]{task.fields[failed]}[/red]  pending {task.fields[pending]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console,
        )

    def __enter__(self) -> "SweepProgress":
        self.bar.__enter__()
        self.task = self.bar.add_task("sweep", total=self.total, **self.counts)
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def update(self, done: int, failed: int, running: int, pending: int) -> None:
        self.counts = {"done": done, "running": running, "failed": failed, "pending": pending - running}
        self.bar.update(self.task, completed=done + failed, **self.counts)

    def cell_done(self, outcome, elapsed_s: float) -> None:
        if outcome.status == "FINISHED" and outcome.already_finished:
            line = f"[dim]= {outcome.cell_id} already finished"
        elif outcome.status == "FINISHED":
            m = outcome.metrics
            share = (f"({m['mem_fraction']:.2f} of H(X))" if "mem_fraction" in m  # synthetic
                     else f"({m['mem_bits_per_sequence']:.1f} per sequence)")  # text
            line = (f"[green]✓[/green] {outcome.cell_id}  mem {_si(m['mem_bits'])} bits "
                    f"{share}  AUC {m['loss_auc']:.3f}  "
                    f"{int(m['steps'])} steps{'' if m['converged'] else ' (not converged)'}")
        else:
            line = f"[red]✗ {outcome.cell_id} {outcome.status}:[/red] {escape(outcome.error or '')}"
        self.bar.console.print(line, highlight=False)


def plan_table(name: str, rows: list[dict]) -> Table:
    """`launch --dry-run`: every cell with its id, state, prediction, cost and resource request
    (`orchestrator.cost.cell_rows`)."""
    from orchestrator.cost import flops_text
    from orchestrator.resources import human_bytes

    table = Table(title=f"sweep {name}: {len(rows)} cells", title_justify="left")
    for column in ("cell id", "state", "params", "H(X) bits", "predicted mem bits", "memory", "train FLOPs",
                   "expected FLOPs (est.)", "request"):
        table.add_column(column, justify="left" if column in ("cell id", "state", "request") else "right")
    for row in rows:
        shown = ", ".join(f"{k.replace('num_', '')}={human_bytes(v) if k == 'memory' else f'{v:g}'}"
                          for k, v in row["request"].items())
        table.add_row(
            row["cell_id"], row["state"], _si(row["params"]),
            "-" if row["entropy_bits"] is None else _si(row["entropy_bits"]),
            "-" if row["predicted_mem_bits"] is None else _si(row["predicted_mem_bits"]),
            human_bytes(row["memory_bytes"]), flops_text(row["train_flops"]), flops_text(row["expected_train_flops"]),
            shown,
        )
    return table


STATES = ("FINISHED", "FAILED", "KILLED", "RUNNING", "PENDING")  # a cell's states, in `status`'s column order
STATE_COLOUR = {"FINISHED": "green", "FAILED": "red", "KILLED": "yellow", "RUNNING": "cyan", "PENDING": "dim"}
STATUS_SCHEMA = "memsweep.status/1"  # `status --json`'s layout (docs/cli.md); a change of layout bumps it


def state_counts(states) -> dict[str, int]:
    """Cells per state: the five states always (zeros included), then any other MLflow status seen."""
    counts = dict.fromkeys(STATES, 0)
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    return counts


def swept_axes(plan) -> dict[str, list[str]]:
    """Each grid key whose value differs between the sweep's cells -> its values in first-seen order
    (a key some cells lack, as after a relaunch added an axis, counts "-" for them)."""
    chosen = [dict(o.split("=", 1) for o in cell.overrides if "=" in o) for cell in plan.cells]
    keys = list(dict.fromkeys(k for c in chosen for k in c))
    values = {k: list(dict.fromkeys(c.get(k, "-") for c in chosen)) for k in keys}
    return {k: v for k, v in values.items() if len(v) > 1}


def axis_counts(plan) -> dict[str, dict[str, dict[str, int]]]:
    """axis -> value -> cells per state: the summary `status` shows instead of one row per cell."""
    axes = swept_axes(plan)
    states = {k: {v: [] for v in values} for k, values in axes.items()}
    for cell in plan.cells:
        chosen = dict(o.split("=", 1) for o in cell.overrides if "=" in o)
        for key in axes:
            states[key][chosen.get(key, "-")].append(plan.state(cell))
    return {k: {v: state_counts(s) for v, s in by_value.items()} for k, by_value in states.items()}


def axis_table(plan) -> Table:
    """`memsweep status`: cells per state for each value of each swept axis."""
    counts = axis_counts(plan)
    table = Table(title=f"sweep {plan.name}: {len(plan.cells)} cells by axis", title_justify="left")
    for column in ("axis", "value", *(s.lower() for s in STATES)):
        table.add_column(column, justify="left" if column in ("axis", "value") else "right")
    for key, by_value in counts.items():
        for i, (value, per_state) in enumerate(by_value.items()):
            table.add_row(key if i == 0 else "", value,
                          *(f"[{STATE_COLOUR[s]}]{per_state[s]}" if per_state[s] else "[dim]0" for s in STATES))
    if not counts:  # a one-cell sweep, or a grid of one value per key
        every = state_counts(plan.state(c) for c in plan.cells)
        table.add_row("(none varies)", "all", *(str(every[s]) for s in STATES))
    return table


def status_table(plan, cells=None, running: dict | None = None) -> Table:
    """`memsweep status`: each of `cells` (default: all) with its state and error, and a RUNNING
    cell's latest step and mem_bits (`running`: cell id -> (step, mem_bits))."""
    running = running or {}
    table = Table(title=f"sweep {plan.name}", title_justify="left")
    for column in ("cell id", "state", "step", "mem_bits", "run", "error"):
        table.add_column(column, justify="right" if column in ("step", "mem_bits") else "left")
    order = {state: i for i, state in enumerate(("FAILED", "KILLED", "RUNNING", "PENDING", "FINISHED"))}
    for cell in sorted(plan.cells if cells is None else cells, key=lambda c: (order.get(plan.state(c), 5), c.cell_id)):
        record = plan.records.get(cell.cell_id)
        state = plan.state(cell)
        error = (record.error or "").splitlines()[0] if record and record.error else ""
        step, mem = running.get(cell.cell_id, (None, None))
        table.add_row(cell.cell_id, f"[{STATE_COLOUR.get(state, 'white')}]{state}", "-" if step is None else str(step),
                      "-" if mem is None else _si(mem), record.run_id if record else "-", escape(error))
    return table


def status_document(plan, cells, running: dict, tracking_uri: str, urls: dict, note: str | None) -> dict:
    """`memsweep status --json` (schema STATUS_SCHEMA, documented in docs/cli.md): the sweep's counts
    over every cell, by axis, and one entry per cell of `cells` (all, or those `--state` chose).
    `urls`: "experiment" (the sweep's MLflow page or None), "browse" (where to look) and "runs"
    (run id -> page)."""
    entries = []
    for cell in cells:
        record = plan.records.get(cell.cell_id)
        step, mem = running.get(cell.cell_id, (None, None))
        run_id = record.run_id if record else None
        entries.append({"cell_id": cell.cell_id, "state": plan.state(cell), "run_id": run_id,
                        "mlflow_url": urls["runs"].get(run_id), "error": record.error if record else None,
                        "step": step, "mem_bits": mem, "stale": bool(cell.stale),
                        "overrides": dict(o.split("=", 1) for o in cell.overrides if "=" in o)})
    return {"schema": STATUS_SCHEMA, "sweep": plan.name, "tracking_uri": tracking_uri,
            "mlflow_url": urls["experiment"], "browse": urls["browse"], "total": len(plan.cells),
            "counts": state_counts(plan.state(c) for c in plan.cells), "axes": axis_counts(plan),
            "cells": entries, "note": note}
