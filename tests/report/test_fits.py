"""Sweep-level fits: rows grouped and fed to measure.capacity recover planted capacities, alphas per
precision and the MIA law, with intervals; degenerate sweeps give reasons instead of exceptions.

The tables are built by the same code that builds them from MLflow runs (build_cells_table over
RunRecords whose params are strings, as MLflow stores them), so grouping sees real column types.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from measure.capacity import mia_law
from measure.sweep import fit_metrics, fit_sweep, plateau_reached
from orchestrator.aggregate import GROUPING, build_cells_table
from orchestrator.tracking import RunRecord

V, S = 2048, 64
BITS_PER_SEQUENCE = S * math.log2(V)  # 704
SHAPES = {"l1_d32": (1, 32), "l2_d64": (2, 64), "l4_d128": (4, 128)}
PLANTED_ALPHA = {"fp32": 3.8, "bf16": 3.5}
C1, C2, C3 = 1.34, -33.14, 33.14 * 0.0337  # the published law in x = N / params


MORE_SHAPES = {"l1_d48": (1, 48), "l2_d96": (2, 96)}  # with SHAPES: five shapes, enough for a confidence interval


def params_of(layers, width, vocab=V, seq_len=S):
    return vocab * width + seq_len * width + layers * (12 * width * width + 13 * width) + 3 * width


def cell(i, model, precision, size, seed, mem, *, status="FINISHED", converged=1.0, extra=None, vocab=V, seq_len=S):
    layers, width = {**SHAPES, **MORE_SHAPES}[model]
    p = params_of(layers, width, vocab, seq_len)
    entropy = size * seq_len * math.log2(vocab)
    x = size / p
    metrics = {"params": p, "params_paper": p - width, "entropy_bits": entropy, "mem_bits": mem,
               "sequences_per_param": x, "converged": converged, "test_nll_bits_per_token": 11.0,
               "loss_f1": float(mia_law(x, C1, C2, C3)), "loss_auc": 1.0, **(extra or {})}
    params = {"model.name": model, "model.n_layer": str(layers), "model.n_head": "4", "model.n_embd": str(width),
              "data.vocab_size": str(vocab), "data.seq_len": str(seq_len), "data.num_sequences": str(size),
              "data.num_nonmembers": "512", "data.kind": "synthetic", "precision.name": precision,
              "seed": str(seed), "train.lr": "0.001", "train.max_steps": "1000"}
    return RunRecord(f"run{i}", "1", status, i, i + 1, {"cell_id": f"c{i}", "memsweep.kind": "cell"},
                     params, metrics if status == "FINISHED" else {})


def planted_sweep(precisions=("fp32", "bf16"), seeds=(0, 1, 2), noise=0.01, rng_seed=0, *, shapes=SHAPES,
                  alphas=PLANTED_ALPHA, vocab=V, seq_len=S, first=0):
    """Every shape at sizes from a tenth to four times its capacity; mem = min(alpha P, H) with
    multiplicative noise, so each shape's plateau is alpha * P."""
    rng = np.random.default_rng(rng_seed)
    runs, i = [], first
    bits_per_sequence = seq_len * math.log2(vocab)
    for precision in precisions:
        for model, (layers, width) in shapes.items():
            capacity_sequences = alphas[precision] * params_of(layers, width, vocab, seq_len) / bits_per_sequence
            for factor in (0.1, 0.3, 0.7, 1.5, 4.0):
                size = int(capacity_sequences * factor)
                for seed in seeds:
                    cap = alphas[precision] * params_of(layers, width, vocab, seq_len)
                    mem = min(cap, size * bits_per_sequence) * (1 + noise * rng.standard_normal())
                    runs.append(cell(i, model, precision, size, seed, mem, vocab=vocab, seq_len=seq_len))
                    i += 1
    return runs


