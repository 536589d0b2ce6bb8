"""Dataset sizes as multiples of each shape's predicted capacity (issue 15, point 1): a grid value
`data.num_sequences: capacity(...)` resolves per cell to N = round(m * alpha * params / (S log2 V)),
recorded as a plain number, so a cell's id is the content hash it has when given that N directly."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from models.spec import SpecError
from orchestrator.capacity_axis import CapacityAxis, parse_multiples, prior_alpha, split_axes
from orchestrator.compose import ConfigError, compose_cell, load_sweep, with_updates
from orchestrator.compose import expand_capacity as expand

PAPER = {"fp32": 3.83, "bf16": 3.51}  # the paper's bits per parameter (Morris et al. 2025), as printed
CONF = Path(__file__).resolve().parents[2] / "conf"


def expected_n(multiple: float, alpha: float, layers: int, width: int, vocab: int, seq_len: int) -> int:
    """The size computed here from first principles: params (the paper's count plus the start token's
    row) and S log2 V bits a sequence."""
    params = vocab * width + seq_len * width + layers * (12 * width**2 + 13 * width) + 2 * width + width
    return max(1, round(multiple * alpha * params / (seq_len * math.log2(vocab))))


def cell(*overrides: str):
    return compose_cell(list(overrides))


@pytest.mark.parametrize("shape,vocab,seq_len", [
    ("l1_d16", 64, 32), ("l2_d16", 64, 32), ("l4_d64", 2048, 64), ("l8_d256", 2048, 64),
    ("l1_d16", 2, 8), ("l2_d32", 2048, 64), ("l4_d64", 64, 32),
])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_multiples_resolve_to_the_predicted_sizes(shape, vocab, seq_len, precision):
    layers, width = (int(part[1:]) for part in shape.split("_"))
    base = cell(f"model={shape}", f"data.vocab_size={vocab}", f"data.seq_len={seq_len}", f"precision={precision}")
    _, axis = split_axes({"data.num_sequences": "capacity(0.25,0.5,1,2,4)"})
    sized = expand([base], axis)
    wanted = [expected_n(m, PAPER[precision], layers, width, vocab, seq_len) for m in (0.25, 0.5, 1, 2, 4)]
    assert [c.spec.data.num_sequences for c in sized] == wanted
    for c, multiple, n in zip(sized, (0.25, 0.5, 1, 2, 4), wanted):
        assert c.config["data"]["num_sequences"] == n and c.config["capacity"]["multiple"] == multiple
        assert [o for o in c.overrides if o.startswith("data.num_sequences=")] == [f"data.num_sequences={n}"]
        assert (c.spec.data.vocab_size, c.spec.data.seq_len, c.spec.precision) == (vocab, seq_len, precision)


def test_a_resolved_cell_is_the_cell_given_its_size_directly():
    base = cell("model=l2_d16", "seed=3")
    _, axis = split_axes({"model": "l2_d16", "data.num_sequences": "capacity(1, 2)"})
    for sized in expand([base], axis):
        n = sized.spec.data.num_sequences
        direct = cell("model=l2_d16", "seed=3", f"data.num_sequences={n}")
        assert sized.cell_id == direct.cell_id and sized.spec == direct.spec
        assert "capacity" not in sized.cell_id and sized.recorded_id is None


def test_multiples_that_round_to_one_size_make_one_cell():
    base = cell("model=l1_d16")  # about 97 sequences at capacity: 0.001 and 0.002 both give N = 1
    _, axis = split_axes({"data.num_sequences": "capacity(0.001,0.002,1)"})
    sized = expand([base], axis)
    assert [c.spec.data.num_sequences for c in sized] == [1, expected_n(1, PAPER["fp32"], 1, 16, 64, 32)]
    assert sized[0].config["capacity"]["multiple"] == 0.001


def test_split_axes_leaves_the_other_axes():
    grid = {"model": "l1_d16,l2_d16", "data.num_sequences": " capacity( 0.5 ,1) ", "seed": "0,1"}
    rest, axis = split_axes(grid)
    assert rest == {"model": "l1_d16,l2_d16", "seed": "0,1"} and axis.multiples == (0.5, 1.0)
    assert split_axes({"data.num_sequences": "16,64", "data.corpus_uri": "/data/capacity_test.txt"}) == (
        {"data.num_sequences": "16,64", "data.corpus_uri": "/data/capacity_test.txt"}, None)


@pytest.mark.parametrize("key,value,message", [
    ("data.num_sequences", "capacity()", "a comma-separated list of numbers"),
    ("data.num_sequences", "capacity(1,x)", "a comma-separated list of numbers"),
    ("data.num_sequences", "capacity(0.5,0)", "must be a positive number, not 0"),
    ("data.num_sequences", "capacity(-1)", "must be a positive number, not -1"),
    ("data.num_sequences", "capacity(inf)", "must be a positive number, not inf"),
    ("data.num_sequences", "16,capacity(1)", "write capacity(...) alone"),
    ("seed", "capacity(1,2)", "seed=capacity(1,2): capacity(...) sizes data.num_sequences only"),
    ("data.num_nonmembers", "capacity(1)", "sizes data.num_sequences only"),
])
def test_bad_capacity_values_name_the_field(key, value, message):
    with pytest.raises(SpecError, match=r"^(data\.num_sequences|seed|data\.num_nonmembers)=") as err:
        parse_multiples(key, value)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_prior_alpha_is_the_papers_unless_the_sweep_sets_it():
    assert prior_alpha(None)["fp32"] == 3.83 and prior_alpha(None)["bf16"] == 3.51
    assert set(prior_alpha(3.1).values()) == {3.1}
    assert prior_alpha({"bf16": 2.9}) == {**prior_alpha(None), "bf16": 2.9}
    base = cell("model=l1_d16", "precision=bf16")
    _, axis = split_axes({"data.num_sequences": "capacity(1)"}, alpha={"bf16": 3.1})
    (sized,) = expand([base], axis)
    assert sized.spec.data.num_sequences == expected_n(1, 3.1, 1, 16, 64, 32)
    assert sized.config["capacity"] == {"multiple": 1.0, "alpha_bits_per_param": 3.1}
    for bad, where in ((0, "sweep.capacity_alpha=0"), ("x", "sweep.capacity_alpha='x'"),
                       ({"fp32": -1}, "sweep.capacity_alpha.fp32=-1"), ({"fp16": 3}, "sweep.capacity_alpha.fp16")):
        with pytest.raises(SpecError, match=f"^{where}"):
            prior_alpha(bad)


def test_text_cells_take_sizes_not_multiples(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("memorization " * 200)
    text = cell("data=text", f"data.corpus_uri={corpus}")
    with pytest.raises(ConfigError, match=r"^data\.num_sequences=capacity\(\.\.\.\): .*synthetic data"):
        expand([text], CapacityAxis((1.0,)))


def test_with_updates_is_a_typed_update():
    base = cell("model=l1_d16", "data.num_sequences=16", "seed=0")
    updated = with_updates(base, {"seed": 4, "data.num_sequences": 200, "train.max_steps": 50})
    assert updated.cell_id == cell("model=l1_d16", "data.num_sequences=200", "seed=4", "train.max_steps=50").cell_id
    assert updated.overrides == ("model=l1_d16", "seed=4", "data.num_sequences=200", "train.max_steps=50")
    assert (updated.config["seed"], updated.config["data"]["num_sequences"], updated.config["train"]["max_steps"]) == (
        4, 200, 50)
    assert base.config["seed"] == 0 and base.spec.data.num_sequences == 16, "the original cell is unchanged"
    for updates, message in (({"data.num_sequences": 0}, "^data.num_sequences=0 must be positive"),
                             ({"seed": "1"}, "^seed='1' must be int"),
                             ({"train.lr": "fast"}, "^train.lr='fast' must be float"),
                             ({"data.colour": 1}, "^data.colour: not a field of the cell's spec"),
                             ({"precision": "bf16"}, "^precision: not a field")):
        with pytest.raises(ConfigError, match=message):
            with_updates(base, updates)


def test_capacity_axis_in_a_sweep_file(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "sweep" / "capacity_tiny.yaml").write_text(
        "# @package sweep\nname: capacity_tiny\ngrid:\n  model: l1_d16,l2_d16\n"
        "  data.num_sequences: capacity(0.5,1,2)\n  seed: 0\n")
    monkeypatch.setenv("MEMSWEEP_CONF", str(conf))
    cells = load_sweep(["sweep=capacity_tiny"]).cells
    wanted = [expected_n(m, PAPER["fp32"], layers, 16, 64, 32) for layers in (1, 2) for m in (0.5, 1, 2)]
    assert [c.spec.data.num_sequences for c in cells] == wanted
    assert cells[0].cell_id == cell("model=l1_d16", f"data.num_sequences={wanted[0]}").cell_id
    assert cells[0].config["capacity"]["multiple"] == 0.5
