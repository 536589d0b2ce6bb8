"""GridComposer must give exactly what Hydra's full compose gives, cell by cell."""

from __future__ import annotations

import pytest

from orchestrator.compose import ConfigError, GridComposer, compose_cell, expand_grid, load_sweep, split_overrides

GRIDS = [
    ["sweep=smoke", "model=l1_d16,l2_d32", "precision=fp32,bf16", "train.lr=1e-3,0.01", "seed=0,7"],
    ["sweep=laptop", "train=cpu,paper", "data.vocab_size=128", "data.num_nonmembers=32,64", "eval_batch_size=64"],
    ["sweep=smoke", "tracking=server", "cluster=ray", "cluster.cpus_per_cell=2", "train.max_steps=11,12"],
]


@pytest.mark.parametrize("overrides", GRIDS, ids=["shapes-precisions", "recipes", "runtime"])
def test_grid_composer_equals_full_compose(overrides):
    sweep = load_sweep(overrides)
    assert len(sweep.cells) >= 4
    for cell in sweep.cells:
        full = compose_cell([*sweep.fixed_overrides, *cell.overrides])
        assert cell.config == full.config, cell.overrides
        assert cell.spec == full.spec and cell.options == full.options


def test_grid_composer_rejects_unknown_keys_like_hydra():
    composer = GridComposer(["sweep=smoke"])
    with pytest.raises(ConfigError, match=r"Could not override 'train.lrr'"):
        composer.compose(["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"Could not override 'train.lrr'"):
        compose_cell(["sweep=smoke", "train.lrr=1"])


def test_a_grid_axis_on_the_command_line_replaces_the_files_axis():
    axes, fixed = split_overrides(["sweep=smoke", "seed=3,4", "train.lr=0.5"])
    assert (axes, fixed) == (["seed=3,4"], ["sweep=smoke", "train.lr=0.5"])
    assert expand_grid(["a=1,2", "b=x"]) == [("a=1", "b=x"), ("a=2", "b=x")]
    cells = load_sweep(["sweep=smoke", "seed=3,4", "train.lr=0.5"]).cells
    assert sorted({c.spec.seed for c in cells}) == [3, 4]
    assert {c.spec.train.lr for c in cells} == {0.5}  # a fixed override replaces the file's axis too


def test_a_grid_over_a_runtime_option_is_refused():
    with pytest.raises(ConfigError, match=r"are the same cell .*varies a runtime option"):
        load_sweep(["sweep=smoke", "eval_batch_size=64,512"])
