"""`memsweep report`: five figures whose plotted data are the table's numbers and the fitted laws, a
self-contained HTML page, failed and unfinished cells listed, and `--from` without a store."""

from __future__ import annotations

import ast
import base64
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from measure import figures
from orchestrator.cli import main
from measure.paper import reference_rows
from orchestrator.report import draw_figures, report

pytestmark = pytest.mark.slow  # uses the session's real smoke sweep (about 40 s)

FIGURE_NAMES = ("mem_vs_entropy", "capacity_vs_params", "mia", "double_descent", "mem_curves")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke_report(smoke_root, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEMSWEEP_ROOT", str(smoke_root))
        return report("smoke", [], tmp_path_factory.mktemp("report"))


def test_every_figure_is_a_real_png_embedded_in_the_html(smoke_report):
    assert set(smoke_report.figure_paths) == set(FIGURE_NAMES)
    for name, path in smoke_report.figure_paths.items():
        assert path.read_bytes().startswith(PNG), name
        assert path.stat().st_size > 10_000, name  # drawn axes, points and legends, not an empty canvas
    page = smoke_report.html_path.read_text()
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == 5
    assert sorted(base64.b64decode(u) for u in uris) == sorted(p.read_bytes() for p in smoke_report.figure_paths.values())
    assert "http://" not in page and "https://" not in page  # self-contained: nothing to fetch
    for heading in ("Capacity per model shape", "Bits per parameter", "Membership-inference scaling law",
                    "Measured against predicted", "Failed and unfinished cells", "Configuration"):
        assert heading in page
    assert "every cell FINISHED" in page
    assert "data.num_sequences" in page and "seed" in page  # the grid's axes


def test_the_plotted_data_are_the_tables_numbers_and_the_fitted_alpha(smoke_report):
    cells = smoke_report.aggregate.cells.to_pylist()
    fits = smoke_report.aggregate.fits
    alpha = fits["alpha"]["fp32"]["alpha"]
    data = smoke_report.figure_data

    (group,) = data["mem_vs_entropy"]["groups"]  # one shape, one precision
    assert sorted(zip(group["entropy_bits"], group["mem_bits"])) == sorted((c["entropy_bits"], c["mem_bits"]) for c in cells)
    assert group["alpha"] == alpha
    line_x, line_y = np.array(group["line_entropy_bits"]), np.array(group["line_predicted_bits"])
    np.testing.assert_allclose(line_y, np.minimum(alpha * cells[0]["params"], line_x))
    assert line_y.max() == pytest.approx(alpha * cells[0]["params"])  # the knee lies inside the range

    capacity = data["capacity_vs_params"]
    assert capacity["sweep"]["fp32"]["capacity_bits"] == [fits["capacity"][0]["capacity_bits"]]
    for statistic in ("slope", "mean_ratio"):  # one line per alpha statistic, each the fitted value
        line = capacity["fit_lines"]["fp32"][statistic]
        assert line["alpha"] == fits["alpha"]["fp32"][statistic]["alpha"]
        np.testing.assert_allclose(line["capacity_bits"], line["alpha"] * np.array(line["params"]))
    assert capacity["fit_lines"]["fp32"]["slope"]["alpha"] == alpha  # the alpha of predictions is the slope
    paper = reference_rows("capacity_by_precision.csv")
    assert capacity["paper_points"]["fp32"]["capacity_bits"] == [r["capacity_bits_fp32"] for r in paper]
    lines = capacity["paper_lines"]
    assert [round(lines[p][s]["alpha"], 3) for p in ("fp32", "bf16") for s in ("slope", "mean_ratio")] == \
        [3.875, 3.828, 3.602, 3.517]

    assert list(data["mia"]["kinds"]) == ["synthetic"]  # the smoke sweep has no text cells
    row = data["mia"]["kinds"]["synthetic"]
    mia = row["attacks"]["loss"]
    assert sorted(zip(mia["x"], mia["f1"], mia["auc"])) == sorted(
        (c["sequences_per_param"], c["loss_f1"], c["loss_auc"]) for c in cells)
    assert "fit_f1" not in mia  # two distinct x: no law, and the fits say why
    assert fits["mia"]["synthetic"]["loss"]["identifiable"] is False and fits["mia"]["synthetic"]["loss"]["reason"]
    assert "published" not in row  # the paper fitted its law on text: its forms sit on a text row only

    (dd,) = data["double_descent"]["groups"]
    assert sorted(zip(dd["ratio"], dd["test_nll_bits_per_token"])) == sorted(
        (c["entropy_bits"] / (alpha * c["params"]), c["test_nll_bits_per_token"]) for c in cells)
    assert data["double_descent"]["ratio_line"] == 1.0 and data["double_descent"]["log2_vocab"] == [6.0]

    curves = smoke_report.aggregate.curves.to_pylist()
    plotted = {c["label"]: c for c in data["mem_curves"]["cells"]}
    assert set(plotted) == {c["cell_id"] for c in cells}
    for cell_id, curve in plotted.items():
        points = sorted((p["step"], p["value"]) for p in curves if p["cell_id"] == cell_id and p["key"] == "mem_bits")
        assert list(zip(curve["steps"], curve["mem_bits"])) == points


def test_the_report_is_logged_to_the_launch_run(smoke_root, smoke_report):
    assert smoke_report.logged
    client = MlflowClient(f"sqlite:///{smoke_root}/mlflow.db")
    logged = {f.path for f in client.list_artifacts(smoke_report.aggregate.launch_run_id, "report")}
    assert {"report/report.html", *(f"report/{n}.png" for n in FIGURE_NAMES)} <= logged


def test_failed_running_and_pending_cells_are_listed(broken_root, tmp_path):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEMSWEEP_ROOT", str(broken_root["runs"]))
        result = report("smoke", [], tmp_path)
    page = result.html_path.read_text()
    section = page[page.index("Failed and unfinished cells (4)"):]
    for cell_id, status in [(broken_root["failed"], "FAILED"), (broken_root["running"], "RUNNING"),
                            *[(c, "PENDING") for c in broken_root["pending"]]]:
        assert re.search(rf"<td>{re.escape(cell_id)}</td><td>{status}</td>", section), cell_id
    assert "CUDA out of memory (planted by the test)" in section
    for cell_id in broken_root["finished"]:
        assert f"<td>{cell_id}</td><td>FINISHED" not in section
    # The running cell's partial curve is drawn, labelled with its state.
    labels = [c["label"] for c in result.figure_data["mem_curves"]["cells"]]
    assert f"{broken_root['running']} (RUNNING)" in labels
    assert len(result.figure_data["mem_vs_entropy"]["groups"][0]["mem_bits"]) == 4  # FINISHED cells only


def test_report_from_a_saved_table_needs_no_store(smoke_report, tmp_path, monkeypatch, capsys):
    saved = tmp_path / "saved"
    shutil.copytree(smoke_report.aggregate.out_dir, saved, ignore=shutil.ignore_patterns("report"))
    empty_root = tmp_path / "no-store"
    monkeypatch.setenv("MEMSWEEP_ROOT", str(empty_root))  # where a store would be: nothing there
    assert main(["report", "smoke", "--from", str(saved / "cells.parquet")]) == 0
    assert not empty_root.exists()  # nothing read or created a store
    page = (saved / "report" / "report.html").read_text()
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 5
    assert str(saved / "report" / "report.html") in capsys.readouterr().out
    assert main(["aggregate", "smoke", "--from", str(saved)]) == 0  # a folder holding cells.parquet works too


def test_bad_input_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEMSWEEP_ROOT", str(tmp_path / "nothing"))
    assert main(["report", "smoke", "--from", str(tmp_path / "missing.parquet")]) == 2
    assert main(["aggregate", "no_such_sweep"]) == 2
    assert main(["aggregate", "smoke"]) == 2  # no store: launch first
    assert not (tmp_path / "nothing").exists()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 3
    assert "no such file" in errors[0] and "no_such_sweep" in errors[1] and "launch it first" in errors[2]


def test_figures_of_an_empty_sweep_still_render():
    from measure.sweep import fit_sweep
    from orchestrator.aggregate import GROUPING, build_cells_table
    from orchestrator.tracking import RunRecord

    runs = [RunRecord("r1", "1", "FAILED", 1, 2, {"cell_id": "c1", "memsweep.kind": "cell", "memsweep.error": "boom"},
                      {"model.name": "l1_d16", "data.vocab_size": "64"}, {})]
    cells = build_cells_table(runs)
    for name, (fig, data) in draw_figures(cells, None, fit_sweep(cells, GROUPING)).items():
        assert fig.axes, name
        figures.close(fig)


def test_measure_figures_imports_no_framework():
    """measure/ stays free of torch, Ray, Hydra, OmegaConf, MLflow and pyarrow; figures add matplotlib."""
    tree = ast.parse(Path(figures.__file__).read_text())
    names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert names <= {"numpy", "matplotlib", "measure"} | set(sys.stdlib_module_names)
