"""A sweep's figures and a self-contained HTML report, beside the paper's published numbers.

    memsweep report SWEEP [OVERRIDES...] [--out DIR] [--from PATH]

Aggregates the sweep from its tracking store (or reads a saved cells.parquet with `--from`, no store
needed), draws the figures of measure/figures.py as PNGs (the five synthetic ones when the sweep has
synthetic cells, the three text ones when it has text cells), and writes `<out>/report/report.html`
with the figures embedded as data URIs, the fit tables, the text cells' table, the sweep's
configuration and its failed and unfinished cells. The report is also logged to the sweep's latest
launch run (not with `--from`).
Published figures: Morris et al., "How much do language models memorize?" (arXiv 2505.24832).
"""

from __future__ import annotations

import base64
import html
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from measure.metrics import EXTRACTION_PREFIXES, METRICS, SYNTHETIC, TEXT, attack_names
from measure.paper import paper_alpha, reference_rows
from measure.sweep import (
    PRECISION_ORDER,
    TEXT_SUMMARY_METRICS,
    alpha_for,
    capacity_groups,
    data_kinds,
    finished_columns,
    select_rows,
)
from orchestrator.aggregate import GROUPING, IDENTITY_SCHEMA, AggregateResult, aggregate, aggregate_from, table_metadata

PAPER_PRECISIONS = ("fp32", "bf16")  # the paper's capacity table has these two columns
FIGURES = (
    ("mem_vs_entropy", "Memorized bits against dataset entropy H(X), per model shape, with the prediction "
                       "min(alpha * params, H(X)) using the sweep's fitted alpha of each precision; grey: the "
                       "paper's sequence-length and vocabulary check (a 2-layer d128 model, 4,096 sequences)."),
    ("capacity_vs_params", "Capacity against parameters in two forms: measured (circles: the seed-averaged "
                           "maximum of mem_bits over dataset sizes, bars: seed std; hollow: lower bounds, an "
                           "unconverged plateau cell) and extrapolated (diamonds: the same maximum of the cells' "
                           "asymptotes capped at H(X), an extrapolation; bars: its 95% interval). Lines: both "
                           "measured alpha statistics per (precision, V, S, recipe) group, the slope through the "
                           "origin (solid; weights shapes by params squared) and the mean of capacity / params "
                           "(dashed), with the slope's interval as a band: shaded for a 95% CI, hatched for a range "
                           "(a bootstrap over fewer than 5 shapes); beside them the paper's 16 models and the same "
                           "two statistics computed from its table (dotted, dash-dot)."),
    ("mia", "ROC AUC and balanced F1 against training sequences per parameter, one row per data kind, with "
            "the law fitted on that kind's cells where the cells show a transition. The paper fitted its law "
            "on text: its two forms (as its Table 2 was computed, and as printed) and its GPT-2 validation "
            "(grey squares) are drawn on the text row only, converted to 64-token sequences where needed."),
    ("double_descent", "Test loss on non-members against the capacity ratio H(X) / (alpha * params); the paper "
                       "finds double descent starts where the ratio crosses 1."),
    ("mem_curves", "Memorized bits at each evaluation step, per cell; dotted lines mark each cell's H(X)."),
)
# Drawn when the sweep has text cells; seed means per pool size N of fits.json's `text` section.
TEXT_FIGURES = (
    ("text_mem_vs_num_sequences", "Text cells: unintended memorization per training sequence (bits), the mean "
                                  "over sequences of max(0, nll under the reference model - nll), against the "
                                  "pool size N; seed means, bars: seed std."),
    ("text_mia_extraction", "Text cells: membership-inference balanced F1 of the loss and reference attacks "
                            "(left), and the exact greedy extraction rate from "
                            f"{', '.join(map(str, EXTRACTION_PREFIXES[:-1]))} and {EXTRACTION_PREFIXES[-1]}-token "
                            "prefixes on training and test sequences (right), against the pool size N; seed means."),
    ("text_test_loss_vs_capacity_ratio", "Text cells: test loss against the capacity ratio H(X) / (alpha * params), "
                                         "with H(X) the training set's code length under the reference model; "
                                         "seed means per pool size. The paper finds double descent starts where "
                                         "the ratio crosses 1."),
)


# -- figure inputs from the tables ------------------------------------------------------------------------
def row_kinds(cells: pa.Table) -> list[str]:
    """Each row's data.kind; null, or no column (a table from before text cells), is synthetic."""
    if "data.kind" not in cells.column_names:
        return [SYNTHETIC] * cells.num_rows
    return [SYNTHETIC if k is None else k for k in cells.column("data.kind").to_pylist()]


