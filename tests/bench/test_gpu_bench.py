"""bench/gpu.py runs where CI has no GPU: `--device cpu` exercises the same code on toy sizes. On the CPU
a pack is bit-exact, so the script's own agreement check must read zero there, and every figure it
writes is a ratio of two timings of this run. bench/gpu_session.py, the GPU session of issue 19, runs
its two stages and summarises them: the capacity stage's measured and extrapolated bits per parameter,
and a stage that fails leaves the other's results and the summary."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_session
from bench.gpu import main, op_category, paper_shapes

REPO = Path(__file__).resolve().parents[2]


def test_the_paper_shapes_are_the_sixteen_of_conf():
    shapes = paper_shapes()
    assert len(shapes) == 16 and "l1_d16" not in shapes and "l8_d256" in shapes


def test_the_profile_sorts_operators_into_categories():
    assert op_category("aten::addmm") == op_category("aten::bmm") == "matmul"
    assert op_category("aten::_scaled_dot_product_flash_attention_backward") == "attention"
    assert op_category("aten::_fused_adamw_") == op_category("aten::_foreach_norm") == "optimizer"
    assert op_category("aten::_log_softmax_backward_data") == "loss"
    assert op_category("aten::_to_copy") == "casts_and_copies" and op_category("aten::gelu") == "elementwise_and_other"
    # Waits on the device and what is not an operator (runtime calls, kernels) are counted apart.
    assert op_category("aten::_local_scalar_dense") is op_category("cudaLaunchKernel") is None


def test_an_unknown_section_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--only", "peaks", "speed"])
    assert "no section speed" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_bench_runs_on_the_cpu_and_writes_its_figures(tmp_path):
    sections = ["packed", "crossover", "profile", "lone_cell", "paper_shapes"]
    results = main(["--device", "cpu", "--quick", "--only", *sections, "--out", str(tmp_path)])
    (written,) = tmp_path.glob("gpu-*.json")
    assert list(json.loads(written.read_text())["sections"]) == sections  # in the order asked
    packed = results["sections"]["packed"]["ratios"]
    assert set(packed) == {"tiny_k8_fp32", "tiny_k32_fp32"}
    for figure in packed.values():
        assert figure["agreement"]["weights_rel_diff_max"] == 0.0  # exact per-cell sums on a CPU
        assert len(figure["sequential_s"]) == len(figure["packed_s"]) == 2
        ratios = [s / p for s, p in zip(figure["sequential_s"], figure["packed_s"])]
        assert figure["median"] == pytest.approx(statistics.median(ratios))
    rows = results["sections"]["crossover"]["rows"]
    assert [r["batch_size"] for r in rows] == [64, 512]
    assert rows[0]["cell_gflops_per_step"] < rows[1]["cell_gflops_per_step"]
    profiled = results["sections"]["profile"]["runs"]
    assert set(profiled) == {f"l1_d32_{p}_{w}" for p in ("fp32", "bf16") for w in ("before", "after")}
    for run in profiled.values():
        assert run["top"] and 0 < run["top"][0]["share"] <= 1 and run["ms_per_step"] > 0
        assert sum(run["share"].values()) == pytest.approx(1.0) and run["share"]["matmul"] > 0
    lone = results["sections"]["lone_cell"]["cells"]["tiny_l1_d32_fp32"]
    assert lone["before"]["speedup"] == 1.0
    assert lone["after"]["speedup"] == pytest.approx(lone["before"]["ms_per_step"] / lone["after"]["ms_per_step"])
    shape = results["sections"]["paper_shapes"]["shapes"]["l1_d32"]
    for precision in ("fp32", "bf16"):
        tokens = [shape[precision][w]["tokens_per_s"] for w in ("after", "before")]
        assert shape[precision]["after_over_before"] == pytest.approx(tokens[0] / tokens[1])


@pytest.mark.slow
def test_the_gpu_session_runs_on_the_cpu_and_summarises_both_stages(tmp_path):
    subprocess.run([sys.executable, "-m", "bench.gpu_session", str(tmp_path), "--device", "cpu", "--quick"],
                   cwd=REPO, check=True, timeout=900)
    (gpu,) = tmp_path.glob("gpu-*.json")
    (capacity,) = tmp_path.glob("capacity_probe-*.json")
    sections = json.loads(gpu.read_text())["sections"]
    assert list(sections) == ["peaks", "lone_cell", "profile", "paper_shapes", "crossover", "compiled"]
    assert not [name for name, section in sections.items() if "error" in section or "skipped" in section]
    compiled = sections["compiled"]["cells"]["tiny_l1_d32_fp32"]["compiled"]
    assert compiled["ms_per_step"] > 0 and "speedup" in compiled
    runs = [run["name"] for run in json.loads(capacity.read_text())["runs"]]
    assert runs == ["paper_l1_d32_fp32", "paper_l1_d32_bf16"]  # the paper's row only
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert summary[:2] == [line for line in summary if line.startswith(("gpu: ok", "capacity: ok"))]
    capacity_lines = [line for line in summary if line.startswith("capacity paper_l1_d32_")]
    assert len(capacity_lines) == 2
    assert all("measured" in line and "extrapolated" in line and "converged" in line for line in capacity_lines)
    assert any(line.startswith("lone tiny_l1_d32_fp32: before") and "compiled" in line for line in summary)
    assert (tmp_path / "gpu.log").stat().st_size and (tmp_path / "capacity.log").stat().st_size


def test_the_session_stays_under_nine_minutes():
    assert sum(timeout_s for _, _, _, timeout_s in gpu_session.STAGES) <= gpu_session.SESSION_LIMIT_S == 540


def capacity_cell(**fields):
    cell = {"num_sequences": 966, "bits_per_param": 3.5, "bits_per_param_paper_count": 3.6, "converged": False,
            "converged_horizon": None, "last_horizon": 16000, "branches": [{}] * 5, "steps_trained": 22200,
            "asymptote_extrapolable": True, "asymptote_branches": 4, "bits_per_param_asymptote": 3.9,
            "bits_per_param_asymptote_ci_low": 3.7, "bits_per_param_asymptote_ci_high": 4.4,
            "fraction_of_asymptote": 0.897}
    return {**cell, **fields}


def test_the_summary_shows_measured_and_extrapolated_capacity_and_survives_what_it_cannot_read():
    plan = {"asymptote_from": 2000, "needed_steps": 22200, "needed_s": 160.0}
    capacity = {"runs": [
        {"name": "paper_l1_d32_fp32", "paper_bits_per_param": 4.23, "asymptote_plan": {}, "cells": [capacity_cell()]},
        {"name": "paper_l1_d32_bf16", "paper_bits_per_param": 3.93, "asymptote_plan": plan, "cells": [capacity_cell(
            converged=True, converged_horizon=8000, asymptote_extrapolable=False,
            asymptote_reason="3 branches: an extrapolation needs at least 4")]},
        {"name": "broken", "cells": [{"converged": False}]}]}
    lines = gpu_session.summary_lines({}, capacity)
    assert lines[0] == "gpu results: none written"
    assert lines[1] == ("capacity paper_l1_d32_fp32 N=966: measured 3.500 bits/param (paper count 3.600), "
                        "unconverged at the cap T=16,000, 5 branches, 22,200 steps; extrapolated 3.900 [3.700, 4.400] "
                        "bits/param from 4 branches, measured 89.7% of it; the paper: 4.23")
    assert "converged at T=8,000" in lines[2] and "not extrapolable (3 branches" in lines[2]
    assert "measured is a lower bound; 4 branches from 2,000 need 22,200 steps" in lines[2]
    assert lines[3].startswith("capacity broken: not summarised (KeyError")
    assert gpu_session.summary_lines({"unreadable": "gpu-x.json: bad"}, {"runs": []}) == [
        "gpu results unreadable: gpu-x.json: bad"]


@pytest.mark.slow
def test_a_failing_stage_leaves_the_other_stages_results_and_the_summary(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(gpu_session, "STAGES", (("gpu", ["bench.no_such_stage"], [], 60), gpu_session.STAGES[1]))
    summary = gpu_session.main([str(tmp_path), "--device", "cpu", "--quick"])
    assert summary[0].startswith("gpu: exit 1") and summary[1].startswith("capacity: ok")
    assert summary[2] == "gpu results: none written" and (tmp_path / "gpu.log").stat().st_size
    (capacity,) = tmp_path.glob("capacity_probe-*.json")
    runs = [run["name"] for run in json.loads(capacity.read_text())["runs"]]
    assert runs == ["paper_l1_d32_fp32", "paper_l1_d32_bf16"]
    cells = [line for line in summary if line.startswith("capacity paper_l1_d32_")]
    assert len(cells) == 2 and all("measured" in line and "extrapolated" in line for line in cells)
    assert (tmp_path / "summary.txt").read_text().splitlines() == summary
