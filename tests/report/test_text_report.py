"""Text cells in `aggregate` and `report`: synthetic-only capacity, alpha and predictions (skipped with a
reason for a text-only sweep, unchanged by text rows in a mixed one), an MIA law of the text cells' own
with the paper's published forms beside it (and not beside the synthetic law), the `text` summary of
seed means, the three text figures whose plotted data are those seed means, the MIA figure's text
row, and an HTML page that embeds them, from a saved table (`--from`) with no store.

Nothing is trained: rows are RunRecords with string params, as MLflow stores them, turned into a
table by build_cells_table, the code path `aggregate` uses.
"""

from __future__ import annotations

import base64
import json
import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from measure.capacity import mia_law, published_mia_law_corrected
from measure.sweep import TEXT_SUMMARY_METRICS, fit_metrics, fit_sweep
from orchestrator.aggregate import CELLS_SCHEMA, GROUPING, aggregate_from, build_cells_table, write_aggregate
from orchestrator.cli import main
from orchestrator.report import FIGURES, TEXT_FIGURES, report
from orchestrator.tracking import RunRecord

SYNTHETIC_V, SYNTHETIC_S = 2048, 64
TEXT_V, TEXT_S = 512, 32  # a 32-token prefix is >= seq_len: extract_*_p32 is never logged
SHAPES = {"l1_d32": (1, 32), "l2_d64": (2, 64)}
PLANTED_ALPHA = 3.8
TEXT_SIZES = (64, 256, 1024, 4096)
TEXT_FIGURE_NAMES = [name for name, _ in TEXT_FIGURES]
SYNTHETIC_FIGURE_NAMES = [name for name, _ in FIGURES]
PNG = b"\x89PNG\r\n\x1a\n"


def params_of(layers, width, vocab, seq_len):
    return vocab * width + seq_len * width + layers * (12 * width * width + 13 * width) + 3 * width


def _model_params(model):
    layers, width = SHAPES[model]
    return {"model.name": model, "model.n_layer": str(layers), "model.n_head": "4", "model.n_embd": str(width)}


def synthetic_cell(i, model, size, seed, mem):
    layers, width = SHAPES[model]
    p = params_of(layers, width, SYNTHETIC_V, SYNTHETIC_S)
    entropy = size * SYNTHETIC_S * math.log2(SYNTHETIC_V)
    x = size / p
    metrics = {"params": p, "params_paper": p - width, "entropy_bits": entropy, "mem_bits": mem,
               "mem_bits_unclipped": mem, "mem_fraction": mem / entropy, "bits_per_param": mem / p,
               "predicted_mem_bits": min(PLANTED_ALPHA * p, entropy), "sequences_per_param": x,
               "converged": 1.0, "test_nll_bits_per_token": 11.0,
               "loss_f1": float(mia_law(x, 1.34, -33.14, 33.14 * 0.0337)), "loss_auc": 0.9}
    params = {**_model_params(model), "data.vocab_size": str(SYNTHETIC_V), "data.seq_len": str(SYNTHETIC_S),
              "data.num_sequences": str(size), "data.num_nonmembers": "512", "data.kind": "synthetic",
              "precision.name": "fp32", "seed": str(seed), "train.lr": "0.001"}
    return RunRecord(f"run{i}", "1", "FINISHED", i, i + 1, {"cell_id": f"syn{i}", "memsweep.kind": "cell"},
                     params, metrics)


def synthetic_runs():
    """Both shapes, 1% noise around min(alpha P, H(X)), sizes from 0.3 to 4 times the capacity."""
    rng = np.random.default_rng(0)
    runs, i = [], 0
    for model, (layers, width) in SHAPES.items():
        cap = PLANTED_ALPHA * params_of(layers, width, SYNTHETIC_V, SYNTHETIC_S)
        for factor in (0.3, 0.7, 1.5, 4.0):
            size = int(cap / (SYNTHETIC_S * math.log2(SYNTHETIC_V)) * factor)
            for seed in (0, 1):
                mem = min(cap, size * SYNTHETIC_S * math.log2(SYNTHETIC_V)) * (1 + 0.01 * rng.standard_normal())
                runs.append(synthetic_cell(i, model, size, seed, mem))
                i += 1
    return runs


