"""The report's figures (matplotlib, Agg backend), drawn from plain arrays and records: five for
synthetic cells and three for text cells (`text_*`).

Each function takes numbers already taken from a sweep's table (orchestrator/report.py does that),
returns the matplotlib Figure and the data it plotted (a dict of float lists), so a test can check
what is on the axes rather than only that a file exists. Units follow docs/science.md: bits, parameters,
sequences per parameter, bits per token.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from measure.capacity import mia_law, published_mia_law_as_printed, published_mia_law_corrected  # noqa: E402
from measure.metrics import EXTRACTION_PREFIXES, EXTRACTION_SPLITS, extraction_name  # noqa: E402

FIGSIZE = (7.5, 5.0)  # inches; 110 dpi gives PNGs of about 800 x 550 pixels
DPI = 110
MAX_CURVES = 60  # more lines than this are unreadable: a figure draws an even subset and says so
CURVES_PER_PANEL = 10  # lines one panel tells apart by colour (matplotlib's cycle); more: small multiples
PRECISIONS = ("fp32", "bf16", "amp_bf16")  # the order precisions are drawn (and coloured) in


def _new(title: str, figsize=FIGSIZE, ncols: int = 1):
    fig, axes = plt.subplots(1, ncols, figsize=figsize, dpi=DPI, squeeze=False)
    fig.suptitle(title)
    return fig, axes[0]


def _floats(values) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float64).ravel()]


def _empty_note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _finish(fig: Figure) -> Figure:
    fig.tight_layout()
    return fig


def _log_range(values, pad: float = 1.6) -> tuple[float, float]:
    values = np.asarray([v for v in values if np.isfinite(v) and v > 0], dtype=np.float64)
    if values.size == 0:
        return 1.0, 10.0
    return float(values.min() / pad), float(values.max() * pad)


def _colors(n: int) -> list:
    """Distinct colours for n groups: matplotlib's cycle up to 10, tab20 up to 20, then viridis."""
    if n <= 10:
        return [f"C{i}" for i in range(n)]
    if n <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(n)]
    return [plt.get_cmap("viridis")(v) for v in np.linspace(0, 0.95, n)]


def _legend(fig: Figure, ax, entries: int, loc: str = "upper left") -> None:
    """Inside the axes when short; beside them, in small type and columns, when long."""
    if entries <= 10:
        ax.legend(fontsize=7, loc=loc)
        return
    ncol = int(np.ceil(entries / 32))
    width, height = fig.get_size_inches()
    fig.set_size_inches(width + 2.2 * ncol, height)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=ncol, borderaxespad=0.0)


def _readable_log_x(ax, values) -> None:
    """Plain-number labels on a log x axis that never overlap: ticks at 1, 2 and 5 per decade when the
    data span at most two decades, at powers of ten otherwise; minor ticks unlabelled (matplotlib labels
    them when the span is short, and they collide)."""
    low, high = _log_range(values, pad=1.0)
    decades = np.log10(high / low) if high > low else 0.0
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2 else (1.0,), numticks=12))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _marker_size(points: int) -> tuple[float, float]:
    """(size, alpha) of scatter markers: smaller and lighter as points multiply."""
    return (22.0, 0.9) if points <= 200 else (8.0, 0.4)


def close(fig: Figure) -> None:
    """Release a figure's memory (pyplot keeps every open figure)."""
    plt.close(fig)