def with_asymptotes(runs, reached=0.85, noise=0.01, half_width=0.04, rng_seed=5):
    """Cells trained with annealed branches: each cell's true asymptote is its planted mem_bits (the
    capacity law); the plateau cells (H(X) above alpha P) stopped at `reached` of it, unconverged, with
    an extrapolable fit A within `noise` of it and a 95% interval of +-`half_width`; the others
    converged, with an extrapolable fit whose A overshoots H(X) by 20% (capped at H(X))."""
    rng = np.random.default_rng(rng_seed)
    for r in runs:
        m = r.metrics
        truth, entropy = m["mem_bits"], m["entropy_bits"]
        plateau = entropy > 1.05 * truth  # below capacity the truth is H(X) itself (up to the noise)
        a = truth * (1 + noise * rng.standard_normal()) if plateau else 1.2 * entropy
        m.update({"asymptote_extrapolable": 1.0, "mem_bits_asymptote": a,
                  "mem_bits_asymptote_ci_low": a - half_width * truth, "mem_bits_asymptote_ci_high": a + half_width * truth,
                  "asymptote_exponent": 0.7, "exposures": 100.0 * entropy / 1e5, "num_branches": 6.0,
                  "last_horizon_steps": 8000.0, "mem_bits_floor": 12.5})
        if plateau:
            m["mem_bits"] = reached * truth
            m["converged"] = 0.0
            m["fraction_of_asymptote"] = m["mem_bits"] / a
        else:
            m["fraction_of_asymptote"] = m["mem_bits"] / a
    return runs


def test_capacity_and_alpha_per_precision_recover_the_plateau():
    fits = fit_sweep(build_cells_table(planted_sweep()), GROUPING)
    assert len(fits["capacity"]) == 6  # 3 shapes x 2 precisions, never mixed
    for c in fits["capacity"]:
        planted = PLANTED_ALPHA[c["precision"]] * c["params"]
        # The seed-mean maximum over sizes sits on the plateau, within noise (1% per cell).
        assert c["capacity_bits"] == pytest.approx(planted, rel=0.03)
        assert len(c["seed_capacities_bits"]) == 3 and c["seed_std_bits"] > 0
        assert not c["lower_bound"] and c["plateau_reached"]
        assert c["lower_bound_cells"] == [] and c["lower_bound_num_sequences"] == []
        assert c["bits_per_param"] == pytest.approx(c["capacity_bits"] / c["params"])
    paper = {"fp32": (3.875, 3.828), "bf16": (3.602, 3.517)}
    for precision, planted in PLANTED_ALPHA.items():
        alpha = fits["alpha"][precision]
        assert alpha["alpha"] == alpha["slope"]["alpha"] and alpha["alpha_statistic"] == "slope"
        for statistic, paper_value in zip(("slope", "mean_ratio"), paper[precision]):
            fit = alpha[statistic]
            assert fit["alpha"] == pytest.approx(planted, rel=0.02), statistic
            assert fit["ci_low"] < fit["alpha"] < fit["ci_high"], statistic
            assert fit["ci_high"] - fit["ci_low"] < 0.05 * planted  # 1% noise, 3 seeds: a tight interval
            assert round(fit["paper"], 3) == paper_value, statistic  # the paper's, computed the same way
        assert alpha["n_models"] == 3 and "shapes" in alpha["bootstrap"] and "note" not in alpha
    metrics = fit_metrics(fits)
    assert metrics["alpha_fp32"] == pytest.approx(fits["alpha"]["fp32"]["slope"]["alpha"])
    assert metrics["alpha_bf16_mean_ratio"] == pytest.approx(fits["alpha"]["bf16"]["mean_ratio"]["alpha"])
    assert {"alpha_bf16_slope_ci_low", "alpha_bf16_slope_ci_high", "alpha_fp32_mean_ratio_ci_low",
            "cells_finished"} <= set(metrics)


def _with_unconverged(runs, model, choose):
    """The runs with `converged` = 0 on the cells of `model` at the size `choose(sizes, capacity_sizes)`
    picks, where capacity_sizes are the sizes whose H(X) exceeds the plateau."""
    sizes = sorted({int(r.params["data.num_sequences"]) for r in runs if r.params["model.name"] == model})
    layers, width = SHAPES[model]
    beyond = [n for n in sizes if n * BITS_PER_SEQUENCE > PLANTED_ALPHA["fp32"] * params_of(layers, width)]
    target = choose(sizes, beyond)
    for r in runs:
        if r.params["model.name"] == model and int(r.params["data.num_sequences"]) == target:
            r.metrics["converged"] = 0.0
    return runs, target