def text_cell(i, model, precision, size, seed, rng, status="FINISHED"):
    """A text cell's params and final metrics as its run records them; mem_bits is far beyond any
    synthetic capacity, so a text row that leaked into a synthetic fit would move it."""
    layers, width = SHAPES[model]
    p = params_of(layers, width, TEXT_V, TEXT_S)
    per_seq = 400.0 / (1 + size / 512) * (1 + 0.1 * rng.random())  # falls as the pool grows
    entropy = size * TEXT_S * 7.0 * (1 + 0.01 * rng.random())
    f1 = 0.5 + 0.45 / (1 + size / 256) + 0.01 * rng.random()
    metrics = {
        "params": p, "params_paper": p - width, "sequences_per_param": size / p,
        "mem_bits": per_seq * size, "mem_bits_per_sequence": per_seq, "bits_per_param": per_seq * size / p,
        "entropy_bits": entropy, "capacity_ratio": entropy / ({"fp32": 3.83, "bf16": 3.51}[precision] * p),
        "train_nll_bits_per_token": 4.0 + rng.random(), "test_nll_bits_per_token": 6.0 + rng.random(),
        "nonmember_nll_bits_per_token": 6.1, "reference_train_nll_bits_per_token": 6.5,
        "reference_test_nll_bits_per_token": 6.6,
        "loss_auc": f1 + 0.02, "loss_tpr_at_1pct_fpr": 0.1, "loss_tpr_at_0p1pct_fpr": 0.01, "loss_f1": f1,
        "reference_auc": f1 + 0.04, "reference_tpr_at_1pct_fpr": 0.2, "reference_tpr_at_0p1pct_fpr": 0.05,
        "reference_f1": min(1.0, f1 + 0.03),
        "extract_train_p8": 0.8 / (1 + size / 300) * rng.random(), "extract_train_p16": 0.9 / (1 + size / 300),
        "extract_test_p8": 0.01 * rng.random(), "extract_test_p16": 0.0,
        "steps": 1000.0, "converged": 1.0, "resumed_from_step": 0.0, "wall_s": 3.0, "tokens_per_s": 1e4,
    }
    params = {**_model_params(model), "data.kind": "text", "data.num_sequences": str(size),
              "data.seq_len": str(TEXT_S), "data.vocab_size": str(TEXT_V), "data.num_nonmembers": "256",
              "data.corpus_uri": "/corpora/tiny.jsonl", "data.tokenizer": "bpe",
              "precision.name": precision, "seed": str(seed), "train.lr": "0.001"}
    return RunRecord(f"trun{i}", "1", status, i, i + 1, {"cell_id": f"text{i}", "memsweep.kind": "cell"},
                     params, metrics if status == "FINISHED" else {"mem_bits": 5.0})


def text_runs(start=1000):
    """Two shapes x fp32, bf16 x four pool sizes x three seeds (l1_d32 bf16 with two), and a failed one."""
    rng = np.random.default_rng(1)
    runs, i = [], start
    for model in SHAPES:
        for precision in ("fp32", "bf16"):
            for size in TEXT_SIZES:
                for seed in (0, 1) if (model, precision) == ("l1_d32", "bf16") else (0, 1, 2):
                    runs.append(text_cell(i, model, precision, size, seed, rng))
                    i += 1
    runs.append(text_cell(i, "l1_d32", "fp32", 64, 7, rng, status="FAILED"))  # in no mean
    return runs


def table_seed_stats(table: pa.Table) -> dict:
    """(model, precision) -> N -> metric -> (mean, sample std) over the FINISHED text rows' seeds,
    computed here from the table's rows, independently of aggregate."""
    out: dict = {}
    for row in table.to_pylist():
        if row["status"] != "FINISHED" or row["data.kind"] != "text":
            continue
        by_size = out.setdefault((row["model.name"], row["precision.name"]), {})
        seeds = by_size.setdefault(row["data.num_sequences"], [])
        seeds.append(row)
    stats = {}
    for key, by_size in out.items():
        stats[key] = {}
        for size, rows in by_size.items():
            stats[key][size] = {}
            for metric in TEXT_SUMMARY_METRICS:
                values = [r[metric] for r in rows if r.get(metric) is not None]
                if values:
                    stats[key][size][metric] = (float(np.mean(values)), float(np.std(values, ddof=1)))
    return stats