# -- 1: memorization against dataset entropy -------------------------------------------------------------
def mem_vs_entropy(groups: list[dict], reference: dict | None = None) -> tuple[Figure, dict]:
    """mem_bits against H(X) per model shape, log-log, with the prediction min(alpha * params, H(X)).

    `groups`: one dict per (shape, precision) with `label`, `params`, `alpha` (bits per parameter),
    and arrays `entropy_bits` and `mem_bits` over its finished cells. `reference`: optional published
    points, a dict with `label` and arrays `entropy_bits` and `mem_bits`, drawn in grey.
    """
    fig, (ax,) = _new("Memorization against dataset entropy")
    data = {"groups": [], "reference": None}
    everything = [v for g in groups for v in list(g["entropy_bits"]) + list(g["mem_bits"])]
    if reference:
        everything += list(reference["entropy_bits"]) + list(reference["mem_bits"])
        ax.scatter(reference["entropy_bits"], reference["mem_bits"], marker="x", s=22, color="0.45",
                   label=reference["label"], zorder=2)
        data["reference"] = {"entropy_bits": _floats(reference["entropy_bits"]),
                             "mem_bits": _floats(reference["mem_bits"])}
    lo, hi = _log_range(everything + [g["alpha"] * g["params"] for g in groups])
    colors = _colors(len(groups))
    few = len(groups) <= 5  # few groups: label each prediction line with its alpha and params
    size, alpha_pts = _marker_size(sum(len(g["mem_bits"]) for g in groups))
    for i, group in enumerate(groups):
        color = colors[i]
        entropy, mem = _floats(group["entropy_bits"]), _floats(group["mem_bits"])
        ax.scatter(entropy, mem, color=color, s=size, alpha=alpha_pts, zorder=3,
                   label=f"{group['label']}" + (" (measured)" if few else f", {group['alpha']:.2f} bits/param"))
        line_x = np.geomspace(lo, hi, 200)
        knee = group["alpha"] * group["params"]
        line_x = np.sort(np.append(line_x, knee)) if lo < knee < hi else line_x
        line_y = np.minimum(group["alpha"] * group["params"], line_x)
        ax.plot(line_x, line_y, color=color, lw=1.0 if few else 0.7, ls="--",
                label=f"min({group['alpha']:.2f} bits/param x {group['params']:,.0f}, H(X))" if few else None)
        data["groups"].append({"label": group["label"], "entropy_bits": entropy, "mem_bits": mem,
                               "alpha": float(group["alpha"]), "params": float(group["params"]),
                               "line_entropy_bits": _floats(line_x), "line_predicted_bits": _floats(line_y)})
    ax.plot([lo, hi], [lo, hi], color="0.6", lw=0.8, ls=":", label="mem = H(X)")
    if not groups:
        _empty_note(ax, "no finished cells")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("dataset entropy H(X) = N * S * log2 V (bits)")
    ax.set_ylabel("memorized mem_bits (bits)")
    ax.grid(True, which="major", alpha=0.3)
    if not few:
        ax.plot([], [], color="0.3", ls="--", label="dashed: min(alpha * params, H(X)) per shape")
    _legend(fig, ax, (2 * len(groups) if few else len(groups) + 1) + 1 + bool(reference))
    return _finish(fig), data


# -- 2: capacity against parameters -------------------------------------------------------------------------
# The two alpha statistics (docs/science.md, "Alpha"), each drawn as a line alpha * params: the sweep's fit
# in a full line weight, the paper's (computed the same way from its table) thinner.
STATISTIC_LABELS = {"slope": "slope through origin", "mean_ratio": "mean of capacity/params"}
STATISTIC_STYLES = {"slope": {"fit": "-", "paper": ":"}, "mean_ratio": {"fit": "--", "paper": "-."}}


def _interval(fit: dict, kind: str = "ci") -> str:
    """An alpha's interval as the legend names it: a 95% CI, a range (fewer than 5 shapes), or none."""
    if fit.get("ci_low") is None or fit.get("ci_high") is None:
        return "no interval (one shape)"
    name = "range" if kind == "range" else "95% CI"
    return f"{name} [{fit['ci_low']:.2f}, {fit['ci_high']:.2f}]"


def _alpha_lines(ax, line_p: np.ndarray, precision: str, alphas: dict, source: str, color) -> dict:
    """One line alpha * params per statistic in `alphas` (statistic -> alpha, or -> {alpha, ci_low,
    ci_high} for the sweep's fit, whose `interval_kind` names the interval); returns the plotted data
    by statistic."""
    plotted = {}
    for statistic, label in STATISTIC_LABELS.items():
        value = alphas.get(statistic)
        if value is None:
            continue
        alpha = float(value["alpha"] if isinstance(value, dict) else value)
        text = f"{'measured fit' if source == 'fit' else source} {precision}, {label}: {alpha:.3f} bits/param"
        if isinstance(value, dict):
            text += f" {_interval(value, alphas.get('interval_kind', 'ci'))}"
        ax.plot(line_p, alpha * line_p, color=color, ls=STATISTIC_STYLES[statistic][source],
                lw=1.4 if source == "fit" else 0.9, label=text)
        plotted[statistic] = {"alpha": alpha, "params": _floats(line_p), "capacity_bits": _floats(alpha * line_p)}
    return plotted


