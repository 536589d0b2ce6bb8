"""Planning text sweeps (orchestrator/corpus.py): the driver builds and stores the tokenizer once, checks
the corpus, and attaches each cell's reference; no training here."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from models.spec import ReferenceOptions, SpecError, flatten, to_dict
from models.text import SAMPLE_CORPUS, TextDataError, save_tokenizer, stored_tokenizer, tokenizer_uri, train_bpe
from orchestrator.compose import ConfigError, expand_grid, load_sweep, prepared
from orchestrator.corpus import reference_cell
from orchestrator.resources import PackOptions, plan_packs

SMALL = ["sweep=text_small"]


def test_the_driver_stores_one_tokenizer_and_attaches_one_reference(sweep_root):
    cells = load_sweep(SMALL).cells
    assert [c.spec.data.num_sequences for c in cells] == [16, 64, 256, 1024]
    hashes = {c.spec.data.tokenizer_hash for c in cells}
    assert len(hashes) == 1
    stored = list((sweep_root / "checkpoints" / "tokenizers").glob("*.json"))
    assert [p.stem for p in stored] == list(hashes)
    assert stored_tokenizer(str(sweep_root / "checkpoints"), hashes.pop()).kind == "bytes"
    references = {c.spec.reference for c in cells}
    assert len(references) == 1
    reference = references.pop()
    data = cells[0].spec.data
    # The whole pool: every distinct 64-byte sequence outside the non-member and test sets.
    assert reference.data.num_sequences + data.num_nonmembers + data.num_test > 1024
    assert reference.data == dataclasses.replace(data, num_sequences=reference.data.num_sequences)
    assert reference.model == cells[0].spec.model and reference.reference is None
    assert cells[0].recorded_params()["data.reference.cell_id"] == reference.cell_id
    assert "cell_id" not in cells[0].config["data"]["reference"], "the composed config is never patched"
    assert load_sweep(SMALL).cells == cells, "planning twice gives the same cells and ids"
    assert prepared(cells) == cells, "preparing prepared cells changes nothing"


def test_ids_follow_the_tokenizer_and_the_reference(sweep_root):
    base = load_sweep(SMALL + ["data.num_sequences=16"]).cells[0]
    bpe = load_sweep(SMALL + ["data.num_sequences=16", "data.tokenizer=bpe", "data.vocab_size=300"]).cells[0]
    oracle = load_sweep(SMALL + ["data.num_sequences=16", "data.reference.n_layer=2", "data.reference.n_head=2",
                                 "data.reference.n_embd=32"]).cells[0]
    smaller_ref = load_sweep(SMALL + ["data.num_sequences=16", "data.reference.num_sequences=512"]).cells[0]
    no_ref = load_sweep(SMALL + ["data.num_sequences=16", "data.reference.enabled=false"]).cells[0]
    ids = {c.cell_id for c in (base, bpe, oracle, smaller_ref, no_ref)}
    assert len(ids) == 5
    assert bpe.spec.data.tokenizer_hash != base.spec.data.tokenizer_hash
    assert stored_tokenizer(bpe.options.storage, bpe.spec.data.tokenizer_hash).vocab_size <= 300
    assert oracle.spec.reference.model.n_embd == 32 and oracle.spec.reference.model.name == "oracle_l2_d32"
    assert smaller_ref.spec.reference.data.num_sequences == 512
    assert no_ref.spec.reference is None


def test_a_changed_stored_tokenizer_is_refused(sweep_root):
    cell = load_sweep(SMALL + ["data.num_sequences=16", "data.tokenizer=bpe", "data.vocab_size=300"]).cells[0]
    other = train_bpe(["an entirely different corpus, " * 50], 300)
    save_tokenizer(other, tokenizer_uri(cell.options.storage, cell.spec.data.tokenizer_hash))
    with pytest.raises(TextDataError, match="not the"):
        stored_tokenizer(cell.options.storage, cell.spec.data.tokenizer_hash)


def test_text_cells_train_alone_and_synthetic_ones_still_pack(sweep_root):
    text = [c.spec for c in load_sweep(SMALL).cells]
    synthetic = [c.spec for c in load_sweep(["sweep=smoke"]).cells]
    packs = plan_packs(text + synthetic, PackOptions(enabled=True, max_cells=8, fill_workers=False))
    assert packs == [[0], [1], [2], [3], [4, 5, 6, 7]]


def test_a_reference_must_score_the_same_sequences(sweep_root):
    cell = load_sweep(SMALL + ["data.num_sequences=16"]).cells[0]
    other = dataclasses.replace(cell.spec.reference, data=dataclasses.replace(cell.spec.reference.data, seq_len=32))
    with pytest.raises(SpecError, match="reference.data.seq_len=32"):
        dataclasses.replace(cell.spec, reference=other)


def test_the_paper_text_grid(sweep_root):
    axes = ["data=text", "model=glob(l8_d*)", "data.num_sequences=256,1024,4096,16384,65536,262144,1048576",
            "seed=0,1,2"]
    assert len(expand_grid(axes)) == 4 * 7 * 3
    # Its sizes need a web-scale corpus: on the shipped sample the launch stops, naming the field.
    with pytest.raises(ConfigError, match=r"data.num_nonmembers=4096, data.num_test=4096: .* holds \d+ distinct 64-token sequences"):
        load_sweep(["sweep=paper_text", "data.tokenizer_train_documents=50"])


def test_a_later_plan_reads_the_corpus_again_only_when_it_changed(sweep_root, tmp_path, monkeypatch):
    import orchestrator.corpus as corpus_module

    corpus = tmp_path / "corpus.txt"
    shutil.copy(SAMPLE_CORPUS, corpus)
    overrides = SMALL + [f"data.corpus_uri={corpus}", "data.tokenizer=bpe", "data.vocab_size=300",
                         "data.num_sequences=16,64"]
    first = load_sweep(overrides).cells

    def must_not_read(*args, **kwargs):
        raise AssertionError("the corpus was read and tokenized again although it did not change")

    with monkeypatch.context() as patched:  # status, resume, aggregate, a relaunch: files are listed only
        patched.setattr(corpus_module, "read_sequences", must_not_read)
        patched.setattr(corpus_module, "build_tokenizer", must_not_read)
        assert load_sweep(overrides).cells == first

    with open(corpus, "a") as f:  # a changed corpus is read afresh
        f.write("".join(f"\n\nA new paragraph, number {i}, written for this test alone." for i in range(200)))
    grown = load_sweep(overrides).cells
    assert grown[0].spec.reference.data.num_sequences > first[0].spec.reference.data.num_sequences
    assert grown[0].cell_id != first[0].cell_id


def test_cells_carry_their_reference_options_typed(sweep_root):
    text = load_sweep(SMALL + ["data.num_sequences=16"]).cells[0]
    assert text.reference_options == ReferenceOptions()  # conf/data/text.yaml's defaults
    oracle = load_sweep(SMALL + ["data.num_sequences=16", "data.reference.n_layer=2", "data.reference.n_head=2",
                                 "data.reference.n_embd=32", "data.reference.num_sequences=512.0"]).cells[0]
    assert oracle.reference_options == ReferenceOptions(num_sequences=512, n_layer=2, n_head=2, n_embd=32)
    assert type(oracle.reference_options.num_sequences) is int  # typed, so the reference's id is too
    assert oracle.spec.reference.data.num_sequences == 512
    assert load_sweep(["sweep=smoke"]).cells[0].reference_options is None  # synthetic: no reference
    # The options are planning input, not identity: the id hashes the CellSpec only.
    assert dataclasses.replace(text, reference_options=None).cell_id == text.cell_id


def _recorded_before(config: dict, spec) -> dict:
    """The record as orchestrator/corpus.py used to make it, by patching a copy of the config: the
    reference implementation that `Cell.recorded_params` must equal, key for key and in order."""
    import copy

    config = copy.deepcopy(config)
    data = config.setdefault("data", {})
    data["tokenizer_hash"] = spec.data.tokenizer_hash
    if spec.reference is not None:
        reference = data.setdefault("reference", {})
        reference["num_sequences"] = spec.reference.data.num_sequences
        reference["cell_id"] = spec.reference.cell_id
    return flatten(config)


SPEC_SECTIONS = ("model", "data", "train", "precision", "seed")  # what changes a cell's numbers


def _spec_part(params: dict) -> dict:
    return {k: v for k, v in params.items() if k.split(".")[0] in SPEC_SECTIONS}


def test_recorded_params_are_the_spec_part_of_what_was_recorded_before(sweep_root):
    """Params hold only what changes a cell's numbers (issue 17), under the keys and with the values
    the whole config was recorded with before: aggregate's columns and the report's groups stay."""
    with_reference = load_sweep(SMALL + ["data.num_sequences=16"]).cells[0]
    without = load_sweep(SMALL + ["data.num_sequences=16", "data.reference.enabled=false"]).cells[0]
    for cell in (with_reference, without):
        params = cell.recorded_params()
        assert params == _spec_part(_recorded_before(cell.config, cell.spec))
        assert params["data.tokenizer_hash"] == cell.spec.data.tokenizer_hash
    assert with_reference.recorded_params()["data.reference.num_sequences"] > 1024  # the whole pool, resolved
    assert without.recorded_params()["data.reference.num_sequences"] is None  # as composed
    synthetic = load_sweep(["sweep=smoke"]).cells[0]
    assert synthetic.recorded_params() == _spec_part(flatten(synthetic.config))
    assert not {"storage", "device", "root_dir"} & set(synthetic.recorded_params())
    reference = reference_cell(with_reference)  # made without a config: its spec is its record
    spec = {k: v for k, v in to_dict(reference.spec).items() if k not in ("precision", "reference")}
    assert reference.recorded_params() == flatten({**spec, "precision": {"name": reference.spec.precision}})