def figure_kinds(cells: pa.Table) -> tuple[bool, bool]:
    """(draw the synthetic figures, draw the text figures): each when the sweep has a cell of that
    kind, whatever its state; a sweep with no cell of either (an empty one) gets the synthetic ones."""
    kinds = set(row_kinds(cells))
    return SYNTHETIC in kinds or TEXT not in kinds, TEXT in kinds


def _finished_columns(cells: pa.Table) -> dict[str, np.ndarray]:
    """The FINISHED synthetic cells' columns (the synthetic figures' cells), as the fits read them."""
    cols = finished_columns(cells, GROUPING)
    keep = data_kinds(cols) == SYNTHETIC
    return {name: values[keep] for name, values in cols.items()}


def figure_inputs(cells: pa.Table, curves: pa.Table | None, fits: dict) -> dict[str, dict]:
    """The arguments of each synthetic figure but `mia` (mia_inputs), from the cells table, the
    curves and the fits."""
    cols = _finished_columns(cells)
    alphas = fits["alpha"]
    shape_groups, ratio_groups = [], []
    for group in capacity_groups(cols, GROUPING.capacity):
        precision = group.key.get("precision.name")
        alpha = alpha_for(precision, alphas, group.key)[0]
        params = float(cols["params"][group.rows][0])
        entropy = cols["entropy_bits"][group.rows]
        shape_groups.append({"label": group.label, "precision": precision, "params": params, "alpha": alpha,
                             "entropy_bits": entropy, "mem_bits": cols["mem_bits"][group.rows]})
        ratio_groups.append({"label": group.label, "ratio": entropy / (alpha * params),
                             "test_nll_bits_per_token": cols["test_nll_bits_per_token"][group.rows]})
    vocab = cols["data.vocab_size"]
    # Precision by precision, smallest model first: colours then run along model size.
    order = sorted(range(len(shape_groups)), key=lambda i: (
        PRECISION_ORDER.index(shape_groups[i]["precision"]) if shape_groups[i]["precision"] in PRECISION_ORDER else 99,
        str(shape_groups[i]["precision"]), shape_groups[i]["params"]))
    shape_groups = [shape_groups[i] for i in order]
    ratio_groups = [ratio_groups[i] for i in order]
    seq_vocab = reference_rows("seq_len_vocab_sweep.csv")
    return {
        "mem_vs_entropy": {"groups": shape_groups, "reference": {
            "label": "paper: 2-layer d128, S and V varied (measured)",
            "entropy_bits": [r["n_samples"] * r["seq_len"] * np.log2(r["vocab_size"]) for r in seq_vocab],
            "mem_bits": [r["measured_bits"] for r in seq_vocab]}},
        "capacity_vs_params": {"models": fits["capacity"], "alphas": alphas,
                               "reference": reference_rows("capacity_by_precision.csv"),
                               "paper_alpha": {p: paper_alpha(p) for p in PAPER_PRECISIONS}},
        "double_descent": {"groups": ratio_groups,
                           "log2_vocab": sorted({float(np.log2(v)) for v in vocab if np.isfinite(v)})},
        "mem_curves": {"cells": curve_inputs(cells, curves)},
    }


def _published_inputs(cols: dict[str, np.ndarray], fits: dict) -> tuple[dict | None, str | None]:
    """What the text row needs to draw the paper's forms: the cells' sequence length and an alpha for
    the as-printed form's Capacity (that of the most common precision), or why it cannot."""
    seq_len = cols.get("data.seq_len", np.array([np.nan]))
    if not np.all(np.isfinite(seq_len)) or np.unique(seq_len).size != 1:
        return None, "sequences of several (or unknown) lengths: the paper's forms are compared in the table only"
    precisions, counts = np.unique(cols["precision.name"].astype(str), return_counts=True)
    alpha = alpha_for(str(precisions[np.argmax(counts)]), fits["alpha"])[0]
    return {"seq_len": float(seq_len[0]), "alpha": alpha}, None