@pytest.fixture(scope="module")
def text_table():
    return build_cells_table(text_runs(), metadata={"sweep": "textsweep", "notes": []})


@pytest.fixture(scope="module")
def mixed_table():
    return build_cells_table(synthetic_runs() + text_runs(), metadata={"sweep": "mixed", "notes": []})


def test_text_metrics_arrive_as_extra_float_columns(mixed_table):
    leading = [(f.name, f.type) for f in list(mixed_table.schema)[: len(CELLS_SCHEMA)]]
    assert leading == [(f.name, f.type) for f in CELLS_SCHEMA]  # the pinned columns stay first
    rows = mixed_table.to_pylist()
    runs = {r.tags["cell_id"]: r for r in synthetic_runs() + text_runs()}
    for name in ("mem_bits_per_sequence", "capacity_ratio", "reference_f1", "extract_train_p8",
                 "extract_test_p16", "reference_test_nll_bits_per_token"):
        assert mixed_table.schema.field(name).type == pa.float64(), name
        for row in rows:
            expected = runs[row["cell_id"]].metrics.get(name)
            assert row[name] == expected, (name, row["cell_id"])  # null in synthetic rows
    assert "extract_train_p32" not in mixed_table.column_names  # never logged, never invented
    assert mixed_table.schema.field("data.corpus_uri").type == pa.string()
    assert {r["data.kind"] for r in rows} == {"synthetic", "text"}


def test_a_text_only_sweep_skips_the_synthetic_fits_and_says_why(text_table):
    fits = fit_sweep(text_table, GROUPING, n_boot=50)
    json.dumps(fits, allow_nan=False)  # fits.json is strict JSON
    assert fits["capacity"] == [] and fits["alpha"] == {} and fits["prediction"]["cells"] == []
    assert set(fits["skipped"]) == {"capacity", "alpha", "prediction"}
    for reason in (*fits["skipped"].values(), fits["prediction"]["skipped"]):
        assert "synthetic cells only" in reason and "44 FINISHED text cells" in reason
    assert any("synthetic cells only" in note for note in fits["notes"])
    assert fits["cells"]["finished"] == 44 and fits["cells"]["by_status"] == {"FAILED": 1, "FINISHED": 44}
    assert list(fits["mia"]) == ["text"]  # the text cells' own law, nothing for synthetic
    metrics = fit_metrics(fits)
    assert {k for k in metrics if not k.startswith("mia_text_")} == {"cells_total", "cells_finished"}
    assert metrics["mia_text_loss_c2"] == fits["mia"]["text"]["loss"]["c2"]


def _law(entry):
    return {k: entry[k] for k in ("identifiable", "c1", "c2", "c3", "rmse", "num_cells", "x_min", "x_max")}


def test_text_cells_get_their_own_mia_law_with_the_published_forms_beside_it(text_table):
    mia = fit_sweep(text_table, GROUPING, n_boot=10)["mia"]["text"]
    rows = [r for r in text_table.to_pylist() if r["status"] == "FINISHED"]
    x = np.array([r["sequences_per_param"] for r in rows])
    for attack in ("loss", "reference"):
        law = mia[attack]
        assert law["kind"] == "text" and law["identifiable"] is True and law["num_cells"] == 44, attack
        f1 = np.array([r[f"{attack}_f1"] for r in rows])
        assert law["rmse"] == pytest.approx(np.sqrt(np.mean((f1 - mia_law(x, law["c1"], law["c2"], law["c3"])) ** 2)))
        # S = 32, the paper's 64: x is converted through tokens per parameter, |D| = N * 32 / 64.
        published = law["published"]
        assert published["converted"] is True and "x64 = N * S / (64 * params)" in published["x"]
        sizes, params = np.array([r["data.num_sequences"] for r in rows]), np.array([r["params"] for r in rows])
        corrected = published_mia_law_corrected(sizes * TEXT_S / 64, params)
        assert published["corrected"]["rmse"] == pytest.approx(np.sqrt(np.mean((f1 - corrected) ** 2)))