def _alpha_band(ax, line_p: np.ndarray, key: str, entry: dict, color) -> dict | None:
    """The measured slope's interval as a band around its line: hatched and called a range when the
    bootstrap had fewer than 5 shapes, shaded and called a 95% CI otherwise; none for one shape."""
    slope = entry.get("slope") or {}
    low, high = slope.get("ci_low"), slope.get("ci_high")
    if low is None or high is None:
        return None
    kind = entry.get("interval_kind", "ci")
    if kind == "range":
        label = (f"{key}, slope: range [{low:.2f}, {high:.2f}] over {entry.get('n_models')} shapes "
                 "(not a 95% CI: under 5 shapes)")
        ax.fill_between(line_p, low * line_p, high * line_p, facecolor="none", edgecolor=color, hatch="///",
                        lw=0.0, alpha=0.35, label=label)
    else:
        label = f"{key}, slope: 95% CI [{low:.2f}, {high:.2f}]"
        ax.fill_between(line_p, low * line_p, high * line_p, color=color, alpha=0.12, lw=0.0, label=label)
    return {"kind": kind, "label": label, "params": _floats(line_p), "low_bits": _floats(low * line_p),
            "high_bits": _floats(high * line_p)}


def _sweep_points(ax, rows: list[dict], precision: str, color) -> dict:
    """The sweep's measured capacities with seed-std bars, hollow where a capacity is a lower bound;
    beside them the extrapolated capacities (diamonds) with their 95% interval bars."""
    params = _floats([m["params"] for m in rows])
    bits = _floats([m["capacity_bits"] for m in rows])
    std = _floats([m["seed_std_bits"] for m in rows])
    lower = [bool(m["lower_bound"]) for m in rows]
    for hollow, label in ((False, f"this sweep, {precision}, measured"),
                          (True, f"this sweep, {precision}, measured (an unconverged plateau cell: lower bound)")):
        chosen = [i for i, low in enumerate(lower) if low == hollow]
        if chosen:
            ax.errorbar([params[i] for i in chosen], [bits[i] for i in chosen], yerr=[std[i] for i in chosen],
                        fmt="o", mfc="none" if hollow else color, color=color, ms=6 if hollow else 5, capsize=2,
                        label=label)
    extrapolated = [m for m in rows if m.get("capacity_extrapolated_bits") is not None]
    points = {"params": _floats([m["params"] for m in extrapolated]),
              "capacity_bits": _floats([m["capacity_extrapolated_bits"] for m in extrapolated]),
              "ci_low": _floats([m.get("capacity_extrapolated_ci_low", np.nan) for m in extrapolated]),
              "ci_high": _floats([m.get("capacity_extrapolated_ci_high", np.nan) for m in extrapolated])}
    if extrapolated:
        value = np.array(points["capacity_bits"])
        below = np.nan_to_num(value - np.array(points["ci_low"]), nan=0.0).clip(min=0.0)
        above = np.nan_to_num(np.array(points["ci_high"]) - value, nan=0.0).clip(min=0.0)
        ax.errorbar(points["params"], points["capacity_bits"], yerr=[below, above], fmt="D", mfc="none", mew=1.2,
                    color=color, ms=5, capsize=3, elinewidth=0.8, alpha=0.8,
                    label=f"this sweep, {precision}, extrapolated (an extrapolation: cells' asymptotes; "
                          "bars: 95% interval)")
    return {"params": params, "capacity_bits": bits, "seed_std_bits": std, "lower_bound": lower,
            "extrapolated": points}