def mia_inputs(cells: pa.Table, fits: dict) -> dict:
    """The `mia` figure's arguments: one row per data kind with MIA laws in fits.json, its cells and
    its laws; the paper's forms and validation beside the text row only."""
    finished = finished_columns(cells, GROUPING)
    kinds = data_kinds(finished)
    rows = []
    for kind, laws in fits["mia"].items():
        cols = select_rows(finished, kinds == kind)
        attacks = []
        for attack in attack_names(cols):
            if attack not in laws:
                continue  # never measured on this kind
            entry, f1 = laws[attack], cols[f"{attack}_f1"]
            attacks.append({"attack": attack, "x": cols["sequences_per_param"], "f1": f1,
                            "auc": cols.get(f"{attack}_auc", np.full(len(f1), np.nan)),
                            "fit": {k: entry[k] for k in ("c1", "c2", "c3")} if entry.get("identifiable") else None,
                            "reason": entry.get("reason")})
        row = {"kind": kind, "attacks": attacks, "published": None}
        if kind == TEXT:
            row["published"], row["published_note"] = _published_inputs(cols, fits)
        rows.append(row)
    validation = reference_rows("mia_validation.csv")
    return {"kinds": rows, "validation": {
        "label": "paper: GPT-2 small and XL on text (observed)",
        "x": [r["n_train_sequences"] / r["params"] for r in validation],
        "f1": [r["observed_f1"] for r in validation], "f1_std": [r["observed_f1_std"] for r in validation]}}


def curve_inputs(cells: pa.Table, curves: pa.Table | None) -> list[dict]:
    """One record per synthetic cell with a mem_bits curve, in the cells table's order."""
    if curves is None or curves.num_rows == 0:
        return []
    cells = cells.filter(pa.array([k == SYNTHETIC for k in row_kinds(cells)], type=pa.bool_()))
    entropy = dict(zip(cells.column("cell_id").to_pylist(), cells.column("entropy_bits").to_pylist()))
    status = dict(zip(cells.column("cell_id").to_pylist(), cells.column("status").to_pylist()))
    by_cell: dict[str, tuple[list, list]] = {}
    for cell_id, key, step, value in zip(*(curves.column(c).to_pylist() for c in ("cell_id", "key", "step", "value"))):
        if key == "mem_bits":
            steps, values = by_cell.setdefault(cell_id, ([], []))
            steps.append(step)
            values.append(value)
    records = []
    for cell_id in cells.column("cell_id").to_pylist():
        if cell_id in by_cell:
            steps, values = by_cell[cell_id]
            order = np.argsort(steps)
            label = cell_id if status.get(cell_id) == "FINISHED" else f"{cell_id} ({status.get(cell_id)})"
            records.append({"label": label, "steps": np.asarray(steps)[order], "mem_bits": np.asarray(values)[order],
                            "entropy_bits": entropy.get(cell_id) if entropy.get(cell_id) is not None else np.nan})
    return records


def draw_figures(cells: pa.Table, curves: pa.Table | None, fits: dict) -> dict[str, tuple]:
    """Every figure the sweep's cells call for, as name -> (Figure, plotted data): the synthetic
    figures (FIGURES) when it has synthetic cells, the text figures (TEXT_FIGURES) when it has text
    cells; `mia` (one row per data kind) in either case."""
    from measure import figures

    synthetic, text = figure_kinds(cells)
    drawn = {}
    inputs = figure_inputs(cells, curves, fits) if synthetic else {}
    if synthetic:
        drawn["mem_vs_entropy"] = figures.mem_vs_entropy(**inputs["mem_vs_entropy"])
        drawn["capacity_vs_params"] = figures.capacity_vs_params(**inputs["capacity_vs_params"])
    drawn["mia"] = figures.mia_vs_sequences_per_param(**mia_inputs(cells, fits))
    if synthetic:
        drawn["double_descent"] = figures.double_descent(**inputs["double_descent"])
        drawn["mem_curves"] = figures.mem_curves(**inputs["mem_curves"])
    if text:
        groups = fits.get("text", {}).get("groups", [])
        drawn.update({
            "text_mem_vs_num_sequences": figures.text_mem_vs_num_sequences(groups),
            "text_mia_extraction": figures.text_mia_extraction(groups),
            "text_test_loss_vs_capacity_ratio": figures.text_test_loss_vs_capacity_ratio(groups),
        })
    return drawn


# -- HTML ---------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return "-"
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.{digits - 1}e}"
        return f"{value:,.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _table(headers: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else html.escape(_fmt(c))}</td>" for c in row)
                   + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class _Raw(str):
    """Already-escaped HTML for a table cell."""


def _run_links(cells: pa.Table, meta: dict) -> dict[str, str]:
    """cell id -> its run's page when the sweep was read from a tracking server (none for a local store:
    its runs have no address until `memsweep ui` serves it)."""
    from orchestrator.links import run_url

    uri = meta.get("tracking_uri") or ""
    pairs = zip(cells.column("cell_id").to_pylist(), cells.column("run_id").to_pylist())
    return {cell_id: url for cell_id, run_id in pairs if (url := run_url(uri, run_id))}


