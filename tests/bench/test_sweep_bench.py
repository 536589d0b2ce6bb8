"""bench/sweep_bench.py compares like with like: its override grid composes, through memsweep's own
composer, into exactly the cells that Ray Tune's grid_search axes name, and those cells train to
max_steps (no early convergence), so every way of running the grid does the same work."""

from bench.sweep_bench import grid_overrides
from orchestrator.compose import load_sweep


def test_the_grid_is_the_same_cells_for_memsweep_and_tune(memsweep_root):
    sizes, seeds, steps = [64, 128], [0, 1], 400
    cells = load_sweep(grid_overrides(sizes, seeds, steps)).cells
    specs = {(c.spec.data.num_sequences, c.spec.seed): c.spec for c in cells}
    assert sorted(specs) == [(n, s) for n in sizes for s in seeds]  # Tune's grid_search product
    for spec in specs.values():
        assert spec.model.name == "l1_d16" and spec.precision == "fp32"
        assert spec.train.max_steps == steps
        assert spec.train.schedule == "cosine", "a cell could stop early"