def test_an_unconverged_plateau_cell_away_from_the_maximum_makes_a_lower_bound():
    runs = planted_sweep(precisions=("fp32",), seeds=(0,), noise=0.0)
    # Plateau cells all equal alpha*P, the smallest N among them wins the tie: flag the LARGEST one.
    runs, target = _with_unconverged(runs, "l2_d64", lambda sizes, beyond: beyond[-1])
    fits = fit_sweep(build_cells_table(runs), GROUPING)
    caps = {c["model"]: c for c in fits["capacity"]}
    assert caps["l2_d64"]["num_sequences_at_max"] != target
    assert {m: c["lower_bound"] for m, c in caps.items()} == {"l1_d32": False, "l2_d64": True, "l4_d128": False}
    assert caps["l2_d64"]["lower_bound_num_sequences"] == [target] and len(caps["l2_d64"]["lower_bound_cells"]) == 1
    assert fits["alpha"]["fp32"]["lower_bound"] is True
    assert fits["alpha"]["fp32"]["lower_bound_models"] == ["l2_d64 fp32"]


def test_an_unconverged_cell_below_the_capacity_makes_no_lower_bound():
    runs = planted_sweep(precisions=("fp32",), seeds=(0,), noise=0.0)
    runs, _ = _with_unconverged(runs, "l2_d64", lambda sizes, beyond: sizes[0])  # H(X) far below alpha*P
    fits = fit_sweep(build_cells_table(runs), GROUPING)
    assert not any(c["lower_bound"] for c in fits["capacity"]) and fits["alpha"]["fp32"]["lower_bound"] is False


def test_mia_law_recovers_a_planted_sigmoid_with_its_uncertainty():
    rng = np.random.default_rng(1)
    runs = []
    for i, size in enumerate(np.geomspace(200, 60000, 24).astype(int)):
        r = cell(i, "l2_d64", "fp32", int(size), 0, 1000.0)
        x = r.metrics["sequences_per_param"]
        r.metrics["loss_f1"] = float(mia_law(x, C1, C2, C3) + 0.005 * rng.standard_normal())
        r.metrics["reference_f1"] = float(mia_law(x, 1.0, -20.0, 0.5))  # a second attack, exact
        runs.append(r)
    fits = fit_sweep(build_cells_table(runs), GROUPING)
    assert list(fits["mia"]) == ["synthetic"]  # no text cells: no text law
    loss = fits["mia"]["synthetic"]["loss"]
    assert loss["identifiable"] is True and loss["num_cells"] == 24 and loss["kind"] == "synthetic"
    for name, planted, tolerance in (("c1", C1, 0.05), ("c2", C2, 0.15), ("c3", C3, 0.15)):
        assert loss[name] == pytest.approx(planted, rel=tolerance), name
        assert abs(loss[name] - planted) < 4 * loss[f"{name}_std"], name  # the interval covers it
    assert loss["rmse"] < 0.01
    assert "published" not in loss  # the paper fitted on text: its forms sit beside text laws only
    reference = fits["mia"]["synthetic"]["reference"]  # any <attack>_f1 column is fitted the same way
    assert reference["c1"] == pytest.approx(1.0, rel=1e-3) and reference["c2"] == pytest.approx(-20.0, rel=1e-3)
    assert fit_metrics(fits)["mia_synthetic_loss_c2"] == pytest.approx(loss["c2"])


@pytest.mark.parametrize("level, noise", [(1.0, -0.015), (0.5, 0.015)])
def test_cells_without_a_transition_give_no_constants(level, noise):
    """Every F1 ~1 (the laptop sweep: a step placed beyond the data fitted to RMSE 2e-9) or every F1 ~0.5."""
    rng = np.random.default_rng(2)
    runs = []
    for i, size in enumerate(np.geomspace(200, 60000, 12).astype(int)):
        r = cell(i, "l2_d64", "fp32", int(size), 0, 1000.0)
        r.metrics["loss_f1"] = level + noise * rng.random()
        runs.append(r)
    fits = fit_sweep(build_cells_table(runs), GROUPING)
    loss = fits["mia"]["synthetic"]["loss"]
    assert loss["identifiable"] is False and f"within 0.02 of {level:g}" in loss["reason"]
    assert not {"c1", "c2", "c3", "rmse"} & set(loss) and loss["num_cells"] == 12
    assert not any(k.startswith("mia_") for k in fit_metrics(fits))