def capacity_vs_params(models: list[dict], alphas: dict[str, dict], reference: list[dict],
                       paper_alpha: dict[str, dict]) -> tuple[Figure, dict]:
    """Capacity against params per alpha group with a line for each fitted alpha statistic and a band
    for the slope's interval (a range under 5 shapes, a 95% CI otherwise), beside the paper's points
    and its lines for the same statistics.

    `models`: one dict per (shape, precision) with `precision`, `params`, `capacity_bits`,
    `seed_std_bits`, `lower_bound`, and optionally `alpha_key` (its alpha group: fits.json's key) and
    the extrapolated `capacity_extrapolated_bits`, `capacity_extrapolated_ci_low` / `_ci_high`.
    `alphas`: fits.json's alpha entries by key (a precision, or a group's label), whose `slope` and
    `mean_ratio` hold {alpha, ci_low, ci_high} and `interval_kind` names the interval. `reference`:
    rows of the paper's table with `params` and `capacity_bits_<precision>`. `paper_alpha`:
    precision -> {"slope": ..., "mean_ratio": ...}, the paper's alpha by each statistic
    (measure.paper.paper_alpha). The plotted data are keyed by alpha group.
    """
    fig, (ax,) = _new("Capacity against parameters")
    data = {"sweep": {}, "fit_lines": {}, "fit_bands": {}, "extrapolated_lines": {}, "paper_points": {},
            "paper_lines": {}}

    def group_of(m):
        return m.get("alpha_key") or m["precision"]

    def order(key):
        precision = alphas[key].get("precision", key) if key in alphas else next(
            m["precision"] for m in models if group_of(m) == key)
        return (PRECISIONS.index(precision) if precision in PRECISIONS else len(PRECISIONS), str(precision), key)

    keys = sorted(dict.fromkeys([group_of(m) for m in models] + list(alphas)), key=order)
    lo, hi = _log_range([m["params"] for m in models] + [r["params"] for r in reference], pad=1.5)
    line_p = np.geomspace(lo, hi, 50)
    colors = {k: f"C{i % 10}" for i, k in enumerate(keys)}
    paper_colors = {p: next((colors[k] for k in keys if (alphas.get(k) or {}).get("precision", k) == p), None)
                    for p in paper_alpha}
    spare = iter(f"C{i % 10}" for i in range(len(keys), len(keys) + len(paper_alpha)))
    for key in keys:
        rows = [m for m in models if group_of(m) == key]
        data["sweep"][key] = _sweep_points(ax, rows, key, colors[key])
        if key in alphas:
            data["fit_lines"][key] = _alpha_lines(ax, line_p, key, alphas[key], "fit", colors[key])
            band = _alpha_band(ax, line_p, key, alphas[key], colors[key])
            if band is not None:
                data["fit_bands"][key] = band
            extrapolated = alphas[key].get("extrapolated") or {}
            if extrapolated.get("available"):
                slope = extrapolated["slope"]
                ax.plot(line_p, slope["alpha"] * line_p, color=colors[key], ls=(0, (4, 1, 1, 1)), lw=0.9,
                        label=f"extrapolated {key}, slope through origin: {slope['alpha']:.3f} bits/param "
                              f"{_interval(slope, extrapolated.get('interval_kind', 'ci'))} (an extrapolation)")
                data["extrapolated_lines"][key] = {"alpha": float(slope["alpha"]), "params": _floats(line_p),
                                                   "capacity_bits": _floats(slope["alpha"] * line_p)}
    for precision, alpha in paper_alpha.items():
        column = f"capacity_bits_{precision}"
        points = [r for r in reference if r.get(column) is not None]
        color = paper_colors.get(precision) or next(spare, "0.4")
        if points:
            ax.scatter([r["params"] for r in points], [r[column] for r in points], marker="x", s=24,
                       color=color, alpha=0.6, label=f"paper, {precision} ({len(points)} models)")
            data["paper_points"][precision] = {"params": _floats([r["params"] for r in points]),
                                               "capacity_bits": _floats([r[column] for r in points])}
        data["paper_lines"][precision] = _alpha_lines(ax, line_p, precision, alpha, "paper", color)
    if not models:
        _empty_note(ax, "no capacities from this sweep")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (count)")
    ax.set_ylabel("capacity (bits): measured (circles), extrapolated (diamonds)")
    ax.grid(True, which="major", alpha=0.3)
    _legend(fig, ax, len(ax.get_legend_handles_labels()[1]))
    return _finish(fig), data


# -- 3: membership inference against sequences per parameter -------------------------------------------------
PAPER_SEQ_LEN = 64  # the paper's MIA law counts 64-token sequences: x64 = x * S / 64


def _mia_attacks(ax_auc, ax_f1, attacks: list[dict], curve_x: np.ndarray) -> dict:
    """Each attack's cells on both panels, and its fitted law on the F1 panel when it was identifiable."""
    plotted = {}
    for i, attack in enumerate(attacks):
        color, name, fit = f"C{i % 10}", attack["attack"], attack.get("fit")
        x, auc, f1 = _floats(attack["x"]), _floats(attack["auc"]), _floats(attack["f1"])
        size, alpha_pts = _marker_size(len(x))
        ax_auc.scatter(x, auc, color=color, s=size, alpha=alpha_pts, label=f"{name} attack")
        ax_f1.scatter(x, f1, color=color, s=size, alpha=alpha_pts,
                      label=f"{name} attack" + ("" if fit else f" (no law: {attack.get('reason') or 'not fitted'})"))
        entry = {"x": x, "auc": auc, "f1": f1}
        if fit:
            fitted = mia_law(curve_x, fit["c1"], fit["c2"], fit["c3"])
            ax_f1.plot(curve_x, fitted, color=color, lw=1.5,
                       label=f"fit ({name}): c1={fit['c1']:.3g}, c2={fit['c2']:.3g}, c3={fit['c3']:.3g}")
            entry["fit_x"], entry["fit_f1"] = _floats(curve_x), _floats(fitted)
        plotted[name] = entry
    return plotted


