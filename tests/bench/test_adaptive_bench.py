"""bench/adaptive.py: `--quick` gives the paper grid's dry-run totals, fixed against adaptive (no
training), and the laptop comparison holds its targets to the figures it is given."""

import json

import pytest

from bench.adaptive import PAPER_TARGET, compare_laptop, main


def laptop(capacities, alpha, flops, wall_s=100.0):
    shapes = {f"l{i + 1}_d16 fp32": {"capacity_bits": c, "num_sequences_at_max": 256, "plateau_reached": True,
                                     "lower_bound": True} for i, c in enumerate(capacities)}
    return {"shapes": shapes, "alpha": {"slope": alpha, "mean_ratio": alpha}, "train_flops": flops,
            "wall_s": wall_s, "cells": 8, "num_sequences": {}}


def test_the_laptop_targets_are_three_percent_and_sixty_percent_of_the_flops():
    fixed = laptop([12_000, 20_000], 2.5, 1e12)
    ok, figures = compare_laptop(fixed, laptop([11_700, 20_500], 2.45, 0.6e12))
    assert ok and figures["flops_ratio"] == 0.6 and round(figures["capacity"]["l1_d16 fp32"], 3) == 0.025
    assert not compare_laptop(fixed, laptop([11_600, 20_000], 2.5, 0.5e12))[0]  # a capacity 3.3% off
    assert not compare_laptop(fixed, laptop([12_000, 20_000], 2.5, 0.61e12))[0]  # 61% of the FLOPs


@pytest.mark.slow  # composes the 1,760 cells of paper_synthetic
def test_quick_gives_the_paper_totals(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    (written,) = tmp_path.glob("adaptive-*.json")
    paper = json.loads(written.read_text())["paper"]
    assert paper["fixed"]["cells"] == 1760 and paper["adaptive_round_1"]["cells"] == 480
    assert paper["capacity_multiples"]["cells"] == 800
    assert paper["seeds"] == [0, 1, 2, 3, 4] and paper["precisions"] == ["bf16", "fp32"]
    assert paper["expected_rounds"] == 1  # capacity multiples: every shape's round 1 is all its predictions need
    assert paper["adaptive_expected"]["train_flops"] <= PAPER_TARGET * paper["fixed"]["train_flops"]
    assert paper["expected_over_fixed"] == paper["adaptive_expected"]["train_flops"] / paper["fixed"]["train_flops"]