def test_one_shape_has_alpha_without_an_interval_and_a_reason_for_no_mia_law():
    runs = [cell(i, "l1_d32", "fp32", size, seed, mem)
            for i, (size, seed, mem) in enumerate([(16, 0, 11000.0), (16, 1, 11200.0), (64, 0, 40000.0), (64, 1, 41000.0)])]
    fits = fit_sweep(build_cells_table(runs), GROUPING)
    (c,) = fits["capacity"]
    assert c["capacity_bits"] == pytest.approx(40500.0) and c["num_sequences_at_max"] == 64
    assert c["plateau_reached"] is False  # one size beyond the capacity: more data might raise it
    alpha = fits["alpha"]["fp32"]
    for statistic in ("slope", "mean_ratio"):
        assert alpha[statistic]["alpha"] == pytest.approx(40500.0 / c["params"])
        assert alpha[statistic]["ci_low"] is None and alpha[statistic]["ci_high"] is None
    assert "one shape" in alpha["note"] and alpha["bootstrap"] == "none"
    assert "alpha_fp32_slope_ci_low" not in fit_metrics(fits) and "alpha_fp32_slope" in fit_metrics(fits)
    loss = fits["mia"]["synthetic"]["loss"]
    assert loss["identifiable"] is False and "at 2" in loss["reason"] and "c1" not in loss


def test_predictions_use_the_fitted_alpha_of_each_cells_precision():
    fits = fit_sweep(build_cells_table(planted_sweep(seeds=(0,))), GROUPING)
    cells = fits["prediction"]["cells"]
    assert len(cells) == 30
    for c in cells:
        alpha = fits["alpha"][c["precision"]]["alpha"]
        assert c["alpha"] == alpha and c["alpha_source"] == "fitted slope"
        assert c["predicted_mem_bits"] == pytest.approx(min(alpha * c["params"], c["entropy_bits"]))
        assert c["error"] == pytest.approx((c["mem_bits"] - c["predicted_mem_bits"]) / c["predicted_mem_bits"])
    assert fits["prediction"]["summary"]["mean_abs_error"] < 0.03


def test_a_sweep_with_nothing_finished_reports_why():
    runs = [cell(i, "l1_d32", "fp32", 16 * (i + 1), 0, 0.0, status="FAILED") for i in range(3)]
    fits = fit_sweep(build_cells_table(runs), GROUPING)
    assert fits["capacity"] == [] and fits["alpha"] == {} and fits["prediction"]["summary"] == {"num_cells": 0}
    assert fits["cells"] == {"total": 3, "finished": 0, "by_status": {"FAILED": 3}}
    assert any("no FINISHED cells" in note for note in fits["notes"])
    assert fit_metrics(fits) == {"cells_total": 3.0, "cells_finished": 0.0}


def test_a_plateau_needs_two_sizes_beyond_the_capacity_that_agree():
    sizes = np.array([10, 20, 40, 80])
    entropy = sizes * 100.0
    flat = np.array([1000.0, 2000.0, 2500.0, 2520.0])  # stops at ~2,500 bits
    growing = np.array([1000.0, 2000.0, 2500.0, 2900.0])  # +16% from 40 to 80 sequences
    assert plateau_reached(sizes, flat, entropy, 2520.0)
    assert not plateau_reached(sizes, growing, entropy, 2900.0)
    assert not plateau_reached(sizes[:3], flat[:3], entropy[:3], 2500.0)  # only one size beyond it


def _summary(fits, capsys) -> str:
    from orchestrator.cli import _aggregate_summary

    _aggregate_summary(SimpleNamespace(fits={**fits, "sweep": "planted"}))
    captured = capsys.readouterr()
    return " ".join((captured.out + captured.err).split())  # the console may wrap long lines


