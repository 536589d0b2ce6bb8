"""Sweep-level fits from a table of cells: capacity per group, measured and extrapolated; alpha per
(precision, V, S, recipe) group in the same two forms (two statistics with two-level bootstrap
intervals, called ranges below 5 shapes, beside the paper's); the MIA law per data kind and the
predictions, plus seed means of text cells (docs/science.md, "Capacity (sweep)", "Alpha" and "The MIA
law").

    fits = fit_sweep(cells, grouping(config_keys))   # a JSON-able dict: what fits.json holds

The input is a pyarrow table with one row per cell (orchestrator/aggregate.py builds it from MLflow):
the cell's typed configuration as columns named like `model.n_layer`, its `status`, and its final metrics
as float columns named as measure/metrics.py declares them (the asymptote columns of ASYMPTOTE_COLUMNS
may be absent, as in a table aggregated before cells logged them: the extrapolated forms then say they
are not available). Which configuration columns exist is the
caller's business: `grouping` takes their names and says which of them a capacity group shares. Only
FINISHED rows enter a fit; degenerate sweeps give partial results with the reason for what was
skipped, never an exception.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from measure.capacity import (
    MIN_SHAPES_FOR_CI,
    capacity,
    cell_extrapolations,
    extrapolated_capacity,
    fit_alpha,
    fit_mia_law,
    mem_prediction_error,
    mia_law_unidentifiable,
    published_mia_law_as_printed,
    published_mia_law_corrected,
    size_cells,
)
from measure.memorization import predicted_mem_bits
from measure.metrics import (
    EXTRACTION_PREFIXES,
    EXTRACTION_SPLITS,
    SYNTHETIC,
    TEXT,
    attack_names,
    extraction_name,
    metric_names,
)
from measure.paper import PAPER_CAPACITY_COLUMN, paper_alpha

# -- grouping ---------------------------------------------------------------------------------------------
SIZE, SEED = "data.num_sequences", "seed"
# A capacity is taken over cells that share everything but the dataset size and the seed (and the
# number of non-members, which changes only the MIA metrics): one model shape, one precision, one
# data shape (V, S) and one training recipe.
NOT_IN_CAPACITY_GROUP = (SIZE, SEED, "data.num_nonmembers")
# A text summary groups like a capacity, and never averages across corpora, tokenizers, splits or
# reference models either (text params, which a table may lack: grouping uses those it has). A text
# cell without a reference (data.reference.enabled false) measures against the uniform code instead.
TEXT_GROUP_KEYS = (
    "data.corpus_uri", "data.tokenizer", "data.tokenizer_hash", "data.split_seed",
    "data.num_test", "data.max_sequences", "data.reference.enabled", "data.reference.num_sequences",
    "data.reference.n_layer", "data.reference.n_head", "data.reference.n_embd", "data.reference.seed",
)


@dataclass(frozen=True)
class Grouping:
    """The configuration columns each kind of group shares (in the table's column names)."""

    capacity: tuple[str, ...]  # a capacity group: every configuration key but N, seed, non-members
    text: tuple[str, ...]  # a text summary group: the capacity keys and the corpus's keys


def grouping(config_keys) -> Grouping:
    """The grouping over a cell's configuration keys (e.g. every field of its spec, flattened)."""
    capacity_keys = tuple(k for k in config_keys if k not in NOT_IN_CAPACITY_GROUP)
    return Grouping(capacity_keys, tuple(dict.fromkeys((*capacity_keys, *TEXT_GROUP_KEYS))))


PRECISION_ORDER = ("fp32", "bf16", "amp_bf16")
N_BOOT = 1000
MIN_MIA_CELLS = 3  # the law has three constants


def column_arrays(table: pa.Table, names) -> dict[str, np.ndarray]:
    """Plain numpy columns: floats with NaN for null, everything else as object arrays."""
    arrays = {}
    for name in names:
        if name not in table.column_names:
            continue
        column = table.column(name)
        if pa.types.is_floating(column.type) or pa.types.is_integer(column.type):
            arrays[name] = np.array([np.nan if v is None else v for v in column.to_pylist()], dtype=np.float64)
        else:
            arrays[name] = np.array(column.to_pylist(), dtype=object)
    return arrays


def _clean(value):
    """JSON-safe: numpy scalars to Python, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def data_kinds(cols: dict[str, np.ndarray]) -> np.ndarray:
    """Each row's `data.kind` as an object array; a null, or a table without the column (one
    aggregated before text cells existed), is synthetic."""
    n = len(cols["status"])
    kinds = cols.get("data.kind", np.full(n, None, dtype=object))
    return np.array([SYNTHETIC if k is None else k for k in kinds], dtype=object)


def select_rows(cols: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {name: values[mask] for name, values in cols.items()}


# The final metrics of a cell trained with annealed branches that the extrapolated forms and the tables
# read (measure/metrics.py declares them); a table aggregated before cells logged them lacks them.
ASYMPTOTE_COLUMNS = (
    "asymptote_extrapolable", "mem_bits_asymptote", "mem_bits_asymptote_ci_low", "mem_bits_asymptote_ci_high",
    "asymptote_exponent", "fraction_of_asymptote", "exposures", "num_branches", "last_horizon_steps",
    "mem_bits_floor",
)


def float_column(cols: dict[str, np.ndarray], name: str) -> np.ndarray:
    """A float column of `cols`, NaN where it is null, all NaN when the table lacks it (or it is not numeric)."""
    n = len(cols["status"]) if "status" in cols else len(cols.get("cell_id", []))
    values = cols.get(name)
    if values is None:
        return np.full(n, np.nan)
    try:
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        return np.full(n, np.nan)


def finished_columns(table: pa.Table, groups: Grouping) -> dict[str, np.ndarray]:
    """Columns of the FINISHED cells that carry the numbers every fit needs: mem_bits, params and N,
    and for a synthetic cell H(X) (`entropy_bits`). A text cell without mem_bits (a reference model,
    which has nothing to be measured against) is left out."""
    names = ["cell_id", "status", *groups.text, SIZE, SEED, *metric_names(), *ASYMPTOTE_COLUMNS]
    names += [n for n in table.column_names if n.endswith("_f1") or n.endswith("_auc")]
    cols = column_arrays(table, dict.fromkeys(names))
    keep = cols["status"] == "FINISHED"
    for name in ("mem_bits", "params", "data.num_sequences"):
        keep &= np.isfinite(cols[name]) if name in cols else False
    entropy = cols.get("entropy_bits", np.full(len(keep), np.nan))
    keep &= np.isfinite(entropy) | (data_kinds(cols) != SYNTHETIC)
    return select_rows(cols, keep)


def _plain(value):
    """A group-key value as JSON would want it: integral floats (int columns read as float64) as int,
    NaN (a null: a key that some runs lack) as None, so that equal keys compare equal."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return int(value)
    return value


