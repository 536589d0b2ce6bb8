"""`launch --dry-run` states a sweep's cost before anything runs (issue 15, point 4): every cell's
numbers, totals of the cells that would run (training FLOPs at the step cap in readable units,
device-hours on the devices bench.gpu measured), `--format json|csv` for programs, and no side effect:
no store, no run, no file under MEMSWEEP_ROOT."""

from __future__ import annotations

import csv
import io
import json

import pytest

from orchestrator.cli import main
from orchestrator.compose import load_sweep
from orchestrator.cost import (
    TABLE_BATCH,
    TABLE_DATA,
    cell_hours,
    flops_text,
    hours_text,
    measured_throughputs,
)
from orchestrator.resources import train_flops


def dry_run(argv: list[str], capsys) -> tuple[str, str]:
    assert main(["launch", *argv, "--dry-run"]) == 0
    printed = capsys.readouterr()
    return printed.out, printed.err


def test_readable_units():
    assert flops_text(1.79e21) == "1.79 ZFLOP" and flops_text(3.82e17) == "382 PFLOP"
    assert flops_text(2.17e10) == "21.7 GFLOP" and flops_text(12) == "12 FLOP"
    assert hours_text(13361.9) == "13,362 device-hours" and hours_text(2.5) == "2.5 device-hours"
    assert hours_text(0.07) == "4.2 device-minutes" and hours_text(0.00125) == "4.5 device-seconds"


def test_device_hours_come_from_the_measured_tokens_per_second():
    """A paper cell in exactly the configuration bench.gpu measured takes batch x S tokens a step at the
    measured tokens/s: the conversion through FLOP/s gives back the measured figure."""
    (h200,) = [t for t in measured_throughputs() if "H200" in t.device]
    results = json.loads(open(h200.source).read())["sections"]["paper_shapes"]["shapes"]
    cell = load_sweep(["sweep=paper_synthetic", "cluster=ray_gpu", "model=l4_d128", "precision=bf16",
                       "data.num_sequences=1024", "seed=0"]).cells[0]
    assert (cell.spec.data.vocab_size, cell.spec.data.seq_len, cell.spec.train.batch_size) == (
        TABLE_DATA["vocab_size"], TABLE_DATA["seq_len"], TABLE_BATCH)
    hours, extrapolated = cell_hours(cell.spec, h200)
    tokens = cell.spec.train.max_steps * TABLE_BATCH * TABLE_DATA["seq_len"]
    assert not extrapolated
    assert hours == pytest.approx(tokens / results["l4_d128"]["bf16"]["tokens_per_s"] / 3600, rel=1e-9)


@pytest.mark.slow
def test_the_paper_grid_states_its_totals_and_leaves_nothing_behind(memsweep_root, capsys):
    out, err = dry_run(["sweep=paper_synthetic", "cluster=ray_gpu", "--format", "json"], capsys)
    document = json.loads(out)
    cells = load_sweep(["sweep=paper_synthetic", "cluster=ray_gpu"]).cells
    assert len(document["cells"]) == document["totals"]["cells"] == document["to_run"] == len(cells) == 1760
    assert document["totals"]["train_flops"] == pytest.approx(sum(train_flops(c.spec) for c in cells))
    (hours,) = [v for k, v in document["totals"]["device_hours"].items() if "H200" in k]
    assert hours == pytest.approx(sum(row["hours[NVIDIA H200]"] for row in document["cells"]))
    assert document["totals"]["extrapolated_cells"]["NVIDIA H200"] == 0  # the 16 paper shapes are measured

    _, err = dry_run(["sweep=paper_synthetic", "cluster=ray_gpu"], capsys)
    assert f"totals: 1,760 cells, {flops_text(document['totals']['train_flops'])} of training at the step cap" in err
    assert f"NVIDIA H200: {hours_text(hours)} one cell at a time" in err


def test_csv_has_one_row_per_cell(memsweep_root, capsys):
    out, _ = dry_run(["sweep=smoke", "--format", "csv"], capsys)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 4 and {r["state"] for r in rows} == {"PENDING"}
    assert json.loads(rows[0]["request"])["num_cpus"] == 1.0
    assert float(rows[0]["train_flops"]) == train_flops(load_sweep(["sweep=smoke"]).cells[0].spec)