def _mia_published(ax_f1, published: dict, validation: dict | None, curve_x: np.ndarray) -> dict:
    """The paper's two forms and its GPT-2 validation on this panel's x = N / params, converted from
    its 64-token sequences: x64 = x * S / 64 (the identity when S = 64)."""
    scale = published["seq_len"] / PAPER_SEQ_LEN
    alpha = published["alpha"]
    corrected = published_mia_law_corrected(curve_x * scale, 1.0)  # |D|/P = x64
    printed = published_mia_law_as_printed(alpha, curve_x * scale)  # Capacity/|D| = alpha / x64
    converted = "" if scale == 1 else f", x converted: x64 = x * {published['seq_len']:g} / 64"
    ax_f1.plot(curve_x, corrected, color="0.3", lw=1.0, ls="--", label=f"paper, as computed (Table 2){converted}")
    ax_f1.plot(curve_x, printed, color="0.3", lw=1.0, ls=":",
               label=f"paper, as printed (Capacity = {alpha:.2f} bits/param x P)")
    plotted = {"x": _floats(curve_x), "corrected_f1": _floats(corrected), "as_printed_f1": _floats(printed),
               "alpha": float(alpha), "seq_len": float(published["seq_len"])}
    if validation:
        x = np.asarray(validation["x"], dtype=np.float64) / scale
        ax_f1.errorbar(x, validation["f1"], yerr=validation["f1_std"], fmt="s", ms=4, color="0.45", capsize=2,
                       label=validation["label"])
        plotted["validation"] = {"x": _floats(x), "f1": _floats(validation["f1"]),
                                 "f1_std": _floats(validation["f1_std"])}
    return plotted