def _group_label(key: dict, varying: list[str]) -> str:
    """`l2_d24 fp32`: the actual shape (a grid may override a named model's layers or width) and the
    precision, plus the other grouping keys that vary in the sweep."""
    layers, width = _plain(key.get("model.n_layer")), _plain(key.get("model.n_embd"))
    shape = f"l{layers}_d{width}" if layers is not None and width is not None else key.get("model.name")
    label = f"{shape} {key.get('precision.name')}"
    extras = [f"{k}={key[k]:g}" if isinstance(key[k], float) else f"{k}={key[k]}" for k in varying]
    return label + (f" ({', '.join(extras)})" if extras else "")


@dataclass(frozen=True)
class CapacityGroup:
    key: dict  # grouping column -> value
    label: str  # shape and precision, plus any other grouping key that varies in the sweep
    rows: np.ndarray  # bool mask over the cells
    varying: dict  # the grouping keys beyond shape and precision that vary, with this group's values


def capacity_groups(cols: dict[str, np.ndarray], keys: tuple[str, ...]) -> list[CapacityGroup]:
    """The groups of the cells in `cols` that share the values of `keys` (those present), in table order."""
    n = len(cols.get("cell_id", []))
    group_keys = [k for k in keys if k in cols]
    keys = [tuple(_plain(cols[k][i]) for k in group_keys) for i in range(n)]
    varying = [k for j, k in enumerate(group_keys)
               if not k.startswith("model.") and k != "precision.name" and len({key[j] for key in keys}) > 1]
    members: dict[tuple, list[int]] = {}  # each group's rows, found in one pass (not one per group)
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    groups = []
    for key, indices in members.items():
        key_dict = dict(zip(group_keys, key))
        rows = np.zeros(n, dtype=bool)
        rows[indices] = True
        groups.append(CapacityGroup(key_dict, _group_label(key_dict, varying), rows,
                                    {k: key_dict[k] for k in varying}))
    return groups


PLATEAU_TOL = 0.05  # relative change of seed-mean mem_bits between the two largest sizes


def plateau_reached(sizes, mem_bits, entropy_bits, capacity_bits: float, tol: float = PLATEAU_TOL) -> bool:
    """Whether the sweep saw memorization stop growing: at least two dataset sizes hold more
    information than the capacity, and the seed means of the two largest differ by at most `tol`
    (relative; 5% by default). Otherwise the capacity may grow with more data (beside the
    not-converged lower bound)."""
    levels = np.unique(sizes)
    means = np.array([mem_bits[sizes == n].mean() for n in levels])
    entropy = np.array([entropy_bits[sizes == n][0] for n in levels])
    beyond = means[entropy > capacity_bits]
    return bool(beyond.size >= 2 and abs(beyond[-1] - beyond[-2]) <= tol * abs(beyond[-2]))


def seed_mem_bits_by_size(sizes: np.ndarray, mem_bits: np.ndarray) -> list[np.ndarray]:
    """One group's mem_bits split by dataset size (ascending): each entry holds that size's seeds."""
    return [mem_bits[sizes == n] for n in np.unique(sizes)]


EXTRAPOLATED_NOTE = ("an extrapolation, not a measurement: each cell's asymptote A of a(T) = A - B T^-c fitted to "
                     "its annealed branches, capped at its H(X) (a converged cell without an extrapolable fit counts "
                     "at its measured mem_bits), then the maximum over dataset sizes of the seed means")
EXTRAPOLATED_INTERVAL = ("95% percentile interval of {n} bootstrap replicates: at every dataset size the seeds "
                         "resampled with replacement and each drawn cell's A drawn from the split normal that matches "
                         "its own 95% interval, capped at H(X); the maximum over sizes retaken")
NO_ASYMPTOTE = "not available: the cells logged no asymptote"


def group_extrapolations(rows: np.ndarray, cols: dict[str, np.ndarray]):
    """The cells' extrapolated values (measure.capacity.cell_extrapolations) for the rows of `rows`."""
    return cell_extrapolations(
        cols["mem_bits"][rows], np.nan_to_num(float_column(cols, "converged")[rows], nan=0.0) > 0.5,
        float_column(cols, "asymptote_extrapolable")[rows], float_column(cols, "mem_bits_asymptote")[rows],
        float_column(cols, "mem_bits_asymptote_ci_low")[rows], float_column(cols, "mem_bits_asymptote_ci_high")[rows],
        cols["entropy_bits"][rows])


def _plateau_fraction(rows: np.ndarray, cols: dict[str, np.ndarray], extrapolations, plateau: np.ndarray):
    """The mean fraction_of_asymptote of the plateau cells that have an extrapolated value (1 for a
    converged cell without an extrapolable fit: it is at its asymptote), and how many there are."""
    logged = float_column(cols, "fraction_of_asymptote")[rows]
    mem = cols["mem_bits"][rows]
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.where(extrapolations.from_asymptote,
                            np.where(np.isfinite(logged), logged, mem / extrapolations.asymptote),
                            np.where(np.isfinite(extrapolations.value), 1.0, np.nan))
    chosen = fraction[plateau & np.isfinite(fraction)]
    return (float(chosen.mean()) if chosen.size else None), int(chosen.size)


