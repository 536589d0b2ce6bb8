"""A planted sweep table that exercises every branch of the sweep fits: three shapes in two precisions
with seeds, a memorization plateau at a known alpha, an MIA transition, one unconverged cell on a
plateau (without an extrapolable asymptote, so its group has no extrapolated capacity), asymptotes for
the other plateau cells, exposures and noise floors, a failed cell, and text cells beside the synthetic
ones. Built as MLflow runs are read (string params), so the fits see real column types. Used by the
golden-numbers test."""

from __future__ import annotations

import numpy as np

from tests.report.test_fits import C1, C2, C3, PLANTED_ALPHA, cell, planted_sweep
from tests.report.test_text_report import text_runs


def planted_table():
    from orchestrator.aggregate import build_cells_table

    runs = planted_sweep(seeds=(0, 1, 2), noise=0.02, rng_seed=3)
    rng = np.random.default_rng(7)
    for r in runs:  # an MIA transition with noise, and an AUC beside it
        x = r.metrics["sequences_per_param"]
        r.metrics["loss_f1"] = float(np.clip(0.5 * (1 + C1 * 1 / (1 + np.exp(-(C2 * x + C3))))
                                             + 0.01 * rng.standard_normal(), 0.5, 1.0))
        r.metrics["loss_auc"] = float(min(1.0, r.metrics["loss_f1"] + 0.02))
    largest = max(int(r.params["data.num_sequences"]) for r in runs if r.params["model.name"] == "l2_d64")
    for r in runs:  # one unconverged plateau cell: its shape's capacity is a lower bound
        if r.params["model.name"] == "l2_d64" and int(r.params["data.num_sequences"]) == largest \
                and r.params["seed"] == "1" and r.params["precision.name"] == "fp32":
            r.metrics["converged"] = 0.0
    for r in runs:  # annealed branches: an asymptote 8% above each plateau cell, the others converged at theirs
        m = r.metrics
        plateau = m["entropy_bits"] > PLANTED_ALPHA[r.params["precision.name"]] * m["params"]
        m.update({"exposures": 50.0 * m["params"] / (m["entropy_bits"] / 704), "num_branches": 6.0,
                  "last_horizon_steps": 16000.0, "mem_bits_floor": 0.002 * m["entropy_bits"],
                  "asymptote_extrapolable": 1.0 if plateau else 0.0})
        if plateau and m["converged"] == 1.0:
            a = 1.08 * m["mem_bits"]
            m.update({"mem_bits_asymptote": a, "mem_bits_asymptote_ci_low": a - 0.03 * a,
                      "mem_bits_asymptote_ci_high": a + 0.05 * a, "asymptote_exponent": 0.6,
                      "fraction_of_asymptote": m["mem_bits"] / a})
        # The unconverged l2_d64 fp32 cell has no extrapolable fit: its group has no extrapolated capacity.
    runs.append(cell(len(runs), "l1_d32", "fp32", 77, 0, 0.0, status="FAILED"))
    return build_cells_table(runs + text_runs(), metadata={"sweep": "planted", "notes": []})


def planted_fits() -> dict:
    from measure.sweep import fit_sweep
    from orchestrator.aggregate import GROUPING

    return fit_sweep(planted_table(), GROUPING, n_boot=200)