def _mia_row(ax_auc, ax_f1, kind: dict, validation: dict | None) -> dict:
    """One data kind's row: ROC AUC (left) and balanced F1 with the laws (right)."""
    published = kind.get("published")
    xs = [v for a in kind["attacks"] for v in _floats(a["x"])]
    if published:  # wide enough to show the paper's law fall from ~1 to ~0.5 (x64 from ~0.01 to ~0.2)
        xs += [v * PAPER_SEQ_LEN / published["seq_len"] for v in (0.0337 / 3, 0.1)]
    lo, hi = _log_range(xs, pad=3.0)
    curve_x = np.geomspace(lo, hi, 300)
    plotted = {"attacks": _mia_attacks(ax_auc, ax_f1, kind["attacks"], curve_x)}
    if published:
        plotted["published"] = _mia_published(ax_f1, published, validation, curve_x)
    elif kind.get("published_note"):
        ax_f1.text(0.98, 0.02, kind["published_note"], ha="right", va="bottom", fontsize=7,
                   transform=ax_f1.transAxes, color="0.4")
    for ax, what in ((ax_auc, "ROC AUC"), (ax_f1, "balanced F1")):
        ax.axhline(0.5, color="0.7", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(0.4, 1.05)
        ax.set_xlabel("sequences per parameter N / params (sequences/param)")
        ax.set_ylabel(f"{what} (fraction; 0.5 = chance)")
        ax.grid(True, which="major", alpha=0.3)
        if kind["attacks"]:
            ax.legend(fontsize=6, loc="lower left")
        else:
            _empty_note(ax, "no finished cells")
    ax_auc.set_title(f"{kind['kind']} cells: ROC AUC", fontsize=10)
    ax_f1.set_title(f"{kind['kind']} cells: balanced F1 and the law fitted on them", fontsize=10)
    return plotted


def mia_vs_sequences_per_param(kinds: list[dict], validation: dict | None = None) -> tuple[Figure, dict]:
    """MIA ROC AUC and balanced F1 against N / params, one row per data kind, with the law fitted on
    that kind's cells; the paper's two published forms (and its GPT-2 validation on text) only where
    `published` is given: the text row, the kind the paper fitted on.

    `kinds`: one dict per data kind with `kind` (its name), `attacks` (one dict per attack with
    `attack`, arrays `x` (sequences per parameter), `auc`, `f1`, `fit` ({c1, c2, c3}, or None when
    the law is not identifiable) and `reason`), and `published`: None, or {seq_len (tokens per
    sequence of the kind's cells), alpha (bits per parameter, for the as-printed form's Capacity)};
    `published_note` says why a kind has none. `validation`: the paper's observations, a dict with
    `label` and arrays `x` (|D|/P in 64-token sequences), `f1`, `f1_std`. No kind: one empty row.
    """
    rows = kinds or [{"kind": "no", "attacks": [], "published": None}]
    fig, axes = plt.subplots(len(rows), 2, figsize=(11.0, 4.6 * len(rows)), dpi=DPI, squeeze=False)
    fig.suptitle("Membership inference against sequences per parameter")
    data = {"kinds": {}}
    for (ax_auc, ax_f1), kind in zip(axes, rows):
        plotted = _mia_row(ax_auc, ax_f1, kind, validation)
        if kinds:
            data["kinds"][kind["kind"]] = plotted
    return _finish(fig), data


# -- 4: test loss against the capacity ratio (double descent) ------------------------------------------------
def double_descent(groups: list[dict], log2_vocab: list[float]) -> tuple[Figure, dict]:
    """Test loss (bits per token) against H(X) / (alpha * params), with a line where the ratio is 1.

    `groups`: one dict per (shape, precision) with `label` and arrays `ratio` and
    `test_nll_bits_per_token`. `log2_vocab`: the distinct log2 V of the sweep (a model that learned
    nothing scores exactly that on non-members).
    """
    fig, (ax,) = _new("Test loss against capacity ratio (double descent)")
    data = {"groups": [], "ratio_line": 1.0, "log2_vocab": _floats(log2_vocab)}
    colors = _colors(len(groups))
    size, alpha_pts = _marker_size(sum(len(g["ratio"]) for g in groups))
    for i, group in enumerate(groups):
        ratio, loss = _floats(group["ratio"]), _floats(group["test_nll_bits_per_token"])
        color = colors[i]
        ax.scatter(ratio, loss, color=color, s=size * 0.7, alpha=alpha_pts * 0.8)
        # The line joins the seed means at each ratio (one ratio per dataset size).
        levels = np.unique(ratio)
        means = [float(np.mean([l for r, l in zip(ratio, loss) if r == level])) for level in levels]
        ax.plot(levels, means, color=color, lw=1.0, label=group["label"])
        data["groups"].append({"label": group["label"], "ratio": ratio, "test_nll_bits_per_token": loss,
                               "mean_ratio": _floats(levels), "mean_test_nll_bits_per_token": means})
    ax.axvline(1.0, color="k", lw=1.0, ls="--", label="H(X) = alpha * params")
    for j, level in enumerate(sorted(set(_floats(log2_vocab)))):
        ax.axhline(level, color="0.5", lw=0.8, ls=":", label="log2 V (uniform guessing)" if j == 0 else None)
    if not groups:
        _empty_note(ax, "no finished cells")
    ax.set_xscale("log")
    _readable_log_x(ax, [r for g in data["groups"] for r in g["ratio"]] + [1.0])
    ax.set_xlabel("capacity ratio H(X) / (alpha * params) (dimensionless)")
    ax.set_ylabel("test loss on non-members (bits/token); lines: seed means")
    ax.grid(True, which="major", alpha=0.3)
    _legend(fig, ax, len(groups) + 2, loc="best")
    return _finish(fig), data


# -- 5: memorization during training ------------------------------------------------------------------------
def mem_curves(cells: list[dict], max_curves: int = MAX_CURVES) -> tuple[Figure, dict]:
    """mem_bits against optimizer steps, one line per cell, with its H(X) as a dotted ceiling.

    `cells`: one dict per cell with `label`, arrays `steps` and `mem_bits`, and `entropy_bits`.
    Up to CURVES_PER_PANEL cells share one panel, each in its own colour; more are drawn as small
    multiples of that many, so no two lines of a panel share a colour. More than `max_curves` cells:
    an evenly spaced subset is drawn and the title says so.
    """
    shown = cells
    if len(cells) > max_curves:
        shown = [cells[i] for i in np.linspace(0, len(cells) - 1, max_curves).round().astype(int)]
    title = "Memorization during training"
    if len(shown) < len(cells):
        title += f" ({len(shown)} of {len(cells)} cells)"
    panels = [shown[i : i + CURVES_PER_PANEL] for i in range(0, len(shown), CURVES_PER_PANEL)] or [[]]
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    figsize = FIGSIZE if len(panels) == 1 else (4.8 * ncols, 3.6 * nrows)
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, dpi=DPI, squeeze=False)
    fig.suptitle(title)
    data = {"cells": [], "num_cells": len(cells), "panels": []}
    for k, ax in enumerate(axes.ravel()):
        if k >= len(panels):
            ax.set_visible(False)
            continue
        data["panels"].append(_curve_panel(ax, panels[k], k, data["cells"]))
        if k // ncols == nrows - 1 or k + ncols >= len(panels):
            ax.set_xlabel("optimizer step")
        if k % ncols == 0:
            ax.set_ylabel("memorized mem_bits (bits); dotted: H(X)")
    if not cells:
        _empty_note(axes[0][0], "no curves recorded")
    return _finish(fig), data


