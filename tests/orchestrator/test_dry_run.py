"""`launch --dry-run` states a sweep's cost before anything runs (issue 15, point 4): every cell's
numbers, totals of the cells that would run (training FLOPs at the step cap and at the expected steps
in readable units, device-hours on the devices bench.gpu measured), `--format json|csv` for programs,
and no side effect: no store, no run, no file under MEMSWEEP_ROOT or the working folder."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.compose import compose_cell, load_sweep
from orchestrator.cost import (
    TABLE_BATCH,
    TABLE_DATA,
    cell_hours,
    expected_steps,
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
    tokens = cell.spec.train.steps_at_cap * TABLE_BATCH * TABLE_DATA["seq_len"]  # the trunk and its branches
    assert not extrapolated
    assert hours == pytest.approx(tokens / results["l4_d128"]["bf16"]["tokens_per_s"] / 3600, rel=1e-9)


@pytest.mark.slow
def test_the_paper_grid_states_its_totals_and_leaves_nothing_behind(memsweep_root, capsys):
    out, err = dry_run(["sweep=paper_synthetic", "cluster=ray_gpu", "--format", "json"], capsys)
    document = json.loads(out)
    cells = load_sweep(["sweep=paper_synthetic", "cluster=ray_gpu"]).cells
    assert len(document["cells"]) == document["totals"]["cells"] == document["to_run"] == len(cells) == 800
    assert document["totals"]["train_flops"] == pytest.approx(sum(train_flops(c.spec) for c in cells))
    (hours,) = [v for k, v in document["totals"]["device_hours"].items() if "H200" in k]
    assert hours == pytest.approx(sum(row["hours[NVIDIA H200]"] for row in document["cells"]))
    assert document["totals"]["extrapolated_cells"]["NVIDIA H200"] == 0  # the 16 paper shapes are measured

    _, err = dry_run(["sweep=paper_synthetic", "cluster=ray_gpu"], capsys)
    totals = document["totals"]
    assert (f"totals of the 800 cells that would run: {flops_text(totals['train_flops'])} of training at the step "
            f"cap (train.max_steps), {flops_text(totals['expected_train_flops'])} at the expected steps") in err
    expected_hours = totals["expected_device_hours"]["NVIDIA H200"]
    assert f"NVIDIA H200: {hours_text(hours)} at the cap, {hours_text(expected_hours)} expected" in err
    assert expected_hours == pytest.approx(sum(row["expected_hours[NVIDIA H200]"] for row in document["cells"]))
    assert totals["expected_train_flops"] == pytest.approx(sum(r["expected_train_flops"] for r in document["cells"]))
    assert totals["expected_train_flops"] < totals["train_flops"]  # the cells below capacity stop early
    assert document["packing"]["gpu"] == {"packs": [], "alone": 800, "too_heavy": 800, "max_cell_gflops": 16}


def test_csv_has_one_row_per_cell(memsweep_root, capsys):
    out, _ = dry_run(["sweep=smoke", "--format", "csv"], capsys)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 4 and {r["state"] for r in rows} == {"PENDING"}
    assert json.loads(rows[0]["request"])["num_cpus"] == 1.0
    assert float(rows[0]["train_flops"]) == train_flops(load_sweep(["sweep=smoke"]).cells[0].spec)


def files_under(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder`: its size and modification time (a write changes one)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.parametrize("sweep", ["smoke", "laptop"])
def test_a_dry_run_creates_nothing(sweep, memsweep_root, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = files_under(tmp_path)
    out, err = dry_run([f"sweep={sweep}"], capsys)
    assert f"sweep {sweep}:" in out and "would run" in err
    assert files_under(tmp_path) == before and not memsweep_root.exists()
    assert os.getcwd() == str(work)


def test_a_dry_run_reads_an_existing_store_without_writing_it(memsweep_root, capsys):
    from orchestrator.tracking import Tracker

    cell = load_sweep(["sweep=smoke"]).cells[0]
    Tracker(cell.options.tracking_uri).ensure_store()  # the store a first launch creates
    before = files_under(memsweep_root)
    assert before
    dry_run(["sweep=smoke"], capsys)
    assert files_under(memsweep_root) == before


def test_expected_steps_follow_the_capacity_ratio():
    """Cells under CONVERGING_RATIO of their predicted capacity stop at the first horizon past about
    CONVERGE_EPOCHS passes (train=cpu, branches: horizons 500, 1,000, ... 32,000, each branch 20% of its
    horizon), no earlier than the second horizon (the rule needs two branches); cells past it, text cells
    and cosine schedules run to the cap; wsd keeps its own floor (a cool-down triggered at the second
    evaluation)."""
    from orchestrator.cost import CONVERGE_EPOCHS, CONVERGING_RATIO

    def cell(n: int, *more: str):
        return compose_cell(["model=l1_d16", f"data.num_sequences={n}", *more]).spec

    capacity = 3.83 * cell(1).params / cell(1).data.sequence_bits  # sequences, the paper's alpha in fp32
    train = cell(2).train
    cap = 32000 + sum(round(0.2 * h) for h in (500, 1000, 2000, 4000, 8000, 16000, 32000))
    assert train.steps_at_cap == cap
    assert expected_steps(cell(2)) == 1000 + 100 + 200  # the second horizon and both branches
    below = int(CONVERGING_RATIO * capacity) - 1
    passes = -(-CONVERGE_EPOCHS * below // 64)
    horizon = next(h for h in train.horizons if h >= passes)
    assert expected_steps(cell(below)) == train.steps_through(horizon) < cap
    assert expected_steps(cell(below, "train.max_steps=700")) == 500 + 100  # the one horizon under the cap
    assert expected_steps(cell(int(CONVERGING_RATIO * capacity) + 1)) == cap
    assert expected_steps(cell(2, "train.schedule=cosine")) == 32000
    wsd = ["train.schedule=wsd", "train.eval_interval=250"]
    assert expected_steps(cell(2, *wsd)) == 600
    assert expected_steps(cell(2, *wsd[:1], "train.eval_interval=1000", "train.warmup_steps=2500")) == 3600


def test_an_adaptive_sweep_states_its_expected_rounds(memsweep_root, capsys):
    """The dry run of an adaptive sweep adds what its rules would add were every cell to measure its
    prediction under the sweep's prior alpha: here the shared sizes 64, 128, 256 leave each shape's knee
    more than sqrt(2) wide, so one cell per shape is expected in round 2."""
    from orchestrator.adaptive import expected_rounds, plan_options

    args = ["sweep=laptop_adaptive", "data.num_sequences=64,128,256"]
    out, _ = dry_run([*args, "--format", "json"], capsys)
    adaptive = json.loads(out)["adaptive"]
    cells = load_sweep(args).cells
    rounds = expected_rounds(cells, plan_options(cells), {p: 2.7 for p in ("fp32", "bf16", "amp_bf16")})
    assert adaptive["cells_per_round"] == [len(r) for r in rounds] == [6, 2]
    assert adaptive["alpha"]["fp32"] == 2.7  # the sweep's capacity_alpha, not the paper's
    assert adaptive["expected_total_train_flops"] == pytest.approx(sum(train_flops(c.spec) for r in rounds for c in r))
    _, err = dry_run(args, capsys)
    assert "adaptive: these cells are round 1" in err and "add 2 cell(s) in 1 more round(s)" in err
    assert json.loads(dry_run(["sweep=laptop", "--format", "json"], capsys)[0])["adaptive"] is None
