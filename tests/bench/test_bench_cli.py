"""`python -m bench` and `python -m bench.sweep_bench` as a user runs them, on sizes that fit CI: each
prints its table, writes a JSON with the machine's description, and every figure is a ratio of two
timings of the same run, reported as the median and spread of its repeats. The figures themselves
are benchmarks, not assertions: only bounds no healthy run can miss are checked here."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CPU_FIGURES = ["train_vs_bare", "packed_k8", "packed_k8_all_cores", "score_vs_train", "mfu_single", "mfu_packed_k8"]


def run_module(module: str, *args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the sweep starts its own Ray
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def check_stats(figure: dict, repeats: int) -> None:
    values = figure["values"]
    assert len(values) == repeats and all(v > 0 for v in values)
    assert figure["median"] == pytest.approx(statistics.median(values))
    assert (figure["min"], figure["max"]) == (min(values), max(values))


def written(folder: Path, pattern: str) -> dict:
    (path,) = folder.glob(pattern)
    return json.loads(path.read_text())


@pytest.mark.slow
def test_bench_prints_and_writes_each_figure_as_a_ratio_of_one_run(tmp_path):
    proc = run_module("bench", "--quick", "--repeats", "2", "--only", *CPU_FIGURES, "--out", str(tmp_path),
                      timeout=600)
    results = written(tmp_path, "*.json")
    assert results["quick"] and results["repeats"] == 2
    assert {"cpu", "cores", "torch_threads", "torch", "python", "platform", "gpu"} <= results["machine"].keys()
    assert list(results["figures"]) == CPU_FIGURES
    table = proc.stdout.splitlines()
    for name, figure in results["figures"].items():
        assert any(line.startswith(name) and "median" in line for line in table), name
        check_stats(figure, 2)
        assert figure["wall_s"] > 0 and figure["what"]
    figures = results["figures"]
    # packed: the ratio is exactly the two recorded timings of each repeat
    packed = figures["packed_k8"]
    assert packed["values"] == pytest.approx([s / p for s, p in zip(packed["sequential_s"], packed["packed_s"])])
    all_cores = figures["packed_k8_all_cores"]
    assert all(set(b) == {"sequential", "packed"} for b in all_cores["best_threads"])
    for side in ("sequential", "packed"):
        check_stats(all_cores["thread_gain"][side], 2)
    # bounds no healthy run misses: the same loop is neither twice as fast nor half as fast as a bare
    # one, a forward pass costs less than a training step, and no run beats the measured peak
    assert 0.5 < figures["train_vs_bare"]["median"] < 2.0
    assert figures["score_vs_train"]["median"] > 1.0
    for name in ("mfu_single", "mfu_packed_k8"):
        assert 0 < figures[name]["max"] < 1 and len(figures[name]["peak_flops"]) == 2


@pytest.mark.slow
def test_sweep_bench_runs_the_grid_four_ways_on_a_fresh_ray(tmp_path):
    """Figure 3 end to end: the script raises unless memsweep (packed and not) and Ray Tune each
    trained every cell; the ratios are the recorded walls'."""
    run_module("bench.sweep_bench", "--quick", "--cell-s", "1", "--out", str(tmp_path), timeout=600)
    figure = written(tmp_path, "sweep-*.json")["sweep"]
    assert figure["cells"] == 4 and figure["workers"] == 2
    times = figure["times_s"]
    assert all(len(v) == 1 and v[0] > 0 for v in times.values()), times
    assert times["ideal"][0] == pytest.approx(times["sequential"][0] / 2)
    ratios = figure["ratios"]
    for name, (a, b) in {"memsweep_vs_ideal": ("memsweep", "ideal"), "memsweep_vs_tune": ("memsweep", "tune"),
                         "memsweep_packed_vs_ideal": ("memsweep_packed", "ideal")}.items():
        check_stats(ratios[name], 1)
        assert ratios[name]["median"] == pytest.approx(times[a][0] / times[b][0])
    assert ratios["memsweep_vs_ideal"]["target"] == "<= 1.10" and ratios["memsweep_vs_tune"]["target"] == "<= 1.0"
    for name, summed in figure["summed_in_workers_s"].items():
        assert summed[0] > 0, name
