"""bench/gpu.py runs where CI has no GPU: `--device cpu` exercises the same code on toy sizes. On the CPU
a pack is bit-exact, so the script's own agreement check must read zero there, and every figure it
writes is a ratio of two timings of this run."""

import json
import statistics

import pytest

from bench.gpu import main, paper_shapes


def test_the_paper_shapes_are_the_sixteen_of_conf():
    shapes = paper_shapes()
    assert len(shapes) == 16 and "l1_d16" not in shapes and "l8_d256" in shapes


@pytest.mark.slow
def test_gpu_bench_runs_on_the_cpu_and_writes_its_figures(tmp_path):
    sections = ["packed", "crossover", "profile"]
    results = main(["--device", "cpu", "--quick", "--only", *sections, "--out", str(tmp_path)])
    (written,) = tmp_path.glob("gpu-*.json")
    assert json.loads(written.read_text())["sections"].keys() == {"packed", "crossover", "profile"}
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
    assert set(profiled) == {"l1_d32_fp32", "l1_d32_bf16"}
    for run in profiled.values():
        assert run["top"] and 0 < run["top"][0]["share"] <= 1 and run["ms_per_step"] > 0