def extrapolated_fields(group: CapacityGroup, cols: dict[str, np.ndarray], measured_bits: float, params: float,
                        n_boot: int = N_BOOT):
    """The extrapolated half of a capacity entry, and the group's per-size cells for the extrapolated
    alpha bootstrap (None when the group has no extrapolated capacity)."""
    rows = group.rows
    sizes = cols["data.num_sequences"][rows].astype(np.int64)
    mem, entropy = cols["mem_bits"][rows], cols["entropy_bits"][rows]
    e = group_extrapolations(rows, cols)
    plateau = entropy > measured_bits
    fields = {"capacity_extrapolated_bits": None, "capacity_extrapolated_ci_low": None,
              "capacity_extrapolated_ci_high": None, "capacity_extrapolated_interval": None,
              "bits_per_param_extrapolated": None, "num_sequences_at_max_extrapolated": None,
              "extrapolated_reason": None, "extrapolated_missing_cells": [], "extrapolated_lower_bound": False,
              "extrapolated_cells": None,
              "fraction_of_asymptote": None, "fraction_of_asymptote_cells": 0, "extrapolated_note": EXTRAPOLATED_NOTE}
    if not np.isfinite(float_column(cols, "asymptote_extrapolable")[rows]).any():
        fields["extrapolated_reason"] = NO_ASYMPTOTE
        return fields, None
    fields["fraction_of_asymptote"], fields["fraction_of_asymptote_cells"] = _plateau_fraction(rows, cols, e, plateau)
    estimate = extrapolated_capacity(sizes, mem, entropy, e, measured_bits, n_boot=n_boot, seed=0)
    has_value = np.isfinite(e.value)
    fields["extrapolated_cells"] = {
        "asymptote": estimate.from_asymptote, "capped_at_entropy": estimate.capped,
        "converged_at_measured": int((has_value & ~e.from_asymptote).sum()),
        "measured_off_plateau": int((~has_value & ~plateau).sum()),
    }
    missing = list(estimate.missing_plateau_cells)
    ids = [str(c) for c in cols["cell_id"][rows][missing]]
    fields["extrapolated_lower_bound"] = estimate.lower_bound
    if estimate.reason is not None:
        at = ", ".join(f"{n:,}" for n in sorted({int(n) for n in sizes[missing]}))
        fields.update(extrapolated_reason=f"{estimate.reason} ({', '.join(ids[:4])}"
                                          f"{f', ... ({len(ids)} in all)' if len(ids) > 4 else ''}; N = {at})",
                      extrapolated_missing_cells=ids)
    if estimate.capacity_bits is None:
        return fields, None
    keep = np.ones(sizes.size, dtype=bool)
    keep[missing] = False
    fields.update(capacity_extrapolated_bits=estimate.capacity_bits, capacity_extrapolated_ci_low=estimate.ci_low,
                  capacity_extrapolated_ci_high=estimate.ci_high,
                  capacity_extrapolated_interval=EXTRAPOLATED_INTERVAL.format(n=n_boot),
                  bits_per_param_extrapolated=estimate.capacity_bits / params,
                  num_sequences_at_max_extrapolated=estimate.num_sequences_at_max)
    return fields, size_cells(sizes[keep], e.select(keep), mem[keep])


def capacity_entry(group: CapacityGroup, cols: dict[str, np.ndarray], n_boot: int = N_BOOT) -> dict:
    """fits.json's record of one capacity group: the measured capacity, its seeds, and why it is a
    lower bound when it is one (the unconverged cells whose H(X) exceeds it, and their N); beside it
    the extrapolated capacity (extrapolated_fields) with its interval, or the reason it has none."""
    return capacity_entry_and_cells(group, cols, n_boot)[0]


def capacity_entry_and_cells(group: CapacityGroup, cols: dict[str, np.ndarray], n_boot: int = N_BOOT):
    """capacity_entry, and the group's per-size cells for the extrapolated alpha (None without one)."""
    key_dict, rows = group.key, group.rows
    sizes = cols["data.num_sequences"][rows].astype(np.int64)
    mem, entropy = cols["mem_bits"][rows], cols["entropy_bits"][rows]
    converged = np.nan_to_num(float_column(cols, "converged")[rows], nan=0.0) > 0.5
    estimate = capacity(sizes, mem, converged, entropy)
    at_max = sizes == estimate.num_sequences_at_max
    unconverged = list(estimate.unconverged_plateau_cells)
    params = float(cols["params"][rows][0])
    entry = {
        "label": group.label,
        "model": key_dict.get("model.name"),
        "precision": key_dict.get("precision.name"),
        "n_layer": key_dict.get("model.n_layer"),
        "n_embd": key_dict.get("model.n_embd"),
        "vocab_size": key_dict.get("data.vocab_size"),
        "seq_len": key_dict.get("data.seq_len"),
        "group": group.varying,
        "params": params,
        "params_paper": float(cols["params_paper"][rows][0]),
        "capacity_bits": estimate.capacity_bits,
        "seed_std_bits": estimate.seed_std_bits,
        "num_sequences_at_max": estimate.num_sequences_at_max,
        "entropy_bits_at_max": float(entropy[at_max][0]),
        "lower_bound": estimate.lower_bound,
        "lower_bound_cells": [str(c) for c in cols["cell_id"][rows][unconverged]],
        "lower_bound_num_sequences": sorted({int(n) for n in sizes[unconverged]}),
        "plateau_reached": plateau_reached(sizes, mem, entropy, estimate.capacity_bits),
        "bits_per_param": estimate.capacity_bits / params,
        "seed_capacities_bits": [float(v) for v in mem[at_max]],
        "num_cells": int(rows.sum()),
        "num_dataset_sizes": int(np.unique(sizes).size),
    }
    extrapolated, cells = extrapolated_fields(group, cols, estimate.capacity_bits, params, n_boot)
    entry.update(extrapolated)
    return entry, cells