def _linked(text: str, url: str | None):
    """`text` as a link to `url` when there is one (a table cell), else as it is."""
    return _Raw(f'<a href="{html.escape(url)}">{html.escape(text)}</a>') if url else text


def _configuration(cells: pa.Table, meta: dict) -> str:
    parts = []
    overrides = meta.get("launch_overrides")
    if overrides is not None:
        parts.append(f"<p>Latest launch: <code>memsweep launch {html.escape(' '.join(overrides))}</code>"
                     f" (run <code>{html.escape(str(meta.get('launch_run_id')))}</code>)</p>")
    varying, constant = [], []
    not_config = set(IDENTITY_SCHEMA.names) | set(METRICS) | set(meta.get("metric_columns", []))
    for name in cells.column_names:
        if name in not_config:
            continue
        values = [v for v in cells.column(name).to_pylist() if v is not None]
        distinct = list(dict.fromkeys(values))
        if len(distinct) > 1:
            shown = ", ".join(_fmt(v) for v in sorted(distinct, key=str)[:40])
            varying.append([name, str(cells.schema.field(name).type), _Raw(html.escape(shown)
                            + (f" ... ({len(distinct)} values)" if len(distinct) > 40 else ""))])
        elif distinct:
            constant.append([name, str(cells.schema.field(name).type), distinct[0]])
    parts.append("<h3>Grid axes (values that vary across cells)</h3>")
    parts.append(_table(["key", "type", "values"], varying) if varying else "<p>none</p>")
    parts.append("<details><summary>Fixed configuration (the same in every cell)</summary>"
                 + _table(["key", "type", "value"], constant) + "</details>")
    return "\n".join(parts)


def _cell_index(cells: pa.Table, links: dict[str, str]) -> str:
    """Every cell id as a link to its MLflow run (only when read from a tracking server)."""
    if not links:
        return ""
    items = ", ".join(_linked(c, links[c]) for c in cells.column("cell_id").to_pylist() if c in links)
    return f"<h2>Runs in MLflow</h2><p>{items}</p>"


def _lower_bound_reason(c: dict) -> str:
    """The capacity table's lower-bound cell: which unconverged plateau cells make it one."""
    if not c["lower_bound"]:
        return "no"
    cells = c.get("lower_bound_cells", [])
    sizes = ", ".join(f"{n:,}" for n in c.get("lower_bound_num_sequences", []))
    shown = ", ".join(cells[:4]) + (f", ... ({len(cells)} in all)" if len(cells) > 4 else "")
    return f"yes: {len(cells)} unconverged plateau cell(s) at N = {sizes} ({shown})"


def _interval_text(low, high, kind: str = "ci") -> str:
    """An interval as the tables write it: `95% CI [a, b]`, `range [a, b]` (a bootstrap over fewer than
    5 shapes), or a dash when there is none."""
    if low is None or high is None:
        return "-"
    return f"{'range' if kind == 'range' else '95% CI'} [{_fmt(low)}, {_fmt(high)}]"


def _extrapolated_capacity(c: dict) -> str:
    """The capacity table's extrapolated cell: the value and its interval, or why there is none."""
    if c.get("capacity_extrapolated_bits") is None:
        return c.get("extrapolated_reason") or "not available"
    low, high = c.get("capacity_extrapolated_ci_low"), c.get("capacity_extrapolated_ci_high")
    capped = (c.get("extrapolated_cells") or {}).get("capped_at_entropy")
    text = f"{_fmt(c['capacity_extrapolated_bits'])} {_interval_text(low, high)}"
    text += f" ({capped} cell(s) capped at H(X))" if capped else ""
    return text + (f"; {c['extrapolated_reason']}" if c.get("extrapolated_lower_bound") else "")


