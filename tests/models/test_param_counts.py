"""Parameter counts: the 16 shapes of the paper's capacity table, composed from conf/model/, give
the paper's printed counts, and the real module has exactly `params` = `params_paper` + d weights."""

import functools

import pytest
import torch

from measure.paper import reference_rows
from models.gpt import GPT
from orchestrator.compose import compose_cell

PAPER_SHAPES = [(n_layer, d) for n_layer in (1, 2, 4, 8) for d in (32, 64, 128, 256)]


def paper_counts() -> dict[tuple[int, int], float]:
    """(n_layer, d_model) -> the paper's printed parameter count (3 significant figures)."""
    return {(int(r["n_layer"]), int(r["d_model"])): r["params"] for r in reference_rows("capacity_by_precision.csv")}


@functools.cache
def paper_spec(n_layer: int, d: int):
    """The paper's setting: V = 2048, S = 64."""
    cell = compose_cell([f"model=l{n_layer}_d{d}", "data.vocab_size=2048", "data.seq_len=64"])
    return cell.spec


def test_reference_table_lists_the_16_shapes():
    assert sorted(paper_counts()) == PAPER_SHAPES


@pytest.mark.parametrize("n_layer, d", PAPER_SHAPES)
def test_params_paper_matches_the_published_count(n_layer, d):
    spec = paper_spec(n_layer, d)
    assert (spec.model.n_layer, spec.model.n_embd) == (n_layer, d)
    # The table prints 3 significant figures ("8.04e4"): round ours the same way and compare.
    assert float(f"{spec.params_paper:.2e}") == paper_counts()[(n_layer, d)]
    assert spec.params == spec.params_paper + d  # the start token's embedding row


@pytest.mark.parametrize("n_layer, d", PAPER_SHAPES)
def test_the_module_has_exactly_params_weights(n_layer, d):
    spec = paper_spec(n_layer, d)
    model = GPT.from_spec(spec)
    assert model.num_params == spec.params == spec.params_paper + d
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == spec.params
    # The start token has its own row; the head is tied to the first V rows (no separate head weights).
    assert model.wte.weight.shape == (2048 + 1, d)
    assert model.wpe.weight.shape == (64, d)
    logits = model(model.inputs_for(torch.zeros(1, 64, dtype=torch.long)))
    assert logits.shape == (1, 64, 2048)