def fit_capacities(cols: dict[str, np.ndarray], keys: tuple[str, ...], n_boot: int = N_BOOT):
    """Capacity per (model shape, precision, data shape, recipe) group of finished cells; beside each
    group its seeds' mem_bits per dataset size (what the measured alpha bootstrap resamples) and its
    per-size extrapolated cells (measure.capacity.SizeCells, what the extrapolated alpha bootstrap
    resamples; None for a group without an extrapolated capacity): three parallel lists."""
    entries, seeds, extrapolated = [], [], []
    for group in capacity_groups(cols, keys):
        entry, cells = capacity_entry_and_cells(group, cols, n_boot)
        entries.append(entry)
        extrapolated.append(cells)
        sizes = cols["data.num_sequences"][group.rows].astype(np.int64)
        seeds.append(seed_mem_bits_by_size(sizes, cols["mem_bits"][group.rows]))
    return entries, seeds, extrapolated


ALPHA_DESCRIPTIONS = {
    "slope": "least-squares slope through the origin of capacity against params, sum(P C) / sum(P^2): "
             "weights each shape by params squared, so the largest shapes dominate",
    "mean_ratio": "mean over shapes of capacity / params: every shape weighs the same",
}
ALPHA_FOR_PREDICTIONS = "slope"  # the one alpha per precision that predictions and figures use


def _precision_order(precision) -> tuple:
    return (PRECISION_ORDER.index(precision) if precision in PRECISION_ORDER else 99, str(precision))


INTERVAL_NOTES = {
    "none": "one shape: an interval must resample shapes to carry their scatter, and one shape has none to show, "
            "so no interval is given",
    "range": "fewer than {min} shapes ({n}): the bootstrap's 2.5th to 97.5th percentiles show the spread the shapes "
             "allow, a range, not a 95% confidence interval (too few shapes to resample for coverage)",
    "ci": "95% percentile confidence interval of the two-level bootstrap over {n} shapes",
}
V_KEY, S_KEY = "data.vocab_size", "data.seq_len"


def _short(key: str) -> str:
    return {V_KEY: "V", S_KEY: "S"}.get(key, key)


def _value_text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def alpha_groups(capacities: list[dict]) -> dict[str, list[int]]:
    """The capacity entries of each alpha group, by fits.json key: one group per (precision, V, S,
    recipe), i.e. per precision and values of every grouping key beyond the model shape that varies in
    the sweep. A precision with one group is keyed by its name; otherwise each group by a readable
    label, `fp32 (V=2048, S=64)`, naming the keys that vary between that precision's groups."""
    by_precision: dict = {}
    for i, c in enumerate(capacities):
        members = by_precision.setdefault(c["precision"], {})
        members.setdefault(tuple(sorted((c.get("group") or {}).items())), []).append(i)
    keyed = {}
    for precision in sorted(by_precision, key=_precision_order):
        groups = by_precision[precision]
        if len(groups) == 1:
            keyed[str(precision)] = next(iter(groups.values()))
            continue
        varying = [k for k in dict.fromkeys(k for key in groups for k, _ in key)
                   if len({dict(key).get(k) for key in groups}) > 1 and k not in (V_KEY, S_KEY)]
        for key, members in groups.items():
            first = capacities[members[0]]
            parts = [f"V={_value_text(first['vocab_size'])}", f"S={_value_text(first['seq_len'])}"]
            parts += [f"{_short(k)}={_value_text(dict(key).get(k))}" for k in varying]
            keyed[f"{precision} ({', '.join(parts)})"] = members
    return keyed


def _statistics(fits, paper: dict) -> dict:
    return {name: {"alpha": fit.alpha, "ci_low": fit.ci_low, "ci_high": fit.ci_high, "paper": paper.get(name),
                   "statistic": ALPHA_DESCRIPTIONS[name]} for name, fit in fits.items()}


def _extrapolated_alpha(models: list[dict], cells: list, n_boot: int, paper: dict) -> dict:
    """The extrapolated form of one alpha group: both statistics over its shapes' extrapolated
    capacities, the bootstrap also drawing each cell's asymptote within its interval; or the reason
    there is none (a shape without an extrapolated capacity)."""
    missing = [(c["label"], c["extrapolated_reason"]) for c, cell in zip(models, cells) if cell is None]
    if missing:
        reasons = "; ".join(f"{label}: {reason}" for label, reason in missing)
        if all(reason == NO_ASYMPTOTE for _, reason in missing):
            reason = NO_ASYMPTOTE
        else:
            reason = f"{len(missing)} of {len(models)} shape(s) have no extrapolated capacity ({reasons})"
        return {"available": False, "reason": reason, "alpha": None}
    fits = fit_alpha([c["params"] for c in models], cells, n_boot=n_boot, seed=0)
    kind = fits[ALPHA_FOR_PREDICTIONS].interval_kind
    bounds = [c["label"] for c in models if c.get("extrapolated_lower_bound")]
    return {"available": True, "reason": None, "alpha": fits[ALPHA_FOR_PREDICTIONS].alpha,
            "lower_bound": bool(bounds), "lower_bound_models": bounds,
            **_statistics(fits, paper), "interval_kind": kind,
            "bootstrap": f"{n_boot} replicates: shapes with replacement, then each drawn shape's seeds at every "
                         "dataset size, each drawn cell's asymptote within its own 95% interval (capped at H(X)), "
                         "its extrapolated capacity retaken" if len(models) > 1 else "none",
            "note": "an extrapolation, not a measurement: alpha of the shapes' extrapolated capacities (each cell's "
                    "asymptote A of a(T) = A - B T^-c, capped at H(X))"}