def _capacity_table(fits: dict) -> str:
    caps = fits["capacity"]
    parts = ["<h2>Capacity per model shape and precision</h2>", _table(
        ["group", "params", "measured capacity (bits)", "seed std (bits)", "measured bits/param", "N at max",
         "H(X) at max (bits)", "cells", "measured: lower bound", "plateau seen",
         "extrapolated capacity (bits), an extrapolation", "extrapolated bits/param",
         "fraction of asymptote (plateau cells)"],
        [[c["label"], c["params"], c["capacity_bits"], c["seed_std_bits"], c["bits_per_param"],
          c["num_sequences_at_max"], c["entropy_bits_at_max"], c["num_cells"], _lower_bound_reason(c),
          c["plateau_reached"], _extrapolated_capacity(c), c.get("bits_per_param_extrapolated"),
          c.get("fraction_of_asymptote")] for c in caps]) if caps else "<p>No finished cells: no capacity.</p>"]
    parts.append("<p>Two forms side by side. <em>Measured</em>: the maximum over dataset sizes of the seed-mean "
                 "mem_bits (each cell's last annealed branch). It is a <em>lower bound</em> when any of its cells "
                 "whose H(X) exceeds it (the plateau cells, at any N, where the maximum could lie) had not "
                 "converged: training that cell longer could raise the maximum. <em>Plateau seen</em> means at "
                 "least two dataset sizes held more bits than the capacity and memorization changed by under 5% "
                 "between the two largest; without it, more data might still raise the capacity. "
                 "<em>Extrapolated</em>: an extrapolation, not a measurement: the same maximum over the cells' "
                 "asymptotes A of a(T) = A - B T<sup>-c</sup> fitted to their annealed branches, each capped at "
                 "its H(X) (a converged cell without an extrapolable fit counts at its measured mem_bits); its "
                 "interval is the 95% percentile interval of a bootstrap that resamples each size's seeds and "
                 "draws each cell's A within its own 95% interval. An unconverged plateau cell without an "
                 "extrapolable fit (its branches still climbing) is left out, and the group's extrapolated "
                 "capacity is then a lower bound of the extrapolation; a group with no plateau cell left has none. <em>Fraction of asymptote</em>: the mean mem_bits / A "
                 "its plateau cells reached.</p>")
    return "\n".join(parts)


def _alpha_rows(key: str, a: dict) -> list[list]:
    """The alpha table's rows of one group: each statistic measured, then extrapolated."""
    rows = []
    bound = "yes: " + ", ".join(a["lower_bound_models"]) if a["lower_bound"] else "no"
    kind = a.get("interval_kind", "ci")
    extrapolated = a.get("extrapolated") or {}
    for statistic, name in (("slope", "slope through origin"), ("mean_ratio", "mean of capacity/params")):
        fit = a[statistic]
        interval = "- (one shape)" if fit["ci_low"] is None else _interval_text(fit["ci_low"], fit["ci_high"], kind)
        rows.append([key, "measured", name, fit["alpha"], interval, fit["paper"], a["n_models"], bound])
        if extrapolated.get("available"):
            e = extrapolated[statistic]
            interval = ("- (one shape)" if e["ci_low"] is None
                        else _interval_text(e["ci_low"], e["ci_high"], extrapolated.get("interval_kind", kind)))
            e_bound = ("yes: " + ", ".join(extrapolated["lower_bound_models"]) if extrapolated.get("lower_bound")
                       else "no")
            rows.append([key, "extrapolated (an extrapolation)", name, e["alpha"], interval, fit["paper"],
                         a["n_models"], e_bound])
    if not extrapolated.get("available"):
        rows.append([key, "extrapolated", "-", None, "-", None, a["n_models"],
                     extrapolated.get("reason") or "not available"])
    return rows


def _alpha_table(fits: dict) -> str:
    alphas = fits["alpha"]
    parts = ["<h2>Bits per parameter (alpha)</h2>",
             "<p>Per (precision, V, S, recipe) group, never pooling data shapes or recipes: two statistics over "
             "the group's shapes, each beside the paper's value computed the same way from its capacity table: "
             "the least-squares <em>slope through the origin</em> of capacity against params (it weights shapes "
             "by params squared, so the largest dominate; predictions and figures use the measured one) and the "
             "<em>mean of capacity / params</em> (every shape weighs the same; the paper's &ldquo;3.83 / "
             "3.51&rdquo;). Each in two forms: <em>measured</em>, over the measured capacities (a lower bound "
             "where one of them is), and <em>extrapolated</em>, over the extrapolated capacities (an "
             "extrapolation). Intervals: a two-level bootstrap that resamples shapes, then each drawn shape's "
             "seeds at every dataset size (and, extrapolated, each cell's asymptote within its interval), and "
             "retakes its capacity, so they carry the scatter between shapes and not only seed noise: a 95% "
             "percentile <em>CI</em> with at least 5 shapes, a <em>range</em> (the same percentiles, too few "
             "shapes to claim coverage) with fewer.</p>"]
    rows = [row for key, a in alphas.items() for row in _alpha_rows(key, a)]
    parts.append(_table(["group", "form", "statistic", "alpha (bits/param)", "interval (95% CI; range under 5 shapes)",
                         "paper, same statistic", "shapes", "lower bound / note"], rows) if rows else "<p>No alpha.</p>")
    parts += [f"<p>{html.escape(p)}: {html.escape(a['note'])}.</p>" for p, a in alphas.items() if a.get("note")]
    parts += [f"<p>{html.escape(p)}: {html.escape(a['interval_note'])}.</p>" for p, a in alphas.items()
              if a.get("interval_kind") == "range"]
    return "\n".join(parts)


