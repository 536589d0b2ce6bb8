"""The report and its capacity figure show capacity and alpha in both forms, measured and extrapolated,
each labelled as what it is: the extrapolated points with their intervals, the alpha interval drawn and
named a range under five shapes and a 95% CI from five, the per-cell exposures and noise floor, and an
old table's "not available". Planted tables only: no store, no Ray, no training."""

from __future__ import annotations

import html
import re

import numpy as np
import pytest

from measure import figures
from measure.sweep import fit_sweep
from orchestrator.aggregate import GROUPING, build_cells_table
from orchestrator.report import draw_figures, figure_inputs, render_html
from tests.report.test_fits import MORE_SHAPES, SHAPES, planted_sweep, with_asymptotes


def _fitted(shapes=SHAPES, asymptotes=True, **kwargs):
    runs = planted_sweep(precisions=("fp32",), seeds=(0, 1), shapes=shapes, **kwargs)
    table = build_cells_table(with_asymptotes(runs) if asymptotes else runs, metadata={"sweep": "planted", "notes": []})
    return table, fit_sweep(table, GROUPING, n_boot=100)


def _text(page: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


def _section(page: str, heading: str) -> str:
    start = page.index(heading)
    return page[start:page.index("<h2>", start + 1)]


@pytest.mark.parametrize("shapes, kind", [(SHAPES, "range"), ({**SHAPES, **MORE_SHAPES}, "ci")])
def test_the_capacity_figure_draws_both_forms_and_names_the_alpha_interval(shapes, kind):
    table, fits = _fitted(shapes)
    inputs = figure_inputs(table, None, fits)["capacity_vs_params"]
    fig, data = figures.capacity_vs_params(**inputs)
    try:
        points = data["sweep"]["fp32"]
        assert points["capacity_bits"] == [c["capacity_bits"] for c in fits["capacity"]]  # measured
        extrapolated = points["extrapolated"]
        assert extrapolated["capacity_bits"] == [c["capacity_extrapolated_bits"] for c in fits["capacity"]]
        assert extrapolated["ci_low"] == [c["capacity_extrapolated_ci_low"] for c in fits["capacity"]]
        band = data["fit_bands"]["fp32"]
        slope = fits["alpha"]["fp32"]["slope"]
        assert band["kind"] == kind
        np.testing.assert_allclose(band["low_bits"], slope["ci_low"] * np.array(band["params"]))
        labels = fig.axes[0].get_legend_handles_labels()[1]
        assert any("measured" in label and "lower bound" in label for label in labels)
        assert any("extrapolated (an extrapolation" in label for label in labels)
        assert data["extrapolated_lines"]["fp32"]["alpha"] == fits["alpha"]["fp32"]["extrapolated"]["slope"]["alpha"]
        if kind == "range":
            assert any("range [" in label and "not a 95% CI" in label for label in labels)
            assert not any("95% CI [" in label for label in labels)
        else:
            assert any("95% CI [" in label for label in labels) and not any("range [" in label for label in labels)
    finally:
        figures.close(fig)


def test_the_report_tables_give_both_forms_exposures_and_the_noise_floor():
    table, fits = _fitted()
    page = render_html("planted", table, fits, {}, "test")
    capacity = _text(_section(page, "Capacity per model shape"))
    for header in ("measured capacity (bits)", "measured: lower bound", "extrapolated capacity (bits), an extrapolation",
                   "extrapolated bits/param", "fraction of asymptote (plateau cells)"):
        assert header in capacity
    assert "yes: 4 unconverged plateau cell(s)" in capacity and "95% CI [" in capacity
    assert "an extrapolation, not a measurement" in capacity
    c = fits["capacity"][0]
    assert f"{c['capacity_extrapolated_bits']:,.0f}" in capacity
    alpha = _text(_section(page, "Bits per parameter"))
    assert "extrapolated (an extrapolation)" in alpha and "range [" in alpha and "95% CI [" not in alpha
    assert "fewer than 5 shapes (3)" in alpha
    per_cell = _text(_section(page, "Measured against predicted"))
    for header in ("measured (bits) noise floor (bits)", "exposures", "extrapolated (bits)"):
        assert header in per_cell
    assert " 12.5 " in per_cell  # the planted noise floor, beside mem_bits


def test_an_old_table_reports_the_extrapolated_form_as_not_available():
    table, fits = _fitted(asymptotes=False)
    page = render_html("planted", table, fits, {}, "test")
    assert "not available: the cells logged no asymptote" in _text(_section(page, "Capacity per model shape"))
    assert "not available: the cells logged no asymptote" in _text(_section(page, "Bits per parameter"))
    drawn = draw_figures(table, None, fits)
    try:
        data = drawn["capacity_vs_params"][1]
        assert data["sweep"]["fp32"]["extrapolated"]["capacity_bits"] == [] and data["extrapolated_lines"] == {}
    finally:
        for fig, _ in drawn.values():
            figures.close(fig)


def test_the_figures_use_each_groups_own_alpha():
    wide = planted_sweep(precisions=("fp32",), seeds=(0,))
    narrow = planted_sweep(precisions=("fp32",), seeds=(0,), alphas={"fp32": 3.0}, vocab=512, first=len(wide))
    table = build_cells_table(wide + narrow)
    fits = fit_sweep(table, GROUPING, n_boot=50)
    inputs = figure_inputs(table, None, fits)
    by_vocab = {g["label"]: g["alpha"] for g in inputs["mem_vs_entropy"]["groups"]}
    for label, alpha in by_vocab.items():
        vocab = 512 if "data.vocab_size=512" in label else 2048
        assert alpha == fits["alpha"][f"fp32 (V={vocab}, S=64)"]["alpha"]
    fig, data = figures.capacity_vs_params(**inputs["capacity_vs_params"])
    try:
        assert set(data["sweep"]) == set(data["fit_lines"]) == {"fp32 (V=2048, S=64)", "fp32 (V=512, S=64)"}
        assert all(len(points["capacity_bits"]) == 3 for points in data["sweep"].values())
    finally:
        figures.close(fig)
    page = render_html("planted", table, fits, {}, "test")
    assert "fp32 (V=512, S=64)" in _text(_section(page, "Bits per parameter"))


def test_the_golden_planted_table_exercises_both_extrapolated_branches():
    from tests.report.planted import planted_fits, planted_table

    fits = planted_fits()
    caps = {c["label"]: c for c in fits["capacity"]}
    assert caps["l2_d64 fp32"]["extrapolated_lower_bound"] and caps["l2_d64 fp32"]["extrapolated_missing_cells"]
    assert all(not c["extrapolated_lower_bound"] for label, c in caps.items() if label != "l2_d64 fp32")
    assert all(c["capacity_extrapolated_bits"] is not None for c in caps.values())
    assert fits["alpha"]["fp32"]["extrapolated"]["lower_bound"] is True
    assert fits["alpha"]["bf16"]["extrapolated"]["lower_bound"] is False
    page = _text(render_html("planted", planted_table(), fits, {}, "test"))
    assert "a lower bound of the extrapolation" in page and "extrapolated (an extrapolation)" in page