def test_the_console_summary_shows_lower_bounds_both_alphas_and_the_laws(capsys):
    runs, target = _with_unconverged(planted_sweep(precisions=("fp32",), seeds=(0,), noise=0.0), "l2_d64",
                                     lambda sizes, beyond: beyond[-1])
    fits = fit_sweep(build_cells_table(runs), GROUPING, n_boot=50)
    text = _summary(fits, capsys)
    (bound,) = [c for c in fits["capacity"] if c["model"] == "l2_d64"]
    assert f"capacity l2_d64 fp32: measured {bound['capacity_bits']:,.0f} bits" in text
    assert f"a lower bound: 1 unconverged plateau cell(s) at N = {target:,}" in text
    assert "extrapolated: none (not available: the cells logged no asymptote)" in text  # an old table
    assert "capacity l1_d32 fp32" not in text  # converged capacities are in the report, not repeated here
    assert "alpha fp32 (bits/param, over 3 shape(s); measured is a lower bound: l2_d64 fp32):" in text
    slope, ratio = fits["alpha"]["fp32"]["slope"], fits["alpha"]["fp32"]["mean_ratio"]
    interval = f"range [{slope['ci_low']:.3f}, {slope['ci_high']:.3f}] (under 5 shapes: not a 95% CI)"
    assert f"measured slope through origin {slope['alpha']:.3f}, {interval}; paper 3.875" in text
    assert f"measured mean of capacity/params {ratio['alpha']:.3f}, range [" in text and "paper 3.828" in text
    assert "95% [" not in text  # three shapes: a range, never called a confidence interval
    assert "MIA law (synthetic, loss): c1=" in text and "1 of its 15 cells unconverged" in text


def test_the_console_summary_gives_both_forms_of_capacity_and_alpha(capsys):
    fits = fit_sweep(build_cells_table(with_asymptotes(planted_sweep(precisions=("fp32",), seeds=(0, 1),
                                                                     shapes={**SHAPES, **MORE_SHAPES}))),
                     GROUPING, n_boot=100)
    text = _summary(fits, capsys)
    for c in fits["capacity"]:
        assert (f"capacity {c['label']}: measured {c['capacity_bits']:,.0f} bits ({c['bits_per_param']:.3f} "
                "bits/param; a lower bound: 4 unconverged plateau cell(s)") in text
        assert (f"extrapolated {c['capacity_extrapolated_bits']:,.0f} bits [{c['capacity_extrapolated_ci_low']:,.0f}, "
                f"{c['capacity_extrapolated_ci_high']:,.0f}] ({c['bits_per_param_extrapolated']:.3f} bits/param; an "
                f"extrapolation; plateau cells reached {c['fraction_of_asymptote']:.2f} of their asymptotes)") in text
    e = fits["alpha"]["fp32"]["extrapolated"]["slope"]
    assert f"extrapolated slope through origin {e['alpha']:.3f}, 95% [{e['ci_low']:.3f}, {e['ci_high']:.3f}] " \
           "(an extrapolation)" in text  # five shapes: a confidence interval
    assert "over 5 shape(s)" in text and "range [" not in text


