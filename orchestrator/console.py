"""Terminal output: progress bars and one-screen summaries (rich)."""

from __future__ import annotations

import math
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from models.spec import CellSpec

console = Console(stderr=True)


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
        task = bar.add_task(spec.slug, total=spec.train.max_steps, loss=float("nan"), mem="-")

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
    h = metrics.get("entropy_bits", spec.data.entropy_bits)
    rows = [
        ("params", _si(metrics.get("params", spec.params)), f"paper count {_si(spec.params_paper)}"),
        ("H(X)", f"{_si(h)} bits", f"{spec.data.num_sequences} x {spec.data.seq_len} tokens, V={spec.data.vocab_size}"),
        ("mem_bits", f"{_si(metrics['mem_bits'])} bits", f"predicted {_si(metrics['predicted_mem_bits'])} (paper alpha)"),
        ("mem_fraction", f"{metrics['mem_fraction']:.3f}", "of H(X)"),
        ("bits per parameter", f"{metrics['bits_per_param']:.3f}", "mem_bits / params"),
        ("MIA AUC (loss)", f"{metrics['loss_auc']:.3f}", f"balanced F1 {metrics['loss_f1']:.3f}"),
        ("test loss", f"{metrics['test_nll_bits_per_token']:.3f} bits/token", f"log2 V = {math.log2(spec.data.vocab_size):.3f}"),
        ("converged", "yes" if metrics["converged"] else "no", "capacity is a lower bound" if not metrics["converged"] else ""),
        ("steps", f"{int(metrics['steps'])}", f"resumed from {int(metrics['resumed_from_step'])}" if metrics["resumed_from_step"] else ""),
        ("wall time", f"{metrics['wall_s']:.1f} s", f"{_si(metrics['tokens_per_s'])} tokens/s"),
        ("run", run_id or "-", ""),
    ]
    for row in rows:
        table.add_row(*row)
    return table
