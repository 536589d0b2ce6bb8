"""bench/capacity_probe.py runs where CI has no GPU: `--device cpu --quick` runs the same code on toy
sizes. Checked: its three runs and their cells, each cell's cap (derived from the budget, never above
what was wanted) and where the rule stopped it, and bits per parameter as its own curve gives them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.capacity_probe import cap_within, paper_row, with_cap
from bench.common import model_spec, train_recipe
from models.progress import forced_decay_start
from models.spec import CellSpec, DataSpec

REPO = Path(__file__).resolve().parents[2]


def test_the_paper_row_is_l1_d32_at_its_published_bits_per_param():
    row = paper_row()
    assert (row["bits_per_param_fp32"], row["bits_per_param_bf16"]) == (4.23, 3.93)


def test_the_cap_is_the_most_steps_the_budget_holds_and_its_cool_down_ends_there():
    spec = CellSpec(model_spec("l1_d32"), DataSpec(2048, 64, 966, 256), train_recipe("paper"), "fp32", 0)
    costs = {"step_s": 0.01, "eval_s": 0.05}
    cap = cap_within(300.0, costs, 1, spec, 10**6)
    capped = with_cap(spec, cap).train
    assert capped.eval_interval == cap // 40 and capped.warmup_steps == 1000  # the paper recipe's warm-up
    seconds = lambda steps: steps * 0.01 + (steps // with_cap(spec, steps).train.eval_interval + 2) * 0.05
    assert seconds(cap) <= 300.0 < seconds(cap + 1)
    assert forced_decay_start(capped) < capped.max_steps  # the cool-down ends at the cap, inside the budget
    assert cap_within(300.0, costs, 1, spec, 500) == 500  # never beyond what was wanted
    assert with_cap(spec, 500).train.warmup_steps == 50  # at most a tenth of a short cap


@pytest.mark.slow
def test_the_probe_runs_on_the_cpu_and_writes_what_its_cells_reached(tmp_path):
    subprocess.run([sys.executable, "-m", "bench.capacity_probe", "--device", "cpu", "--quick", "--out",
                    str(tmp_path)], cwd=REPO, check=True, timeout=600)
    (written,) = tmp_path.glob("capacity_probe-*.json")
    results = json.loads(written.read_text())
    runs = {run["name"]: run for run in results["runs"]}
    assert list(runs) == ["paper_l1_d32_fp32", "paper_l1_d32_bf16", "laptop_l1_d16"]
    assert [runs[n]["paper_bits_per_param"] for n in runs] == [4.23, 3.93, None]
    assert [c["precision"] for c in runs["paper_l1_d32_bf16"]["cells"]] == ["bf16"]
    small, large = runs["laptop_l1_d16"]["cells"]
    assert large["num_sequences"] == pytest.approx(4 * small["num_sequences"], abs=2)  # 8x and 2x past capacity
    for run in runs.values():
        assert 1 <= run["cap_steps"] <= run["target_steps"] and run["step_s"] > 0
        for cell in run["cells"]:
            assert cell["train"]["max_steps"] == run["cap_steps"]
            assert cell["steps"] == cell["curve"][-1][0] and cell["mem_bits"] == cell["curve"][-1][1]
            assert cell["bits_per_param"] == pytest.approx(cell["mem_bits"] / cell["params"])
            assert cell["converged"] == (cell["converged_step"] is not None)
            assert cell["converged"] or cell["steps"] == run["cap_steps"]  # stopped by the rule or at the cap