# -- the extrapolated forms, alpha per (precision, V, S, recipe), ranges, the MIA law's identifiability -----
def test_extrapolated_capacity_and_alpha_recover_planted_asymptotes_beside_the_measured_lower_bounds():
    fits = fit_sweep(build_cells_table(with_asymptotes(planted_sweep(precisions=("fp32",)))), GROUPING, n_boot=300)
    assert len(fits["capacity"]) == 3
    for c in fits["capacity"]:
        planted = PLANTED_ALPHA["fp32"] * c["params"]
        # Measured: 85% of the plateau, a lower bound (its plateau cells did not converge).
        assert c["capacity_bits"] == pytest.approx(0.85 * planted, rel=0.03) and c["lower_bound"]
        # Extrapolated: the planted asymptote, with an interval that covers it.
        assert c["extrapolated_reason"] is None and c["extrapolated_missing_cells"] == []
        assert c["capacity_extrapolated_bits"] == pytest.approx(planted, rel=0.03)
        assert c["capacity_extrapolated_ci_low"] < planted < c["capacity_extrapolated_ci_high"]
        assert c["capacity_extrapolated_ci_high"] - c["capacity_extrapolated_ci_low"] < 0.1 * planted
        assert c["bits_per_param_extrapolated"] == pytest.approx(c["capacity_extrapolated_bits"] / c["params"])
        assert c["fraction_of_asymptote"] == pytest.approx(0.85, rel=0.03) and c["fraction_of_asymptote_cells"] == 6
        assert c["extrapolated_cells"]["asymptote"] == 15 and c["extrapolated_cells"]["capped_at_entropy"] == 9
        assert "an extrapolation" in c["extrapolated_note"] and "bootstrap" in c["capacity_extrapolated_interval"]
    alpha = fits["alpha"]["fp32"]
    assert alpha["slope"]["alpha"] == pytest.approx(0.85 * 3.8, rel=0.03) and alpha["lower_bound"]
    extrapolated = alpha["extrapolated"]
    assert extrapolated["available"] and alpha["alpha_extrapolated"] == extrapolated["slope"]["alpha"]
    for statistic in ("slope", "mean_ratio"):
        fit = extrapolated[statistic]
        assert fit["alpha"] == pytest.approx(3.8, rel=0.03), statistic
        assert fit["ci_low"] < 3.8 < fit["ci_high"], statistic
        assert fit["paper"] == alpha[statistic]["paper"]
    assert "an extrapolation" in extrapolated["note"] and "asymptote" in extrapolated["bootstrap"]
    metrics = fit_metrics(fits)
    assert metrics["alpha_fp32_extrapolated"] == pytest.approx(extrapolated["slope"]["alpha"])
    assert metrics["alpha_fp32_extrapolated_mean_ratio_ci_high"] == pytest.approx(extrapolated["mean_ratio"]["ci_high"])
    assert metrics["capacity_extrapolated_bits/l2_d64/fp32"] == pytest.approx(
        [c for c in fits["capacity"] if c["model"] == "l2_d64"][0]["capacity_extrapolated_bits"])
    by_id = {r["cell_id"]: r for r in fits["prediction"]["cells"]}
    assert all(r["exposures"] > 0 and r["mem_bits_floor"] == 12.5 for r in by_id.values())
    assert all(r["mem_bits_extrapolated"] <= r["entropy_bits"] for r in by_id.values())  # capped at H(X)


def test_an_unconverged_plateau_cell_without_an_extrapolable_fit_makes_its_group_s_extrapolation_a_lower_bound():
    runs = with_asymptotes(planted_sweep(precisions=("fp32",), seeds=(0,)))
    complete = {c["model"]: c for c in fit_sweep(build_cells_table(runs), GROUPING, n_boot=50)["capacity"]}
    largest = max(int(r.params["data.num_sequences"]) for r in runs if r.params["model.name"] == "l2_d64")
    (lost,) = [r for r in runs if r.params["model.name"] == "l2_d64" and int(r.params["data.num_sequences"]) == largest]
    lost.metrics["asymptote_extrapolable"] = 0.0  # unconverged, on the plateau, and no fit
    for name in ("mem_bits_asymptote", "mem_bits_asymptote_ci_low", "mem_bits_asymptote_ci_high", "fraction_of_asymptote"):
        del lost.metrics[name]
    fits = fit_sweep(build_cells_table(runs), GROUPING, n_boot=50)
    caps = {c["model"]: c for c in fits["capacity"]}
    bad = caps["l2_d64"]
    assert not complete["l2_d64"]["extrapolated_lower_bound"]
    assert bad["extrapolated_lower_bound"] and bad["capacity_extrapolated_bits"] is not None  # from the others
    assert bad["capacity_extrapolated_bits"] <= complete["l2_d64"]["capacity_extrapolated_bits"]
    assert "a lower bound of the extrapolation: 1 unconverged plateau cell(s)" in bad["extrapolated_reason"]
    assert bad["extrapolated_missing_cells"] == [lost.tags["cell_id"]] and f"N = {largest:,}" in bad["extrapolated_reason"]
    assert bad["capacity_bits"] > 0 and bad["lower_bound"]  # the measured form is there as ever
    assert not caps["l1_d32"]["extrapolated_lower_bound"]  # the other shapes keep theirs
    extrapolated = fits["alpha"]["fp32"]["extrapolated"]
    assert extrapolated["available"] and extrapolated["lower_bound"]
    assert extrapolated["lower_bound_models"] == ["l2_d64 fp32"]
    assert "alpha_fp32_extrapolated" in fit_metrics(fits)


