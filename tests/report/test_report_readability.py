"""The report as a reader sees it: no two curves of a panel share a colour however many cells, the
double-descent axis's labels never overlap, and cell ids link to their MLflow runs when the sweep was
read from a tracking server (never for a local store, whose runs have no address). No store, no Ray."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest

from measure import figures
from orchestrator.aggregate import METADATA_KEY
from orchestrator.report import render_html
from tests.report.planted import planted_fits, planted_table


def curves(n: int) -> list[dict]:
    steps = np.arange(0, 500, 100)
    return [{"label": f"cell{i:02d}", "steps": steps, "mem_bits": steps * (i + 1.0), "entropy_bits": 4000.0 + i}
            for i in range(n)]


@pytest.mark.parametrize("n, panels", [(1, 1), (10, 1), (11, 2), (25, 3), (60, 6)])
def test_curves_past_ten_cells_become_small_multiples_of_distinct_colours(n, panels):
    fig, data = figures.mem_curves(curves(n))
    try:
        assert len(data["panels"]) == panels and sum(map(len, data["panels"])) == n
        visible = [ax for ax in fig.axes if ax.get_visible()]
        assert len(visible) == panels
        for ax, labels in zip(visible, data["panels"]):
            lines = [line for line in ax.get_lines() if line.get_linestyle() == "-"]  # the curves, not H(X)
            colours = [line.get_color() for line in lines]
            assert len(colours) == len(labels) == len(set(colours)), colours
            assert [t.get_text() for t in ax.get_legend().get_texts()] == labels
        assert [c["label"] for c in data["cells"]] == [f"cell{i:02d}" for i in range(n)]  # every cell, in order
    finally:
        figures.close(fig)


def overlaps(boxes) -> list:
    return [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]


@pytest.mark.parametrize("ratios", [
    [0.3, 0.45, 0.7, 1.1, 1.6, 2.4],  # under a decade: matplotlib labels minor ticks and they collide
    [0.02, 0.1, 0.9, 4.0, 30.0],
    [1e-4, 1e-2, 1.0, 100.0, 1e4],  # eight decades
])
def test_the_double_descent_axis_labels_never_overlap(ratios):
    groups = [{"label": "l1_d16 fp32", "ratio": ratios, "test_nll_bits_per_token": [6.0 - r / 10 for r in ratios]}]
    fig, _ = figures.double_descent(groups, [6.0])
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        (ax,) = fig.axes
        shown = [t for t in ax.xaxis.get_ticklabels(which="both") if t.get_visible() and t.get_text()
                 and ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1]]
        assert len(shown) >= 2, [t.get_text() for t in shown]
        assert not overlaps([t.get_window_extent(renderer) for t in shown]), [t.get_text() for t in shown]
        assert all(re.fullmatch(r"[0-9.e+-]+", t.get_text()) for t in shown), [t.get_text() for t in shown]
    finally:
        figures.close(fig)


def with_uri(table: pa.Table, uri: str) -> pa.Table:
    import json

    meta = {"sweep": "planted", "notes": [], "tracking_uri": uri}
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})


@pytest.fixture(scope="module")
def planted():
    return planted_table(), planted_fits()


def test_cell_ids_link_to_their_runs_on_a_tracking_server(planted):
    table, fits = planted
    page = render_html("planted", with_uri(table, "http://alice:pw@mlflow.example.org:5000"), fits, {}, "server")
    runs = dict(zip(table.column("cell_id").to_pylist(), table.column("run_id").to_pylist()))
    failed = next(c for c, s in zip(table.column("cell_id").to_pylist(), table.column("status").to_pylist())
                  if s == "FAILED")
    for cell_id in (failed, fits["prediction"]["cells"][0]["cell_id"]):
        assert f'<a href="http://mlflow.example.org:5000/#/runs/{runs[cell_id]}">{cell_id}</a>' in page
    assert "alice" not in page and ":pw@" not in page


def test_a_local_store_gives_no_links(planted):
    table, fits = planted
    page = render_html("planted", with_uri(table, "sqlite:////tmp/x/mlflow.db"), fits, {}, "local")
    assert "<a href" not in page