def fit_alphas(capacities: list[dict], seeds: list[list[np.ndarray]], n_boot: int = N_BOOT,
               extrapolated: list | None = None) -> dict[str, dict]:
    """Alpha (bits per parameter) per (precision, V, S, recipe) group of capacities (alpha_groups), by
    both statistics, each with its two-level bootstrap interval (shapes, then seeds; a range below
    MIN_SHAPES_FOR_CI shapes) and the paper's value computed the same way from its table: measured, at
    the entry's top level, and extrapolated, under `extrapolated`. `seeds` and `extrapolated` are
    fit_capacities' second and third results, parallel to `capacities`; each capacity entry gets the
    key of its alpha group (`alpha_key`)."""
    extrapolated = extrapolated if extrapolated is not None else [None] * len(capacities)
    alphas = {}
    varying_recipe = sorted({k for c in capacities for k in (c.get("group") or {}) if k not in (V_KEY, S_KEY)})
    for key, chosen in alpha_groups(capacities).items():
        models = [capacities[i] for i in chosen]
        for c in models:
            c["alpha_key"] = key
        precision = models[0]["precision"]
        fits = fit_alpha([c["params"] for c in models], [seeds[i] for i in chosen], n_boot=n_boot, seed=0)
        paper = paper_alpha(precision) or {}
        kind = fits[ALPHA_FOR_PREDICTIONS].interval_kind
        entry = {"alpha": fits[ALPHA_FOR_PREDICTIONS].alpha, "alpha_statistic": ALPHA_FOR_PREDICTIONS,
                 "form": "measured: from the shapes' measured capacities (mem_bits); a lower bound where lower_bound",
                 **_statistics(fits, paper)}
        bounds = [c["label"] for c in models if c["lower_bound"]]
        entry.update({
            "key": key, "precision": precision, "vocab_size": models[0]["vocab_size"],
            "seq_len": models[0]["seq_len"], "group": dict(models[0].get("group") or {}),
            "recipe": {k: (models[0].get("group") or {}).get(k) for k in varying_recipe},
            "models": [c["label"] for c in models],
            "ci": 0.95, "interval_kind": kind,
            "interval_note": INTERVAL_NOTES[kind].format(min=MIN_SHAPES_FOR_CI, n=len(models)),
            "n_models": len(models),
            "bootstrap": f"{n_boot} replicates: shapes with replacement, then each drawn shape's seeds at "
                         "every dataset size, its capacity retaken" if len(models) > 1 else "none",
            "paper_column": PAPER_CAPACITY_COLUMN.get(precision),
            "lower_bound": bool(bounds), "lower_bound_models": bounds,
            "plateaus_reached": all(c["plateau_reached"] for c in models),
        })
        if len(models) == 1:
            entry["note"] = INTERVAL_NOTES["none"]
        entry["extrapolated"] = _extrapolated_alpha(models, [extrapolated[i] for i in chosen], n_boot, paper)
        entry["alpha_extrapolated"] = entry["extrapolated"]["alpha"]
        alphas[key] = entry
    return alphas


def _matches(entry: dict, key: dict) -> bool:
    """Whether a cell with configuration `key` (column -> value) belongs to the alpha group `entry`."""
    wanted = {V_KEY: entry.get("vocab_size"), S_KEY: entry.get("seq_len"), **(entry.get("group") or {})}
    return all(_plain(key.get(k)) == v for k, v in wanted.items())


def alpha_entry_for(precision: str, alphas: dict, key: dict | None = None) -> tuple[str, dict] | None:
    """(fits.json key, entry) of the alpha group a cell of `precision` with configuration `key` belongs
    to; without a matching group (a text cell), the precision's entry when it has a single group."""
    if key is not None:
        for name, entry in alphas.items():
            if entry.get("precision", name) == precision and _matches(entry, key):
                return name, entry
    if precision in alphas:
        return precision, alphas[precision]
    return None


def alpha_for(precision: str, alphas: dict, key: dict | None = None) -> tuple[float, str]:
    """The alpha (bits per parameter) used to predict a cell, and where it came from: the measured
    slope of the cell's own (precision, V, S, recipe) group (alpha_entry_for; `key` is the cell's
    configuration, column -> value), else the paper's slope for that weight dtype (3.6, the paper's
    headline, for a precision the paper's table cannot stand for)."""
    found = alpha_entry_for(precision, alphas, key)
    if found is not None:
        return found[1]["alpha"], f"fitted {ALPHA_FOR_PREDICTIONS}"
    paper = paper_alpha(precision)
    if paper is None:
        return 3.6, "paper headline"
    return paper[ALPHA_FOR_PREDICTIONS], f"paper {ALPHA_FOR_PREDICTIONS} ({PAPER_CAPACITY_COLUMN[precision]})"


def row_key(cols: dict[str, np.ndarray], i: int) -> dict:
    """Row i's configuration for alpha_entry_for: its data.*, train.* and precision columns."""
    return {k: _plain(v[i]) for k, v in cols.items() if k.startswith(("data.", "train.", "precision."))}


def published_constants() -> dict:
    return {
        "as_printed": {
            "formula": "F1 = 1/2 * (1 + c1 * sigmoid(c2 * (Capacity/|D| + c3)))",
            "c1": 1.34, "c2": -0.034, "c3": -33.14,
            "note": "tends to about 1.0, not 0.5, as |D| grows (measure/paper.py)",
        },
        "corrected": {
            "formula": "F1 = 1/2 * (1 + c1 * sigmoid(c2 * x + c3)), x = |D|/P",
            "c1": 1.34, "c2": -33.14, "c3": 33.14 * 0.0337,
            "note": "reproduces the paper's Table 2 (measure/paper.py, mia_validation.csv)",
        },
    }


PAPER_SEQ_LEN = 64  # tokens per sequence in the paper's MIA-law experiments


def published_comparison(f1, sizes, params, seq_len, alpha) -> dict:
    """RMSE of F1 of the paper's two published forms on text cells (arrays over the cells). The
    paper counts 64-token sequences: where a cell's S differs, |D| becomes N * S / 64, so its x is
    converted through tokens per parameter, x64 = N * S / (64 * params)."""
    sequences64 = sizes * seq_len / PAPER_SEQ_LEN
    corrected = published_mia_law_corrected(sequences64, params)
    printed = published_mia_law_as_printed(alpha * params, sequences64)
    lengths = ", ".join(f"{s:g}" for s in np.unique(seq_len))
    same = bool(np.all(seq_len == PAPER_SEQ_LEN))
    return {
        "x": "N / params: the cells' sequences are 64 tokens, as the paper's" if same else
             f"converted through tokens per parameter, x64 = N * S / (64 * params): the cells' sequences "
             f"are S = {lengths} tokens, the paper's 64",
        "converted": not same,
        "corrected": {"rmse": float(np.sqrt(np.mean((f1 - corrected) ** 2)))},
        "as_printed": {"rmse": float(np.sqrt(np.mean((f1 - printed) ** 2))),
                       "capacity": "alpha * params, alpha the sweep's slope for each cell's precision "
                                   "(the paper's slope where the sweep fitted none)"},
    }