def test_alpha_is_fitted_per_data_shape_never_pooled_across_them():
    wide = planted_sweep(precisions=("fp32",), seeds=(0, 1))
    narrow = planted_sweep(precisions=("fp32",), seeds=(0, 1), alphas={"fp32": 3.0}, vocab=512, first=len(wide))
    fits = fit_sweep(build_cells_table(wide + narrow), GROUPING, n_boot=100)
    assert len(fits["capacity"]) == 6
    assert set(fits["alpha"]) == {"fp32 (V=2048, S=64)", "fp32 (V=512, S=64)"}  # two groups, not one of 6 shapes
    for key, planted, vocab in (("fp32 (V=2048, S=64)", 3.8, 2048), ("fp32 (V=512, S=64)", 3.0, 512)):
        alpha = fits["alpha"][key]
        assert alpha["n_models"] == 3 and alpha["precision"] == "fp32" and alpha["key"] == key
        assert alpha["vocab_size"] == vocab and alpha["seq_len"] == 64 and alpha["group"] == {"data.vocab_size": vocab}
        assert alpha["slope"]["alpha"] == pytest.approx(planted, rel=0.02)
        assert all(f"data.vocab_size={vocab}" in c["label"] for c in fits["capacity"] if c["alpha_key"] == key)
    for record in fits["prediction"]["cells"]:  # each cell predicted with its own group's alpha
        vocab = 512 if int(record["cell_id"][1:]) >= len(wide) else 2048
        assert record["alpha"] == fits["alpha"][f"fp32 (V={vocab}, S=64)"]["alpha"]
    metrics = fit_metrics(fits)
    assert metrics["alpha_fp32_V512_S64"] == pytest.approx(fits["alpha"]["fp32 (V=512, S=64)"]["alpha"])
    assert "alpha_fp32_V2048_S64_mean_ratio" in metrics and "alpha_fp32" not in metrics


def test_alpha_is_fitted_per_recipe():
    runs = planted_sweep(precisions=("fp32",), seeds=(0,))
    other = planted_sweep(precisions=("fp32",), seeds=(0,), first=len(runs))
    for r in other:
        r.params["train.lr"] = "0.003"
    fits = fit_sweep(build_cells_table(runs + other), GROUPING, n_boot=50)
    assert sorted(fits["alpha"]) == ["fp32 (V=2048, S=64, train.lr=0.001)", "fp32 (V=2048, S=64, train.lr=0.003)"]
    assert all(a["n_models"] == 3 and set(a["recipe"]) == {"train.lr"} for a in fits["alpha"].values())


@pytest.mark.parametrize("shapes, kind", [(SHAPES, "range"), ({**SHAPES, **MORE_SHAPES}, "ci")])
def test_an_alpha_over_fewer_than_five_shapes_is_a_range(shapes, kind):
    fits = fit_sweep(build_cells_table(with_asymptotes(planted_sweep(precisions=("fp32",), seeds=(0, 1), shapes=shapes))),
                     GROUPING, n_boot=100)
    alpha = fits["alpha"]["fp32"]
    assert alpha["n_models"] == len(shapes) and alpha["interval_kind"] == kind
    assert alpha["extrapolated"]["interval_kind"] == kind
    assert ("a range, not a 95% confidence interval" in alpha["interval_note"]) == (kind == "range")
    assert alpha["slope"]["ci_low"] < alpha["slope"]["alpha"] < alpha["slope"]["ci_high"]


