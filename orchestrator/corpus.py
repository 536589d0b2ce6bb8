"""The driver's work on text corpora, done once per sweep before anything is submitted.

    cells = prepare_text_cells(cells)   # after composing, before ids are used

For every distinct tokenizer the grid asks for, the driver builds it (bytes, or a BPE trained on the
corpus) and stores it beside the checkpoints as `<storage>/tokenizers/<sha256>.json`; every cell carries
the hash (`data.tokenizer_hash`, part of its id) and its worker loads exactly that file. For every
distinct split of a corpus the driver reads the corpus once and checks it can give what each cell asks
(readable, not empty, at least one S-token sequence, enough distinct sequences for pool + non-members +
test), so a bad corpus stops the launch with a message naming the cell and the field, before any cell
trains. Finally each text cell gets its reference model (docs/science.md): a CellSpec of its own, the same
shape (or the configured oracle shape) trained on the whole pool or `data.reference.num_sequences`.

Reading a corpus costs one pass over it (bounded by `data.max_sequences` for huge corpora), once per
corpus version: an index beside the stored tokenizers remembers what was found, keyed by the files'
paths, sizes and modification times, so status, resume and relaunches only list the corpus's files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from models.spec import Cell, CellSpec, ModelSpec, ReferenceOptions, SpecError, TextDataSpec
from models.storage import read_bytes, under, write_atomic
from models.text import (
    TextDataError,
    build_tokenizer,
    corpus_files,
    read_sequences,
    save_tokenizer,
    stored_tokenizer,
    tokenizer_uri,
)

REFERENCE_EXPERIMENT = "memsweep-references"  # every reference cell, shared by all sweeps of a store
REFERENCE_DESCRIPTION = (
    "Reference models of memsweep's text cells: each is a cell of its own (tag memsweep.cell_id), trained "
    "once on a corpus's pool and shared by every sweep of this store that measures text cells against it. "
    "A reference run's memsweep.reference_for.<cell id> tags name the runs of the cells measured against "
    "it; each of those names it back (memsweep.reference_run_id)."
)


class CorpusError(ValueError):
    """A text cell's corpus cannot give what the cell asks; the message names the cell and the field."""


def _tokenizer_key(data: TextDataSpec) -> tuple:
    return (data.corpus_uri, data.format, data.tokenizer, data.vocab_size, data.tokenizer_train_documents)


def _split_key(data: TextDataSpec) -> tuple:
    """What fixes the sequences and their split: everything but the pool size."""
    return dataclasses.replace(data, num_sequences=1)


def _label(cell: Cell) -> str:
    return f"cell [{' '.join(cell.overrides)}]: " if cell.overrides else ""


def prepare_text_cells(cells: list[Cell]) -> list[Cell]:
    """`cells` with every text cell's tokenizer built and stored, its corpus checked, and its reference
    attached (synthetic cells pass through unchanged). Raises CorpusError before anything trains."""
    if not any(c.spec.is_text for c in cells):
        return cells
    survey = _Survey()
    prepared = []
    for cell in cells:
        if not cell.spec.is_text:
            prepared.append(cell)
            continue
        storage = cell.options.storage
        try:
            data = dataclasses.replace(cell.spec.data, tokenizer_hash=survey.tokenizer_hash(cell.spec.data, storage))
            available = survey.available(data, storage)
        except TextDataError as err:
            raise CorpusError(f"{_label(cell)}data.corpus_uri: {err}") from None
        except OSError as err:  # writing beside the checkpoints
            raise CorpusError(f"{_label(cell)}storage={storage!r}: cannot store the tokenizer "
                              f"({type(err).__name__}: {err})") from None
        whole_pool = available - data.num_nonmembers - data.num_test
        if whole_pool < 1:
            raise CorpusError(
                f"{_label(cell)}data.num_nonmembers={data.num_nonmembers}, data.num_test={data.num_test}: "
                f"corpus {data.corpus_uri!r} holds {available} distinct {data.seq_len}-token "
                "sequences, which leaves no training pool")
        if data.num_sequences > whole_pool:
            raise CorpusError(
                f"{_label(cell)}data.num_sequences={data.num_sequences}: corpus {data.corpus_uri!r} holds "
                f"{available} distinct {data.seq_len}-token sequences, so the pool has at most "
                f"{whole_pool} beside {data.num_nonmembers} non-members and {data.num_test} test sequences")
        try:
            spec = dataclasses.replace(cell.spec, data=data)
            options = cell.reference_options or ReferenceOptions()
            if options.enabled:
                spec = dataclasses.replace(spec, reference=_reference_spec(spec, options, whole_pool))
        except SpecError as err:
            raise CorpusError(f"{_label(cell)}{err}") from None
        prepared.append(dataclasses.replace(cell, spec=spec))
    return prepared