def _curve_panel(ax, cells: list[dict], panel: int, plotted: list[dict]) -> list[str]:
    """One panel of mem_curves: each cell in its own colour, with its legend; appends to `plotted`."""
    for i, cell in enumerate(cells):
        color = to_hex(f"C{i}")
        steps, mem = _floats(cell["steps"]), _floats(cell["mem_bits"])
        ax.plot(steps, mem, color=color, lw=1.2, marker=".", label=cell["label"])
        if cell.get("entropy_bits") is not None and np.isfinite(cell["entropy_bits"]):
            ax.axhline(cell["entropy_bits"], color=color, lw=0.6, ls=":")
        plotted.append({"label": cell["label"], "steps": steps, "mem_bits": mem,
                        "entropy_bits": float(cell.get("entropy_bits", np.nan)), "panel": panel, "color": color})
    ax.grid(True, alpha=0.3)
    if cells:
        ax.legend(fontsize=6 if len(cells) <= 4 else 5)
    return [cell["label"] for cell in cells]


# -- text cells: seed means per pool size N, one line per (model shape, precision) group ------------------
# Each text figure takes `groups`: one dict per group with `label`, `num_sequences` (the pool sizes N,
# ascending) and dicts `mean` and `std` mapping a metric name to one value per N (NaN or None where no
# seed has it): the `text` section of fits.json (measure/sweep.summarise_text).


def _series(group: dict, metric: str) -> tuple[list[float], list[float], list[float]] | None:
    """(N, seed means, seed stds) of a metric over the pool sizes that have it; None when none does."""
    if metric not in group["mean"]:
        return None
    sizes, means = _floats(group["num_sequences"]), _floats(group["mean"][metric])
    stds = _floats(group["std"].get(metric, [np.nan] * len(means)))
    keep = [i for i, m in enumerate(means) if np.isfinite(m)]
    if not keep:
        return None
    return [sizes[i] for i in keep], [means[i] for i in keep], [stds[i] if np.isfinite(stds[i]) else 0.0 for i in keep]


def _errorbar(ax, series, **style) -> None:
    sizes, means, stds = series
    ax.errorbar(sizes, means, yerr=stds, capsize=2, ms=4, lw=1.2, **style)


def text_mem_vs_num_sequences(groups: list[dict]) -> tuple[Figure, dict]:
    """Unintended memorization per training sequence (mem_bits_per_sequence, bits) against the pool
    size N, log x; seed means with the seed std as error bars."""
    fig, (ax,) = _new("Text: unintended memorization per sequence against dataset size")
    data = {"groups": []}
    colors = _colors(len(groups))
    for i, group in enumerate(groups):
        series = _series(group, "mem_bits_per_sequence")
        if series is None:
            continue
        _errorbar(ax, series, color=colors[i], marker="o", label=group["label"])
        data["groups"].append({"label": group["label"], "num_sequences": series[0],
                               "mean_mem_bits_per_sequence": series[1], "std_mem_bits_per_sequence": series[2]})
    _text_axes(ax, bool(data["groups"]), "training sequences N (count)",
               "unintended memorization per sequence (bits/sequence);\nseed means, bars: seed std")
    if data["groups"]:
        _legend(fig, ax, len(data["groups"]), loc="best")
    return _finish(fig), data