def _prediction_table(fits: dict, links: dict[str, str]) -> str:
    prediction = fits["prediction"]
    summary = prediction["summary"]
    parts = ["<h2>Measured against predicted memorization</h2>"]
    if not summary["num_cells"]:
        return parts[0] + "<p>No finished cells.</p>"
    parts.append(f"<p>Predicted mem_bits = min(alpha * params, H(X)) with alpha the fitted measured slope of each "
                 f"cell's (precision, V, S, recipe) group; error = (measured - predicted) / predicted. Over "
                 f"{summary['num_cells']} cells: "
                 f"mean |error| {_fmt(100 * summary['mean_abs_error'], 3)}%, median "
                 f"{_fmt(100 * summary['median_abs_error'], 3)}%, max {_fmt(100 * summary['max_abs_error'], 3)}%. "
                 "Beside each cell: its noise floor (the clipped estimator on non-members scaled by N / M: what a "
                 "model that memorized nothing would still score), its exposures (steps x batch / N: how often it "
                 "saw each training sequence) and its extrapolated memorization (its asymptote capped at H(X), an "
                 "extrapolation), where it logged them.</p>")
    worst = sorted(prediction["cells"], key=lambda r: -abs(r["error"]))[:200]
    parts.append(("<details><summary>Per cell (largest errors first"
                  + (f", 200 of {len(prediction['cells'])}" if len(prediction["cells"]) > 200 else "")
                  + ")</summary>")
                 + _table(["cell", "precision", "alpha", "params", "H(X) (bits)", "H(X)/(alpha params)",
                           "measured (bits)", "noise floor (bits)", "predicted (bits)", "error (%)", "exposures",
                           "converged", "extrapolated (bits)"],
                          [[_linked(r["cell_id"], links.get(r["cell_id"])), r["precision"], r["alpha"], r["params"],
                            r["entropy_bits"], r["capacity_ratio"], r["mem_bits"], r.get("mem_bits_floor"),
                            r["predicted_mem_bits"], 100 * r["error"], r.get("exposures"),
                            None if r.get("converged") is None else bool(r["converged"]),
                            r.get("mem_bits_extrapolated")]
                           for r in worst]) + "</details>")
    return "\n".join(parts)


def _fits_tables(fits: dict, links: dict[str, str]) -> str:
    return "\n".join((_capacity_table(fits), _alpha_table(fits), _prediction_table(fits, links)))


def _mia_rows(kind: str, attack: str, entry: dict, published: dict) -> list[list]:
    """One law's row, and beside a text law the paper's two forms evaluated on the same cells."""
    span = f"{_fmt(entry['x_min'])} to {_fmt(entry['x_max'])}"
    if entry.get("identifiable"):
        rows = [[kind, attack, *(f"{_fmt(entry[c])} ± {_fmt(entry[c + '_std'])}" for c in ("c1", "c2", "c3")),
                 entry["rmse"], entry["num_cells"], span, "c1 at its bound of 10" if entry["c1_at_bound"] else ""]]
    else:
        rows = [[kind, attack, "-", "-", "-", None, entry["num_cells"], span, f"not identifiable: {entry['reason']}"]]
    if entry.get("published_skipped"):
        skipped = f"paper's forms not compared: {entry['published_skipped']}"
        rows[0][-1] = "; ".join(filter(None, (rows[0][-1], skipped)))
    unconverged = entry.get("unconverged_cells") or []
    if unconverged:
        shown = ", ".join(unconverged[:4]) + (f", ... ({len(unconverged)} in all)" if len(unconverged) > 4 else "")
        rows[0][-1] = "; ".join(filter(None, (rows[0][-1], f"{len(unconverged)} unconverged cell(s): {shown}")))
    for form, comparison in entry.get("published", {}).items():
        if form in published:
            constants = published[form]
            rows.append([kind, f"{attack}: paper {form.replace('_', ' ')}", constants["c1"], constants["c2"],
                         constants["c3"], comparison["rmse"], entry["num_cells"], span,
                         f"{constants['formula']}; {constants['note']}; x: {entry['published']['x']}"])
    return rows