class _Survey:
    """What the driver learns about the corpora of one plan: each tokenizer's hash and each split's
    number of distinct sequences, each found once per plan.

    Both are also kept in an index beside the stored tokenizers, `<storage>/tokenizers/index/`, keyed
    by the settings and by the corpus's fingerprint (every file's path, size and modification time):
    a later plan of the same corpus (status, resume, aggregate, a relaunch) lists its files instead of
    reading and tokenizing it again, and a changed corpus is read afresh."""

    def __init__(self):
        self.hashes: dict[tuple, str] = {}
        self.counts: dict[tuple, int] = {}
        self.fingerprints: dict[tuple, str] = {}

    def fingerprint(self, data: TextDataSpec) -> str:
        key = (data.corpus_uri, data.format)
        if key not in self.fingerprints:
            fs, files = corpus_files(data.corpus_uri, data.format)
            infos = fs.get_file_info([path for path, _ in files])
            listing = [(i.path, i.size, i.mtime_ns, fmt) for i, (_, fmt) in zip(infos, files)]
            self.fingerprints[key] = _digest(listing)
        return self.fingerprints[key]

    def tokenizer_hash(self, data: TextDataSpec, storage: str) -> str:
        key = (_tokenizer_key(data), storage)
        if key not in self.hashes:
            index = _index_uri(storage, ["tokenizer", self.fingerprint(data), *_tokenizer_key(data)])
            found = _read_json(index)
            if found is not None and read_bytes(tokenizer_uri(storage, found["tokenizer_hash"])) is not None:
                self.hashes[key] = found["tokenizer_hash"]
            else:
                tokenizer = build_tokenizer(data)
                save_tokenizer(tokenizer, tokenizer_uri(storage, tokenizer.content_hash))
                self.hashes[key] = tokenizer.content_hash
                write_atomic(index, _json({"tokenizer_hash": tokenizer.content_hash, "corpus_uri": data.corpus_uri}))
        return self.hashes[key]

    def available(self, data: TextDataSpec, storage: str) -> int:
        """Distinct S-token sequences of the corpus (read_sequences checks it is readable, not empty
        and long enough for one sequence)."""
        split = _split_key(data)
        key = (split, storage)
        if key not in self.counts:
            index = _index_uri(storage, ["sequences", self.fingerprint(data), repr(split)])
            found = _read_json(index)
            if found is None:
                tokenizer = stored_tokenizer(storage, data.tokenizer_hash)
                found = {"available": len(read_sequences(data, tokenizer)[0]), "corpus_uri": data.corpus_uri}
                write_atomic(index, _json(found))
            self.counts[key] = int(found["available"])
        return self.counts[key]


def _json(value) -> bytes:
    return json.dumps(value, sort_keys=True, default=str).encode()


def _digest(value) -> str:
    return hashlib.sha256(_json(value)).hexdigest()


def _index_uri(storage: str, key: list) -> str:
    return under(storage, "tokenizers", "index", f"{_digest(key)}.json")


def _read_json(uri: str) -> dict | None:
    data = read_bytes(uri)
    return None if data is None else json.loads(data)


def _reference_spec(spec: CellSpec, options: ReferenceOptions, whole_pool: int) -> CellSpec:
    size = whole_pool if options.num_sequences is None else options.num_sequences
    if size > whole_pool:
        raise SpecError(f"data.reference.num_sequences={size}: the pool has at most {whole_pool} sequences")
    model = spec.model
    if options.n_layer is not None:
        model = ModelSpec(f"oracle_l{options.n_layer}_d{options.n_embd}", options.n_layer, options.n_head,
                          options.n_embd)
    data = dataclasses.replace(spec.data, num_sequences=size)
    return CellSpec(model=model, data=data, train=spec.train, precision=spec.precision, seed=options.seed)


def reference_cell(cell: Cell) -> Cell:
    """The cell that trains `cell`'s reference model: recorded in REFERENCE_EXPERIMENT, so any sweep of
    the same store that asks for the same reference finds it FINISHED and reuses it."""
    reference = cell.spec.reference
    if reference is None:
        raise ValueError(f"cell {cell.cell_id} has no reference")
    options = dataclasses.replace(cell.options, experiment=REFERENCE_EXPERIMENT)
    return Cell(spec=reference, options=options, overrides=(f"reference of {cell.spec.readable_slug}",))


def reference_cells(cells: list[Cell]) -> list[Cell]:
    """The distinct reference cells that `cells` need, in first-use order."""
    seen: dict[str, Cell] = {}
    for cell in cells:
        if cell.spec.reference is not None and cell.spec.reference.cell_id not in seen:
            seen[cell.spec.reference.cell_id] = reference_cell(cell)
    return list(seen.values())