def mia_law_entry(x: np.ndarray, f1: np.ndarray, unconverged_cells=()) -> dict:
    """The law's constants fitted to (x, f1), or `identifiable: false` and the reason: too few cells
    or distinct x for 3 constants, no transition in the cells (one flat tail, or no cell inside the
    transition 0.55 < F1 < 0.95: cells on the two tails bracket it and do not fix c2), or a fit that did
    not converge. Either way `unconverged_cells` lists the ids of the entry's cells whose `converged`
    is 0 (their F1 may still move with training)."""
    listed = {"unconverged_cells": [str(c) for c in unconverged_cells]}
    distinct = int(np.unique(x).size)
    if x.size < MIN_MIA_CELLS or distinct < MIN_MIA_CELLS:
        return {"identifiable": False,
                "reason": f"the law's 3 constants need at least {MIN_MIA_CELLS} cells at {MIN_MIA_CELLS} "
                          f"distinct sequences-per-parameter values; have {x.size} cells at {distinct}", **listed}
    flat = mia_law_unidentifiable(f1)
    if flat is not None:
        return {"identifiable": False, "reason": flat, **listed}
    try:
        fit = fit_mia_law(x, f1)
    except (RuntimeError, ValueError) as err:  # curve_fit did not converge
        return {"identifiable": False, "reason": f"the fit failed: {err}", **listed}
    return {"identifiable": True, "c1": fit.c1, "c2": fit.c2, "c3": fit.c3,
            "c1_std": fit.c1_std, "c2_std": fit.c2_std, "c3_std": fit.c3_std,
            "rmse": fit.rmse, "c1_at_bound": bool(fit.c1 >= 10.0 - 1e-9), **listed}


def fit_mia_kind(cols: dict[str, np.ndarray], kind: str, alphas: dict) -> dict[str, dict]:
    """The MIA law per attack over the cells of one data kind in `cols`, against x = N / params; the
    paper's published forms beside it for text cells only (it fitted its law on text)."""
    results = {}
    unconverged = float_column(cols, "converged") == 0.0
    for attack in attack_names(cols):
        f1, x = cols[f"{attack}_f1"], cols["sequences_per_param"]
        ok = np.isfinite(f1) & np.isfinite(x)
        if not ok.any():
            continue  # an attack this kind never measures (the reference attack on synthetic cells)
        entry = {"kind": kind, "attack": attack, "num_cells": int(ok.sum()),
                 "x": "sequences_per_param (N / params)", "x_min": float(x[ok].min()), "x_max": float(x[ok].max())}
        entry.update(mia_law_entry(x[ok], f1[ok], cols["cell_id"][ok & unconverged]))
        seq_len = cols.get("data.seq_len", np.full(len(f1), np.nan))[ok]
        if kind == TEXT and np.all(np.isfinite(seq_len)):
            alpha = np.array([alpha_for(cols["precision.name"][i], alphas, row_key(cols, i))[0]
                              for i in np.flatnonzero(ok)])
            entry["published"] = published_comparison(f1[ok], cols["data.num_sequences"][ok], cols["params"][ok],
                                                      seq_len, alpha)
        elif kind == TEXT:
            entry["published_skipped"] = "a cell lacks data.seq_len: x cannot be put in the paper's 64-token terms"
        results[attack] = entry
    return results


def fit_mia(cols: dict[str, np.ndarray], alphas: dict) -> dict[str, dict]:
    """fits.json's `mia`: data kind -> attack -> entry, for each kind with FINISHED cells in `cols`."""
    kinds = data_kinds(cols)
    return {kind: fit_mia_kind(select_rows(cols, kinds == kind), kind, alphas)
            for kind in (SYNTHETIC, TEXT) if np.any(kinds == kind)}


def predict_cells(cols: dict[str, np.ndarray], alphas: dict) -> dict:
    """Measured against predicted min(alpha * params, H(X)) per finished cell, alpha the measured slope
    of its own (precision, V, S, recipe) group; beside each cell its exposures, its noise floor
    (mem_bits_floor) and its extrapolated memorization where it has one (null otherwise)."""
    records = []
    n = len(cols.get("cell_id", []))
    if n:
        e = group_extrapolations(np.ones(n, dtype=bool), cols)
        exposures, floor = float_column(cols, "exposures"), float_column(cols, "mem_bits_floor")
        converged = float_column(cols, "converged")
    for i, cell_id in enumerate(cols.get("cell_id", [])):
        alpha, source = alpha_for(cols["precision.name"][i], alphas, row_key(cols, i))
        predicted = float(predicted_mem_bits(alpha, cols["params"][i], cols["entropy_bits"][i]))
        records.append({
            "cell_id": cell_id, "precision": cols["precision.name"][i], "alpha": alpha, "alpha_source": source,
            "params": float(cols["params"][i]), "entropy_bits": float(cols["entropy_bits"][i]),
            "capacity_ratio": float(cols["entropy_bits"][i] / (alpha * cols["params"][i])),
            "mem_bits": float(cols["mem_bits"][i]), "predicted_mem_bits": predicted,
            "error": float(mem_prediction_error(cols["mem_bits"][i], predicted)),
            "mem_bits_floor": float(floor[i]), "exposures": float(exposures[i]),
            "converged": float(converged[i]),
            "mem_bits_extrapolated": float(e.value[i]) if e.from_asymptote[i] else None,
        })
    errors = np.array([r["error"] for r in records])
    summary = {"num_cells": len(records)}
    if records:
        summary.update({"mean_abs_error": float(np.mean(np.abs(errors))),
                        "median_abs_error": float(np.median(np.abs(errors))),
                        "max_abs_error": float(np.max(np.abs(errors)))})
    return {"summary": summary, "cells": records,
            "error": "(measured - predicted) / predicted, a signed fraction",
            "mem_bits_extrapolated": "the cell's asymptote A capped at H(X), an extrapolation (null without an "
                                     "extrapolable fit)"}