def _mia_tables(fits: dict) -> str:
    rows = [row for kind, laws in fits["mia"].items() for attack, entry in laws.items()
            for row in _mia_rows(kind, attack, entry, fits["mia_published"])]
    return ("<h2>Membership-inference scaling law</h2>"
            "<p>F1 = 1/2 (1 + c1 sigmoid(c2 x + c3)), x = N / params (sequences per parameter), fitted by nonlinear "
            "least squares per data kind; &plusmn; one standard error. A law whose cells show no transition (every "
            "F1 within 0.02 of 1, or of 0.5), or none inside it (0.55 &lt; F1 &lt; 0.95: cells on the two tails "
            "bracket the step but do not fix c2), is not identifiable and has no constants. The paper fitted its law on "
            "text: its two published forms are evaluated beside the text laws only, with x in its 64-token "
            "sequences.</p>"
            + (_table(["data kind", "law", "c1", "c2", "c3", "RMSE of F1", "cells", "x range (sequences/param)",
                       "note"], rows) if rows else "<p>No MIA metrics.</p>"))


def _fade_table(fits: dict) -> str:
    """How much of the membership-inference fade is data outgrowing the model, how much training budget."""
    groups = (fits.get("mia_fade") or {}).get("groups") or []
    if not groups:
        return ""
    rows = [[g["label"], g["knee_num_sequences"], g["largest_num_sequences"], g["loss_auc_knee"],
             g["loss_auc_largest"], g["exposures_largest"], g["bits_per_sequence_knee"],
             g["bits_per_sequence_largest"], g["floor_bits_per_sequence_largest"],
             g["bits_per_sequence_at_asymptote"], g["capacity_used"], g["data_share"], g["budget_share"]]
            for g in groups]
    return ("<h2>Why membership inference fades: data or training budget</h2>"
            f"<p>{html.escape(fits['mia_fade']['definition'])}. The floor is mem_bits_floor / N: the estimator on "
            "non-members, what memorizing nothing scores.</p>"
            + _table(["group", "N at capacity", "largest N", "loss AUC at capacity", "loss AUC at largest",
                      "exposures at largest", "bits/seq at capacity", "bits/seq at largest",
                      "floor bits/seq at largest", "bits/seq at the asymptote", "capacity used", "data share",
                      "budget share"], rows))


def _text_tables(fits: dict) -> str:
    text = fits.get("text") or {"groups": [], "metrics": []}
    parts = ["<h2>Text cells</h2>",
             "<p>Seed means per model shape, precision and pool size N (fits.json's <code>text</code> section "
             "also holds the seed std). Unintended memorization is measured against the reference model; "
             "H(X) is the training set's code length under it; extraction is the fraction of sequences whose "
             "greedy continuation from the prefix matches exactly. Capacity, alpha and predictions use synthetic "
             "cells only; the text cells' MIA law is in the membership-inference table.</p>"]
    columns = [(m, METRICS[m].header) for m in TEXT_SUMMARY_METRICS if m in text["metrics"]]
    rows = []
    for group in text["groups"]:
        for j, size in enumerate(group["num_sequences"]):
            rows.append([group["label"], size, group["num_seeds"][j],
                         *(group["mean"][m][j] for m, _ in columns)])
    parts.append(_table(["group", "N (sequences)", "seeds", *(h for _, h in columns)], rows)
                 if rows else "<p>No finished text cells.</p>")
    return "\n".join(parts)


def _skipped_fits(fits: dict) -> str:
    reasons = dict.fromkeys((fits.get("skipped") or {}).values())
    return ("<h2>Capacity, alpha and predictions</h2><p>Skipped: "
            + html.escape("; ".join(reasons) or "no synthetic cells") + ".</p>")