def text_mia_extraction(groups: list[dict]) -> tuple[Figure, dict]:
    """Two panels against the pool size N, log x, seed means with seed-std bars. Left: balanced F1
    of the loss attack (solid) and the reference attack (dashed). Right: the greedy extraction rate
    from 8, 16 and 32-token prefixes (marker) on training (solid) and test (dotted) sequences.
    Colour is the group; the legends name each group once, then the line styles and markers."""
    fig, (ax_f1, ax_ex) = _new("Text: membership inference and extraction against dataset size",
                               figsize=(12.0, 5.0), ncols=2)
    data = {"groups": []}
    colors = _colors(len(groups))
    styles = {ax_f1: {}, ax_ex: {}}  # legend entries for line styles and markers, in order of use
    labelled = {ax_f1: set(), ax_ex: set()}
    for i, group in enumerate(groups):
        entry = {"label": group["label"], "f1": {}, "extraction": {}}
        curves = [(ax_f1, f"{attack}_f1", attack, ls, "o", f"{attack} attack")
                  for attack, ls in (("loss", "-"), ("reference", "--"))]
        curves += [(ax_ex, extraction_name(split, prefix), f"{split}_p{prefix}", ls, marker, None)
                   for split, ls in zip(EXTRACTION_SPLITS, ("-", ":"))
                   for prefix, marker in zip(EXTRACTION_PREFIXES, ("o", "s", "^"))]
        for ax, metric, key, ls, marker, style_label in curves:
            series = _series(group, metric)
            if series is None:
                continue
            label = group["label"] if i not in labelled[ax] else None
            labelled[ax].add(i)
            _errorbar(ax, series, color=colors[i], ls=ls, marker=marker, label=label)
            target = entry["f1"] if ax is ax_f1 else entry["extraction"]
            target[key] = {"num_sequences": series[0], "mean": series[1], "std": series[2]}
            if ax is ax_f1:
                styles[ax].setdefault(style_label, dict(color="0.3", ls=ls))
            else:
                split, prefix = key.split("_p")
                styles[ax].setdefault(split, dict(color="0.3", ls=ls))
                styles[ax].setdefault(f"{prefix}-token prefix", dict(color="0.3", ls="none", marker=marker))
        data["groups"].append(entry)
    ax_f1.axhline(0.5, color="0.7", lw=0.8)
    ax_f1.set_ylim(0.4, 1.05)
    ax_f1.set_ylabel("balanced F1 (fraction; 0.5 = chance)")
    ax_f1.set_title("MIA: loss attack (solid), reference attack (dashed)", fontsize=10)
    ax_ex.set_ylim(-0.03, 1.03)
    ax_ex.set_ylabel("exact greedy extraction rate (fraction of sequences)")
    ax_ex.set_title("extraction: train (solid), test (dotted); marker: prefix length", fontsize=10)
    for ax in (ax_f1, ax_ex):
        _text_axes(ax, bool(labelled[ax]), "training sequences N (count)")
        if labelled[ax]:
            for style_label, style in styles[ax].items():
                ax.plot([], [], label=style_label, **style)
            entries = len(labelled[ax]) + len(styles[ax])
            ax.legend(fontsize=6 if entries > 8 else 7, loc="best", ncol=1 + entries // 16)
    return _finish(fig), data


def _text_axes(ax, has_data: bool, xlabel: str, ylabel: str | None = None) -> None:
    """The text figures' common axis: log x, labels, a grid, a note when nothing finished."""
    if not has_data:
        _empty_note(ax, "no finished text cells")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)


def text_test_loss_vs_capacity_ratio(groups: list[dict]) -> tuple[Figure, dict]:
    """Test loss on the held-out test split (bits per token) against the capacity ratio
    H(X) / (alpha * params) (H(X): the training set's code length under the reference model), log x,
    at the seed means of each pool size, with a line where the ratio is 1."""
    fig, (ax,) = _new("Text: test loss against capacity ratio")
    data = {"groups": [], "ratio_line": 1.0}
    colors = _colors(len(groups))
    for i, group in enumerate(groups):
        ratio, loss = _series(group, "capacity_ratio"), _series(group, "test_nll_bits_per_token")
        if ratio is None or loss is None:
            continue
        both = sorted(set(ratio[0]) & set(loss[0]))
        points = sorted((ratio[1][ratio[0].index(n)], loss[1][loss[0].index(n)], loss[2][loss[0].index(n)], n)
                        for n in both)
        x, y, err, sizes = ([p[k] for p in points] for k in range(4))
        ax.errorbar(x, y, yerr=err, color=colors[i], marker="o", ms=4, lw=1.2, capsize=2, label=group["label"])
        data["groups"].append({"label": group["label"], "num_sequences": sizes, "mean_capacity_ratio": x,
                               "mean_test_nll_bits_per_token": y, "std_test_nll_bits_per_token": err})
    ax.axvline(1.0, color="k", lw=1.0, ls="--", label="H(X) = alpha * params")
    _text_axes(ax, bool(data["groups"]),
               "capacity ratio H(X) / (alpha * params) (dimensionless; H(X) under the reference model)",
               "test loss (bits/token); seed means, bars: seed std")
    _legend(fig, ax, len(data["groups"]) + 1, loc="best")
    return _finish(fig), data