# The text section: seed means (and seed spreads) of these final metrics of text cells, per group and
# pool size N. A metric the table lacks (an extraction prefix >= seq_len, never logged) is left out.
TEXT_SUMMARY_METRICS = (
    "mem_bits_per_sequence", "loss_f1", "reference_f1",
    *(extraction_name(split, prefix) for split in EXTRACTION_SPLITS for prefix in EXTRACTION_PREFIXES),
    "test_nll_bits_per_token", "capacity_ratio",
)


def seed_stats(sizes: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(levels, means, stds, counts) of `values` over the cells of each distinct size, ignoring NaN:
    the mean and sample std (ddof=1; 0 for one value) of the seeds at each size, NaN where none
    has a value. Levels ascend."""
    levels = np.unique(sizes)
    means, stds, counts = [], [], []
    for level in levels:
        seeds = values[(sizes == level) & np.isfinite(values)]
        counts.append(seeds.size)
        means.append(seeds.mean() if seeds.size else np.nan)
        stds.append(seeds.std(ddof=1) if seeds.size > 1 else (0.0 if seeds.size else np.nan))
    return levels, np.array(means), np.array(stds), np.array(counts, dtype=np.int64)


def summarise_text(cols: dict[str, np.ndarray], keys: tuple[str, ...]) -> dict:
    """The FINISHED text cells in `cols`, per (model shape, precision) group (also split by any
    other configuration that varies: corpus, tokenizer, reference model, recipe): for each pool size
    N ascending, the number of seeds and the seed mean and seed std of TEXT_SUMMARY_METRICS."""
    metrics = [m for m in TEXT_SUMMARY_METRICS if m in cols]
    groups = []
    for group in capacity_groups(cols, keys):
        rows = group.rows
        sizes = cols["data.num_sequences"][rows].astype(np.int64)
        entry = {
            "label": group.label, "model": group.key.get("model.name"),
            "precision": group.key.get("precision.name"), "group": group.varying,
            "vocab_size": group.key.get("data.vocab_size"), "seq_len": group.key.get("data.seq_len"),
            "params": float(cols["params"][rows][0]), "num_cells": int(rows.sum()),
            "num_sequences": [int(n) for n in np.unique(sizes)], "num_seeds": [], "mean": {}, "std": {},
        }
        for metric in metrics:
            _, means, stds, counts = seed_stats(sizes, cols[metric][rows])
            entry["mean"][metric], entry["std"][metric] = list(means), list(stds)
        entry["num_seeds"] = [int(c) for c in seed_stats(sizes, cols["mem_bits"][rows])[3]]
        groups.append(entry)
    return {
        "num_cells": int(len(cols["cell_id"])),
        "metrics": metrics,
        "statistics": "per group and pool size N (num_sequences, ascending): the mean over seeds (mean) and "
                      "the sample std over seeds (std, 0 for one seed) of each metric; null where no seed has it",
        "groups": groups,
    }


FADE_DEFINITION = (
    "memorized bits per training sequence, mem_bits / N, fall from b_knee at the size of the measured "
    "capacity to b_largest at the largest size. A model at its asymptote would hold b_asymptote = min(S log2 V, "
    "C / N_largest) there, C the group's capacity (extrapolated where there is one, else measured: a lower "
    "bound, which overstates the data's share). data_share = ln(b_knee / b_asymptote) / ln(b_knee / b_largest) "
    "is the part of the fall (in log terms) that data outgrowing the model explains; budget_share = 1 - "
    "data_share is what the training budget left unlearned")


def _seed_mean(values: np.ndarray, sizes: np.ndarray, n: int) -> float:
    chosen = values[sizes == n]
    chosen = chosen[np.isfinite(chosen)]
    return float(chosen.mean()) if chosen.size else math.nan


def mia_fade(cols: dict[str, np.ndarray], capacities: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """fits.json's `mia_fade`: per capacity group, how much of the fall of memorization per sequence from
    its capacity's size to its largest size is data outgrowing the model, and how much the training
    budget (FADE_DEFINITION), with the loss attack's AUC at both ends and the exposures and noise floor
    of the largest size. Groups whose largest size is the capacity's own are left out."""
    entries = []
    by_label = {c["label"]: c for c in capacities}
    for group in capacity_groups(cols, keys):
        c = by_label.get(group.label)
        sizes = cols["data.num_sequences"][group.rows].astype(np.int64)
        if c is None or int(sizes.max()) <= int(c["num_sequences_at_max"]):
            continue
        knee, largest = int(c["num_sequences_at_max"]), int(sizes.max())
        mean = {name: (lambda n, v=float_column(cols, name)[group.rows]: _seed_mean(v, sizes, n))
                for name in ("mem_bits", "mem_bits_floor", "exposures", "loss_auc", "loss_f1", "entropy_bits")}
        extrapolated = c.get("capacity_extrapolated_bits")
        capacity_bits = extrapolated if extrapolated is not None else c["capacity_bits"]
        sequence_bits = mean["entropy_bits"](largest) / largest
        b_knee, b_largest = c["capacity_bits"] / knee, mean["mem_bits"](largest) / largest
        b_asymptote = min(sequence_bits, capacity_bits / largest)
        entry = {"label": c["label"], "knee_num_sequences": knee, "largest_num_sequences": largest,
                 "bits_per_sequence_knee": b_knee, "bits_per_sequence_largest": b_largest,
                 "bits_per_sequence_at_asymptote": b_asymptote,
                 "capacity_used": "extrapolated" if extrapolated is not None else "measured (a lower bound)",
                 "floor_bits_per_sequence_largest": mean["mem_bits_floor"](largest) / largest,
                 "exposures_largest": mean["exposures"](largest), "loss_auc_knee": mean["loss_auc"](knee),
                 "loss_auc_largest": mean["loss_auc"](largest), "loss_f1_largest": mean["loss_f1"](largest),
                 "data_share": None, "budget_share": None}
        if b_knee > b_largest > 0 and b_asymptote > 0:
            share = min(1.0, max(0.0, math.log(b_knee / b_asymptote) / math.log(b_knee / b_largest)))
            entry.update(data_share=share, budget_share=1.0 - share)
        entries.append(entry)
    return entries


def fit_sweep(table: pa.Table, groups: Grouping, n_boot: int = N_BOOT) -> dict:
    """Every sweep-level fit of docs/science.md from a cells table; degenerate sweeps give partial results
    with the reason for what was skipped, never an exception. Capacity, alpha and the predictions use
    synthetic cells only; the MIA law is fitted per data kind; `skipped` gives the reason for each fit
    that could not be made, and `text` summarises the text cells."""
    statuses = table.column("status").to_pylist() if table.num_rows else []
    finished = finished_columns(table, groups)
    kinds = data_kinds(finished)
    cols, text = select_rows(finished, kinds == SYNTHETIC), select_rows(finished, kinds == TEXT)
    num_text = len(text["cell_id"])
    notes, skipped = [], {}
    capacities, seeds, extrapolated = fit_capacities(cols, groups.capacity, n_boot=n_boot)
    if not capacities:
        if num_text:
            reason = (f"no FINISHED synthetic cells (the sweep has {num_text} FINISHED text cells): capacity, "
                      "alpha and predictions are fitted on synthetic cells only (docs/science.md); the text "
                      "cells are summarised under `text` and have their own MIA law under `mia.text`")
            notes.append(reason)
        else:
            reason = "no FINISHED cells with mem_bits"
            notes.append(f"{reason}: no capacity, alpha or prediction")
        skipped = {"capacity": reason, "alpha": reason, "prediction": reason}
    elif num_text:
        notes.append(f"{num_text} FINISHED text cells are left out of capacity, alpha and predictions (synthetic "
                     "cells only), summarised under `text`, with their own MIA law under `mia.text`")
    others = sorted(set(kinds) - {SYNTHETIC, TEXT})
    if others:
        notes.append(f"{int(np.isin(kinds, others).sum())} FINISHED cells of data.kind {', '.join(others)} "
                     "are in no fit")
    alphas = fit_alphas(capacities, seeds, n_boot=n_boot, extrapolated=extrapolated)
    prediction = predict_cells(cols, alphas)
    if "prediction" in skipped:
        prediction["skipped"] = skipped["prediction"]
    return _clean({
        "cells": {"total": len(statuses), "finished": int(len(finished["cell_id"])),
                  "by_status": {s: statuses.count(s) for s in sorted(set(statuses))}},
        "capacity": capacities,
        "alpha": alphas,
        "mia": fit_mia(finished, alphas),
        "mia_published": published_constants(),
        "mia_fade": {"definition": FADE_DEFINITION, "groups": mia_fade(cols, capacities, groups.capacity)},
        "prediction": prediction,
        "skipped": skipped,
        "text": summarise_text(text, groups.text),
        "notes": notes,
    })


def metric_key(key: str, entry: dict) -> str:
    """An alpha group's name in MLflow metric names: its precision when the fits key it so, else
    `<precision>_V<V>_S<S>` and each varying recipe key's last part and value."""
    if key == entry.get("precision", key):
        return re.sub(r"[^A-Za-z0-9_.\-]", "_", key)
    parts = [str(entry.get("precision")), f"V{_value_text(entry.get('vocab_size'))}",
             f"S{_value_text(entry.get('seq_len'))}"]
    parts += [f"{k.split('.')[-1]}{_value_text(v)}" for k, v in (entry.get("group") or {}).items()
              if k not in (V_KEY, S_KEY)]
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", "_".join(parts))


def fit_metrics(fits: dict) -> dict[str, float]:
    """The fits as flat MLflow metrics for the launch run (finite values only): `alpha_<key>` is the
    measured slope (the alpha of predictions), `alpha_<key>_<statistic>[_ci_low|_ci_high]` each
    measured statistic, `alpha_<key>_extrapolated` and `alpha_<key>_extrapolated_<statistic>[...]` the
    extrapolated ones (metric_key names the group), `alpha_<key>[_extrapolated]_lower_bound` 0 or 1, `mia_<kind>_<attack>_<constant>` each identifiable
    law, `capacity_bits/...` and `capacity_extrapolated_bits/...` each group's capacities."""
    metrics = {"cells_total": fits["cells"]["total"], "cells_finished": fits["cells"]["finished"]}
    for key, fit in fits["alpha"].items():
        name = metric_key(key, fit)
        metrics[f"alpha_{name}"] = fit["alpha"]
        extrapolated = fit.get("extrapolated") or {}
        metrics[f"alpha_{name}_extrapolated"] = extrapolated.get("alpha")
        metrics[f"alpha_{name}_lower_bound"] = float(bool(fit["lower_bound"]))
        if extrapolated.get("available"):
            metrics[f"alpha_{name}_extrapolated_lower_bound"] = float(bool(extrapolated.get("lower_bound")))
        for statistic in ALPHA_DESCRIPTIONS:
            for value in ("alpha", "ci_low", "ci_high"):
                suffix = "" if value == "alpha" else f"_{value}"
                metrics[f"alpha_{name}_{statistic}{suffix}"] = fit[statistic][value]
                extrapolated_fit = extrapolated.get(statistic) or {}
                metrics[f"alpha_{name}_extrapolated_{statistic}{suffix}"] = extrapolated_fit.get(value)
    for kind, attacks in fits["mia"].items():
        for attack, fit in attacks.items():
            for name in ("c1", "c2", "c3", "c1_std", "c2_std", "c3_std", "rmse"):
                metrics[f"mia_{kind}_{attack}_{name}"] = fit.get(name)
    for c in fits["capacity"]:
        label = re.sub(r"[^A-Za-z0-9_.\- ]", "_", c["label"]).replace(" ", "/")
        metrics["capacity_bits/" + label] = c["capacity_bits"]
        metrics["capacity_extrapolated_bits/" + label] = c.get("capacity_extrapolated_bits")
    summary = fits["prediction"]["summary"]
    metrics["mem_prediction_mean_abs_error"] = summary.get("mean_abs_error")
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
