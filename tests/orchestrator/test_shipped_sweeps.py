"""Every shipped sweep (conf/sweep/*.yaml) composes and validates, every cell of it, so none can rot
unnoticed: a renamed config, a field a spec no longer accepts or a grid value it refuses fails here,
not at a user's launch. A new sweep file is picked up without editing this test.

Synthetic and text_small sweeps go through `load_sweep`, the launch's own planning (text_small's corpus
is the shipped sample, so its check runs too). paper_text needs a web-scale corpus that is not shipped:
its cells are composed and validated without reading one, with the same public steps `load_sweep`
takes before the corpus check (expand_grid, GridComposer, compose_cell).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from models.spec import to_dict
from models.text import stored_tokenizer
from orchestrator.capacity_axis import parse_multiples
from orchestrator.compose import GridComposer, compose_cell, config_dir, expand_grid, load_sweep, parse_overrides

SWEEP_FILES = sorted((config_dir() / "sweep").glob("*.yaml"))
# Sweeps whose corpus is not shipped: load_sweep would stop at the corpus check (which the next test
# runs on text_small's shipped sample).
NEEDS_A_CORPUS = {"paper_text"}
SLOW: set[str] = set()  # planning is fast (issue 18): even the paper's grids compose in seconds
# The counts their files and the README state.
DOCUMENTED_CELLS = {"paper_synthetic": 800, "paper_synthetic_adaptive": 480, "laptop_adaptive": 6}
# A group choice and the spec field that names it (`model=l1_d16` -> spec.model.name); train recipes
# have no name in the spec, so `train=...` axes are checked by composition alone.
CHOICE_FIELDS = {"model": "model.name", "data": "data.kind", "precision": "precision"}


def sweep_params():
    for path in SWEEP_FILES:
        marks = [pytest.mark.slow] if path.stem in SLOW else []
        yield pytest.param(path, marks=marks, id=path.stem)


def grid_axes(path: Path) -> list[str]:
    """The sweep file's grid as override strings (`seed=0,1,2`), read from the file itself."""
    grid = OmegaConf.load(path).grid
    return [f"{key}={value}" for key, value in grid.items()]


def axis_length(axis: str) -> int:
    """How many values a grid axis takes: its capacity multiples, or what Hydra expands it to."""
    key, _, value = axis.partition("=")
    multiples = parse_multiples(key, value)
    return len(multiples) if multiples is not None else len(expand_grid([axis]))


def cells_without_corpus(name: str, axes: list[str]) -> list:
    """Every cell of `sweep=NAME` composed and validated as load_sweep does before its corpus check."""
    composer = GridComposer([f"sweep={name}"])
    return [compose_cell(list(overrides), label=" ".join(overrides), composer=composer)
            for overrides in expand_grid(axes)]


def spec_value(spec, key: str):
    """The spec's value for a grid key: a field (`data.num_sequences`, `seed`) or a chosen config's name."""
    node = to_dict(spec)
    for part in CHOICE_FIELDS.get(key, key).split("."):
        node = node[part]
    return node


def test_every_sweep_file_is_found():
    assert {"smoke", "laptop", "paper_synthetic", "text_small", "paper_text"} <= {p.stem for p in SWEEP_FILES}


@pytest.mark.parametrize("path", sweep_params())
def test_every_cell_of_a_shipped_sweep_composes_and_validates(path, memsweep_root):
    name, axes = path.stem, grid_axes(path)
    if name in NEEDS_A_CORPUS:
        cells = cells_without_corpus(name, axes)
    else:
        sweep = load_sweep([f"sweep={name}"])
        assert sweep.name == name, "status, resume and aggregate find a sweep by its file's name"
        cells = sweep.cells

    expected = math.prod(axis_length(axis) for axis in axes)
    assert len(cells) == expected == DOCUMENTED_CELLS.get(name, expected)
    assert len({c.cell_id for c in cells}) == len(cells), "two cells of the grid share an id"
    assert all(c.options.sweep == name for c in cells)
    for cell in cells:  # each grid value reached the typed spec the worker receives
        for override in parse_overrides(list(cell.overrides)):
            key = override.key_or_group
            if key != "train":
                assert spec_value(cell.spec, key) == override.value(), (cell.overrides, key)


def test_text_small_plans_against_the_shipped_sample(memsweep_root):
    """The corpus check of a text sweep runs on the shipped sample: the tokenizer is built and stored
    under the sweep's storage, every cell carries its hash and a reference trained on the whole pool."""
    cells = load_sweep(["sweep=text_small"]).cells
    storage = cells[0].options.storage
    assert Path(storage).resolve().is_relative_to(memsweep_root.resolve())
    (tokenizer_hash,) = {c.spec.data.tokenizer_hash for c in cells}
    assert stored_tokenizer(storage, tokenizer_hash).kind == "bytes"
    (reference,) = {c.spec.reference for c in cells}
    assert reference.data.num_sequences >= max(c.spec.data.num_sequences for c in cells)