def _problem_cells(cells: pa.Table, links: dict[str, str]) -> str:
    rows = []
    columns = {c: cells.column(c).to_pylist() for c in ("cell_id", "status", "run_id", "error")}
    for cell_id, status, run_id, error in zip(*columns.values()):
        if status != "FINISHED":
            first = (error or "").strip().splitlines()[0] if error else ""
            detail = (f"<details><summary>{html.escape(first[:300])}</summary><pre>{html.escape(error)}</pre>"
                      "</details>") if error else ""
            rows.append([_linked(cell_id, links.get(cell_id)), status, run_id, _Raw(detail)])
    if not rows:
        return "<h2>Failed and unfinished cells</h2><p>None: every cell FINISHED.</p>"
    return (f"<h2>Failed and unfinished cells ({len(rows)})</h2>"
            "<p>PENDING cells never started; `memsweep resume SWEEP` runs them and every unfinished one, "
            "`--failed` only the failed.</p>" + _table(["cell", "status", "run", "error"], rows, "problems"))


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #444; } code { background: #f5f5f5; padding: 0 0.2em; }
.problems td:nth-child(2) { font-weight: bold; color: #a00; } pre { white-space: pre-wrap; font-size: 0.8em; }
"""


def render_html(sweep: str, cells: pa.Table, fits: dict, pngs: dict[str, bytes], source: str) -> str:
    meta = table_metadata(cells)
    counts = fits["cells"]["by_status"]
    versions = sorted({v for v in cells.column("code_version").to_pylist() if v})
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in fits.get("notes", []))
    figures = "".join(
        f'<figure id="{name}"><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(pngs[name]).decode()}"><figcaption>{html.escape(caption)}</figcaption></figure>'
        for name, caption in FIGURES + TEXT_FIGURES if name in pngs)
    synthetic, text = figure_kinds(cells)
    links = _run_links(cells, meta)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>memsweep report: {html.escape(sweep)}</title>
<style>{STYLE}</style></head><body>
<h1>Sweep <code>{html.escape(sweep)}</code></h1>
<p>{fits['cells']['total']} cells: {html.escape(', '.join(f'{s.lower()} {n}' for s, n in counts.items()))}.
Source: <code>{html.escape(source)}</code>; aggregated {html.escape(str(meta.get('aggregated_at', '-')))};
report written {html.escape(time.strftime('%Y-%m-%dT%H:%M:%S%z'))}. Code versions of the cells:
{html.escape(', '.join(versions) or '-')}.</p>
{f'<ul class="notes">{notes}</ul>' if notes else ''}
<h2>Figures</h2>
{figures}
{_fits_tables(fits, links) if synthetic else _skipped_fits(fits)}
{_mia_tables(fits)}
{_fade_table(fits)}
{_text_tables(fits) if text else ''}
{_problem_cells(cells, links)}
<h2>Configuration</h2>
{_configuration(cells, meta)}
{_cell_index(cells, links)}
<p style="font-size:0.85em;color:#555">Reference points and laws: Morris et al., "How much do language models
memorize?" (arXiv 2505.24832, v3). Definitions of every number: docs/science.md in the memsweep repository.</p>
</body></html>
"""


# -- the command ----------------------------------------------------------------------------------------
@dataclass
class ReportResult:
    report_dir: Path
    html_path: Path
    figure_paths: dict[str, Path]
    figure_data: dict[str, dict]
    aggregate: AggregateResult
    logged: bool = False
    timings_s: dict[str, float] = field(default_factory=dict)


def report(
    sweep: str,
    overrides=(),
    out: str | Path | None = None,
    from_path: str | Path | None = None,
    *,
    log_to_launch: bool = True,
    curves: bool = True,
    plan: bool = True,
) -> ReportResult:
    """Aggregate `sweep` (or read `from_path` offline), draw its figures and write report.html under
    `<out>/report/`; log the report to the sweep's latest launch run when read from the store."""
    from measure.figures import close

    started = time.perf_counter()
    if from_path is not None:
        result = aggregate_from(sweep, from_path, out)
        source = str(Path(from_path).resolve())
    else:
        result = aggregate(sweep, overrides, out, curves=curves, plan=plan, log_to_launch=log_to_launch)
        source = table_metadata(result.cells).get("tracking_uri", "")
    report_dir = result.out_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    drawn = draw_figures(result.cells, result.curves, result.fits)
    pngs, paths, data = {}, {}, {}
    for name, (fig, plotted) in drawn.items():
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        close(fig)
        pngs[name], paths[name], data[name] = buffer.getvalue(), report_dir / f"{name}.png", plotted
        paths[name].write_bytes(pngs[name])
    html_path = report_dir / "report.html"
    html_path.write_text(render_html(sweep, result.cells, result.fits, pngs, source))
    logged = False
    if from_path is None and log_to_launch and result.launch_run_id:
        from orchestrator.aggregate import sweep_settings
        from orchestrator.tracking import log_to_run

        tracker = sweep_settings(sweep, overrides)[2]
        log_to_run(tracker, result.launch_run_id, {}, [html_path, *paths.values()], artifact_path="report")
        logged = True
    return ReportResult(report_dir, html_path, paths, data, result, logged,
                        {"total_s": time.perf_counter() - started, **result.timings_s})