def test_64_token_text_sequences_are_compared_with_the_paper_unconverted():
    rng = np.random.default_rng(4)
    runs = [text_cell(i, "l1_d32", "fp32", size, seed, rng) for i, size in enumerate(TEXT_SIZES) for seed in (0,)]
    for r in runs:
        r.params["data.seq_len"] = "64"
    law = fit_sweep(build_cells_table(runs), GROUPING, n_boot=10)["mia"]["text"]["loss"]
    f1 = np.array([r.metrics["loss_f1"] for r in runs])
    corrected = published_mia_law_corrected([r.metrics["sequences_per_param"] for r in runs], 1.0)
    assert law["published"]["converted"] is False and "64 tokens, as the paper's" in law["published"]["x"]
    assert law["published"]["corrected"]["rmse"] == pytest.approx(np.sqrt(np.mean((f1 - corrected) ** 2)))


def test_the_text_section_holds_the_tables_seed_means(text_table):
    text = fit_sweep(text_table, GROUPING, n_boot=50)["text"]
    expected = table_seed_stats(text_table)
    assert text["num_cells"] == 44
    assert text["metrics"] == [m for m in TEXT_SUMMARY_METRICS if "p32" not in m]
    assert {(g["model"], g["precision"]) for g in text["groups"]} == set(expected)
    for group in text["groups"]:
        assert group["label"] == f"{group['model']} {group['precision']}"  # one corpus: nothing else varies
        assert group["num_sequences"] == list(TEXT_SIZES)
        seeds = 2 if (group["model"], group["precision"]) == ("l1_d32", "bf16") else 3
        assert group["num_seeds"] == [seeds] * len(TEXT_SIZES)  # the failed cell is in no mean
        for metric in text["metrics"]:
            for j, size in enumerate(group["num_sequences"]):
                mean, std = expected[(group["model"], group["precision"])][size][metric]
                assert group["mean"][metric][j] == pytest.approx(mean, rel=1e-12, abs=1e-15), metric
                assert group["std"][metric][j] == pytest.approx(std, rel=1e-9, abs=1e-15), metric


def test_text_cells_of_another_corpus_or_without_a_reference_are_never_averaged_together():
    rng = np.random.default_rng(2)
    runs = []
    for k, (corpus, with_reference) in enumerate([("/corpora/tiny.jsonl", "True"), ("/corpora/other.jsonl", "True"),
                                                  ("/corpora/tiny.jsonl", "False")]):  # False: the uniform code
        for j, size in enumerate(TEXT_SIZES):
            run = text_cell(10 * k + j, "l1_d32", "fp32", size, 0, rng)
            run.params.update({"data.corpus_uri": corpus, "data.reference.enabled": with_reference})
            runs.append(run)
    groups = fit_sweep(build_cells_table(runs), GROUPING, n_boot=10)["text"]["groups"]
    assert len(groups) == 3 and all(g["num_seeds"] == [1] * 4 for g in groups)
    labels = [g["label"] for g in groups]
    assert any("data.corpus_uri=/corpora/other.jsonl" in label for label in labels)
    assert any("data.reference.enabled=False" in label for label in labels)


def test_a_mixed_sweep_fits_only_its_synthetic_rows(mixed_table):
    synthetic_only = build_cells_table(synthetic_runs())
    alone, mixed = fit_sweep(synthetic_only, GROUPING, n_boot=200), fit_sweep(mixed_table, GROUPING, n_boot=200)
    assert len(alone["capacity"]) == 2 and alone["alpha"]["fp32"]["alpha"] == pytest.approx(PLANTED_ALPHA, rel=0.03)
    assert mixed["capacity"] == alone["capacity"]
    assert mixed["alpha"] == alone["alpha"]  # the same alpha and interval, text rows or not
    assert mixed["prediction"] == alone["prediction"]
    # One law per data kind: the synthetic law is the synthetic cells' alone, the text law the text
    # cells' alone, and only the text law carries the paper's forms (it fitted on text).
    assert mixed["mia"]["synthetic"] == alone["mia"]["synthetic"] and list(alone["mia"]) == ["synthetic"]
    assert list(mixed["mia"]["synthetic"]) == ["loss"]  # the reference attack is measured on text cells alone
    assert "published" not in mixed["mia"]["synthetic"]["loss"]
    text_alone = fit_sweep(build_cells_table(text_runs()), GROUPING, n_boot=50)["mia"]["text"]
    for attack in ("loss", "reference"):
        assert _law(mixed["mia"]["text"][attack]) == _law(text_alone[attack]), attack
        assert "published" in mixed["mia"]["text"][attack]
    assert mixed["skipped"] == {} and "skipped" not in mixed["prediction"]
    assert any("44 FINISHED text cells are left out" in note for note in mixed["notes"])
    assert mixed["text"] == fit_sweep(build_cells_table(text_runs()), GROUPING, n_boot=50)["text"]
    assert alone["text"] == {**alone["text"], "num_cells": 0, "groups": []}