def test_a_two_tailed_mia_law_is_not_identifiable_until_a_cell_lies_inside_the_transition():
    sizes = [200, 300, 500, 800, 20000, 30000, 45000, 60000]  # l2_d64: x from ~0.001 to ~0.25
    runs = []
    for i, size in enumerate(sizes):
        r = cell(i, "l2_d64", "fp32", size, 0, 1000.0, converged=0.0 if i in (1, 6) else 1.0)
        r.metrics["loss_f1"] = 0.99 + 0.002 * i if i < 4 else 0.5 + 0.003 * i  # ~1, then ~0.5, nothing between
        runs.append(r)
    loss = fit_sweep(build_cells_table(runs), GROUPING)["mia"]["synthetic"]["loss"]
    assert loss["identifiable"] is False and "no cell inside the transition (0.55 < F1 < 0.95)" in loss["reason"]
    assert "do not fix its steepness c2" in loss["reason"] and "c2" not in loss
    assert loss["unconverged_cells"] == ["c1", "c6"]
    middle = cell(len(runs), "l2_d64", "fp32", 8000, 0, 1000.0)
    middle.metrics["loss_f1"] = 0.75
    loss = fit_sweep(build_cells_table(runs + [middle]), GROUPING)["mia"]["synthetic"]["loss"]
    assert loss["identifiable"] is True and {"c1", "c2", "c3"} <= set(loss)
    assert loss["unconverged_cells"] == ["c1", "c6"]


def test_a_table_without_the_asymptote_columns_fits_as_before():
    table = build_cells_table(planted_sweep(seeds=(0, 1)))
    for old in (table, table.drop_columns([n for n in ("converged", "mem_bits_floor", "exposures")
                                           if n in table.column_names])):
        fits = fit_sweep(old, GROUPING, n_boot=50)
        assert len(fits["capacity"]) == 6 and set(fits["alpha"]) == {"fp32", "bf16"}
        for c in fits["capacity"]:
            assert c["capacity_bits"] > 0 and c["capacity_extrapolated_bits"] is None
            assert c["extrapolated_reason"] == "not available: the cells logged no asymptote"
            assert c["fraction_of_asymptote"] is None
        for a in fits["alpha"].values():
            assert a["extrapolated"] == {"available": False, "reason": "not available: the cells logged no asymptote",
                                         "alpha": None}
        assert all(r["exposures"] is None and r["mem_bits_extrapolated"] is None for r in fits["prediction"]["cells"])
        assert "unconverged_cells" in fits["mia"]["synthetic"]["loss"]
        metrics = fit_metrics(fits)
        assert "alpha_fp32" in metrics and not any("extrapolated" in k for k in metrics)


def test_the_mia_fade_splits_the_fall_in_bits_per_sequence_between_data_and_training_budget():
    """Cells at their asymptote (planted mem = min(alpha P, H)): the whole fall from the capacity's size
    to the largest is data outgrowing the model (data share 1). The largest size under-trained to a
    tenth of its asymptote: the budget's share is ln(10) / ln(b_knee / b_largest), exactly."""
    runs = planted_sweep(precisions=("fp32",), seeds=(0,), noise=0.0)
    fits = fit_sweep(build_cells_table(runs), GROUPING, n_boot=20)
    (g, *_) = [g for g in fits["mia_fade"]["groups"] if g["label"].startswith("l1_d32")]
    assert g["data_share"] == pytest.approx(1.0) and g["budget_share"] == pytest.approx(0.0, abs=1e-12)
    assert g["capacity_used"] == "measured (a lower bound)"  # no asymptotes logged

    largest = max(int(r.params["data.num_sequences"]) for r in runs if r.params["model.name"] == "l1_d32")
    (cell_,) = [r for r in runs if r.params["model.name"] == "l1_d32" and int(r.params["data.num_sequences"]) == largest]
    cell_.metrics["mem_bits"] /= 10  # a tenth of what the model could hold there
    cell_.metrics.update(exposures=12.0, mem_bits_floor=3.0, loss_auc=0.55)
    fits = fit_sweep(build_cells_table(runs), GROUPING, n_boot=20)
    (g, *_) = [g for g in fits["mia_fade"]["groups"] if g["label"].startswith("l1_d32")]
    b_knee, b_largest = g["bits_per_sequence_knee"], g["bits_per_sequence_largest"]
    assert g["bits_per_sequence_at_asymptote"] == pytest.approx(10 * b_largest)
    assert g["budget_share"] == pytest.approx(math.log(10) / math.log(b_knee / b_largest))
    assert g["data_share"] + g["budget_share"] == pytest.approx(1.0)
    assert (g["exposures_largest"], g["floor_bits_per_sequence_largest"], g["loss_auc_largest"]) == (
        12.0, 3.0 / largest, 0.55)
    assert "data_share" in fits["mia_fade"]["definition"]