def _embedded(page: str) -> list[bytes]:
    return [base64.b64decode(u) for u in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_from_a_text_only_table(text_table, tmp_path, monkeypatch, capsys):
    saved = tmp_path / "saved"
    saved.mkdir()
    pq.write_table(text_table, saved / "cells.parquet")
    monkeypatch.setenv("MEMSWEEP_ROOT", str(tmp_path / "no-store"))
    assert main(["aggregate", "textsweep", "--from", str(saved)]) == 0
    assert main(["report", "textsweep", "--from", str(saved / "cells.parquet")]) == 0
    assert not (tmp_path / "no-store").exists()
    fits = json.loads((saved / "fits.json").read_text())
    assert fits["capacity"] == [] and "synthetic cells only" in fits["skipped"]["alpha"]
    folder = saved / "report"
    drawn = ["mia", *TEXT_FIGURE_NAMES]  # the MIA figure has a text row: the text cells' own law
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(f"{n}.png" for n in drawn)
    for name in drawn:
        png = (folder / f"{name}.png").read_bytes()
        assert png.startswith(PNG) and len(png) > 10_000, name  # drawn lines and legends
    page = (folder / "report.html").read_text()
    assert sorted(_embedded(page)) == sorted((folder / f"{n}.png").read_bytes() for n in drawn)
    assert "<h2>Text cells</h2>" in page and "Skipped: no FINISHED synthetic cells" in page
    assert "Membership-inference scaling law" in page and "<td>text</td><td>loss: paper corrected</td>" in page
    assert "Capacity per model shape" not in page  # no synthetic fit tables for a text-only sweep
    captured = capsys.readouterr()
    assert str(folder / "report.html") in captured.out
    summary = " ".join(captured.err.split())  # the console may wrap long lines
    assert "MIA law (text, loss): c1=" in summary and "(x converted to 64-token sequences)" in summary
    assert "MIA law (synthetic" not in summary


def test_text_figures_plot_the_tables_seed_means(text_table, tmp_path):
    saved = tmp_path / "saved"
    write_aggregate(saved, text_table, None, fit_sweep(text_table, GROUPING, n_boot=50))
    result = report("textsweep", from_path=saved)
    assert set(result.figure_paths) == {"mia", *TEXT_FIGURE_NAMES}
    expected = table_seed_stats(text_table)
    labels = {f"{m} {p}": (m, p) for m, p in expected}

    mem = {g["label"]: g for g in result.figure_data["text_mem_vs_num_sequences"]["groups"]}
    assert set(mem) == set(labels)
    for label, group in mem.items():
        stats = expected[labels[label]]
        assert group["num_sequences"] == list(TEXT_SIZES)
        mean, std = zip(*(stats[n]["mem_bits_per_sequence"] for n in TEXT_SIZES))
        assert group["mean_mem_bits_per_sequence"] == pytest.approx(list(mean))
        assert group["std_mem_bits_per_sequence"] == pytest.approx(list(std))

    mia = {g["label"]: g for g in result.figure_data["text_mia_extraction"]["groups"]}
    assert set(mia) == set(labels)
    for label, group in mia.items():
        stats = expected[labels[label]]
        assert set(group["f1"]) == {"loss", "reference"}
        for attack, curve in group["f1"].items():
            assert curve["num_sequences"] == list(TEXT_SIZES)
            assert curve["mean"] == pytest.approx([stats[n][f"{attack}_f1"][0] for n in TEXT_SIZES]), attack
        assert set(group["extraction"]) == {"train_p8", "train_p16", "test_p8", "test_p16"}  # no p32 at S=32
        for key, curve in group["extraction"].items():
            assert curve["mean"] == pytest.approx([stats[n][f"extract_{key}"][0] for n in TEXT_SIZES]), key

    loss = result.figure_data["text_test_loss_vs_capacity_ratio"]
    assert loss["ratio_line"] == 1.0
    assert {g["label"] for g in loss["groups"]} == set(labels)
    for group in loss["groups"]:
        stats = expected[labels[group["label"]]]
        points = sorted((stats[n]["capacity_ratio"][0], stats[n]["test_nll_bits_per_token"][0]) for n in TEXT_SIZES)
        assert list(zip(group["mean_capacity_ratio"], group["mean_test_nll_bits_per_token"])) == pytest.approx(points)


def test_a_mixed_report_draws_both_kinds_each_from_its_own_rows(mixed_table, tmp_path):
    saved = tmp_path / "saved"
    saved.mkdir()
    pq.write_table(mixed_table, saved / "cells.parquet")
    result = report("mixed", from_path=saved / "cells.parquet")
    assert list(result.figure_paths) == SYNTHETIC_FIGURE_NAMES + TEXT_FIGURE_NAMES
    page = result.html_path.read_text()
    assert sorted(_embedded(page)) == sorted(p.read_bytes() for p in result.figure_paths.values())
    assert "Capacity per model shape" in page and "<h2>Text cells</h2>" in page
    synthetic = [r for r in mixed_table.to_pylist() if r["data.kind"] == "synthetic"]
    plotted = [v for g in result.figure_data["mem_vs_entropy"]["groups"] for v in g["mem_bits"]]
    assert sorted(plotted) == sorted(r["mem_bits"] for r in synthetic)  # no text cell on the synthetic axes
    assert len(result.figure_data["text_mem_vs_num_sequences"]["groups"]) == 4
    assert aggregate_from("mixed", saved).fits["alpha"] == result.aggregate.fits["alpha"]
    # The MIA figure: one row per kind, each with its own cells; the paper's forms on the text row only.
    mia = result.figure_data["mia"]["kinds"]
    assert list(mia) == ["synthetic", "text"] and "published" not in mia["synthetic"]
    assert sorted(mia["synthetic"]["attacks"]["loss"]["f1"]) == sorted(r["loss_f1"] for r in synthetic)
    text = [r for r in mixed_table.to_pylist() if r["data.kind"] == "text" and r["status"] == "FINISHED"]
    assert sorted(mia["text"]["attacks"]["reference"]["f1"]) == sorted(r["reference_f1"] for r in text)
    published = mia["text"]["published"]
    assert published["seq_len"] == TEXT_S and "fit_f1" in mia["text"]["attacks"]["loss"]
    # Drawn against this sweep's x = N / params, the paper's law is read at x64 = x * S / 64.
    np.testing.assert_allclose(published["corrected_f1"],
                               published_mia_law_corrected(np.array(published["x"]) * TEXT_S / 64, 1.0))


def test_text_figures_of_a_text_sweep_with_nothing_finished_still_render(recwarn):
    from measure import figures
    from orchestrator.report import draw_figures

    rng = np.random.default_rng(3)
    cells = build_cells_table([text_cell(i, "l1_d32", "fp32", 64, i, rng, status="FAILED") for i in range(2)])
    fits = fit_sweep(cells, GROUPING, n_boot=10)
    assert fits["text"]["groups"] == [] and fits["skipped"]["alpha"] == "no FINISHED cells with mem_bits"
    drawn = draw_figures(cells, None, fits)
    assert list(drawn) == ["mia", *TEXT_FIGURE_NAMES]
    for name, (fig, data) in drawn.items():
        assert fig.axes and data == ({"kinds": {}} if name == "mia" else {**data, "groups": []}), name
        figures.close(fig)
    assert not [w for w in recwarn if "legend" in str(w.message)]
