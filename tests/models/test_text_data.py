"""The text corpus reader, tokenizers, sequences and splits (models/text.py), on slices of the shipped
Shakespeare sample; copies in other formats are built in tmp_path.

    pytest tests/models/test_text_data.py
"""

import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.spec import SpecError, TextDataSpec
from models.text import (
    SAMPLE_CORPUS,
    BPETokenizer,
    ByteTokenizer,
    TextDataError,
    assert_disjoint,
    iter_documents,
    load_text_data,
    load_tokenizer,
    save_tokenizer,
    train_bpe,
    unique_sequences,
)

REPO = Path(__file__).resolve().parents[2]
SAMPLE_DOCS = list(iter_documents(str(SAMPLE_CORPUS)))


def spec(uri, **overrides) -> TextDataSpec:
    fields = dict(corpus_uri=str(uri), seq_len=32, num_sequences=100, num_nonmembers=50, num_test=50)
    return TextDataSpec(**{**fields, **overrides})


def write_text(path, docs, newline="\n"):
    path.write_bytes(("\n\n".join(docs) + "\n").replace("\n", newline).encode())
    return path


def write_jsonl(path, docs):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, "text": doc}) + "\n")
    return path


def write_parquet(path, docs, row_group_size=64):
    table = pa.table({"id": list(range(len(docs))), "text": docs})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_the_shipped_sample_is_public_domain_shakespeare_of_about_100_kb():
    assert 90_000 < SAMPLE_CORPUS.stat().st_size < 110_000
    assert SAMPLE_DOCS[0] == "First Citizen:\nBefore we proceed any further, hear me speak."
    assert len(SAMPLE_DOCS) > 700 and all(doc and doc == doc.rstrip() for doc in SAMPLE_DOCS)


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_text_jsonl_and_parquet_copies_give_the_same_sequences(tmp_path, tokenizer):
    docs = SAMPLE_DOCS[:300]
    copies = [
        write_text(tmp_path / "c.txt", docs, newline="\r\n"),  # CRLF: normalised
        write_jsonl(tmp_path / "c.jsonl", docs),
        write_jsonl(tmp_path / "c.jsonl.gz", docs),
        write_parquet(tmp_path / "c.parquet", docs),
    ]
    vocab = 300 if tokenizer == "bpe" else 257
    results = [load_text_data(spec(p, tokenizer=tokenizer, vocab_size=vocab)) for p in copies]
    first = results[0]
    assert first.pool.shape == (100, 32) and first.pool.dtype == np.int64
    for other in results[1:]:
        assert other.tokenizer.content_hash == first.tokenizer.content_hash
        for a, b in [(first.pool, other.pool), (first.nonmembers, other.nonmembers),
                     (first.test, other.test)]:
            np.testing.assert_array_equal(a, b)


def test_plain_text_paragraphs_do_not_depend_on_chunk_size_or_line_endings(tmp_path):
    messy = ["Para one\nline two", "  indented para", "third\twith tab", "été 漢字 🙂"]
    raw = "\n\n\n".join(messy).replace("\n", "\r\n") + "\r\n \t\r\n\r"
    path = tmp_path / "messy.txt"
    path.write_bytes(("\ufeff" + raw).encode())  # with a byte-order mark
    for chunk in (1, 2, 3, 7, 1 << 20):
        assert list(iter_documents(str(path), chunk_bytes=chunk)) == messy, chunk
    whole = str(SAMPLE_CORPUS)
    assert list(iter_documents(whole, chunk_bytes=997)) == SAMPLE_DOCS


def test_splits_never_share_a_sequence_and_pools_nest(tmp_path):
    small = load_text_data(spec(SAMPLE_CORPUS, num_sequences=100, split_seed=3))
    large = load_text_data(spec(SAMPLE_CORPUS, num_sequences=400, split_seed=3))
    for data in (small, large):
        assert_disjoint(data.pool, data.nonmembers, data.test)
        rows = np.concatenate([data.pool, data.nonmembers, data.test])
        assert len(np.unique(rows, axis=0)) == len(rows)  # on the actual tokens
    # Growing the pool keeps test and non-members fixed and the smaller pool inside the larger.
    np.testing.assert_array_equal(small.test, large.test)
    np.testing.assert_array_equal(small.nonmembers, large.nonmembers)
    np.testing.assert_array_equal(small.pool, large.pool[:100])
    other_seed = load_text_data(spec(SAMPLE_CORPUS, num_sequences=100, split_seed=4))
    assert not np.array_equal(other_seed.pool, small.pool)
    with pytest.raises(AssertionError):
        assert_disjoint(small.pool, small.pool[:1])


def test_exact_duplicates_are_dropped(tmp_path):
    # Each paragraph is 15 bytes + EOS = one 16-token sequence, so repeats repeat whole sequences.
    paragraphs = [f"paragraph {i:05d}" for i in range(40)]
    assert all(len(p) == 15 for p in paragraphs)
    repeated = paragraphs + paragraphs[::2] + paragraphs[:5]
    path = write_text(tmp_path / "dups.txt", repeated)
    docs = list(iter_documents(str(path)))
    for dedupe_documents in (True, False):
        rows, stats = unique_sequences(docs, ByteTokenizer(), 16, dedupe_documents=dedupe_documents)
        assert rows.shape == (40, 16)
        assert ByteTokenizer().decode(rows[7]) == "paragraph 00007<|endoftext|>"  # first occurrences, in order
        assert len(np.unique(rows, axis=0)) == 40
        if dedupe_documents:
            assert (stats.num_duplicate_documents, stats.num_duplicate_sequences) == (25, 0)
        else:
            assert (stats.num_duplicate_documents, stats.num_duplicate_sequences) == (0, 25)
    data = load_text_data(spec(path, seq_len=16, num_sequences=30, num_nonmembers=5, num_test=5))
    assert data.num_available == 40


def test_a_corpus_is_read_as_a_stream_not_whole(tmp_path):
    docs = SAMPLE_DOCS * 12  # about 1.2 MB of text
    size = sum(map(len, docs))
    text = write_text(tmp_path / "big.txt", docs)
    jsonl = write_jsonl(tmp_path / "big.jsonl", docs)
    for path in (text, jsonl):
        tracemalloc.start()
        count = sum(1 for _ in iter_documents(str(path), chunk_bytes=16 << 10))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert count == len(docs)
        assert peak < size / 8, (path.name, peak, size)  # a few 16 KB chunks, never the file
    parquet = write_parquet(tmp_path / "big.parquet", docs, row_group_size=256)
    base = pa.total_allocated_bytes()
    peak = 0
    for i, _ in enumerate(iter_documents(str(parquet), batch_rows=64)):
        if i % 50 == 0:
            peak = max(peak, pa.total_allocated_bytes() - base)
    assert peak < size / 4, (peak, size)  # one row group at a time


def test_bpe_trains_deterministically_round_trips_and_stores_through_a_uri(tmp_path):
    docs = SAMPLE_DOCS[:400]
    a, b = train_bpe(iter(docs), 400), train_bpe(list(docs), 400)
    assert a.to_json() == b.to_json() and a.content_hash == b.content_hash
    assert a.vocab_size == 400 and a.eos_id == 0
    assert train_bpe(docs, 420).content_hash != a.content_hash
    # Rust hash maps are seeded per process: another interpreter must still train the same BPE.
    code = ("import sys; from models.text import *; "
            "print(train_bpe(list(iter_documents(str(SAMPLE_CORPUS)))[:400], 400).content_hash)")
    other = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                           timeout=120, check=True)
    assert other.stdout.strip() == a.content_hash
    for text in docs[:50] + ["été 漢字 🙂\r\n\ttabs", "literal <|endoftext|> stays text"]:
        ids = a.encode(text)
        assert a.eos_id not in ids and all(0 <= i < a.vocab_size for i in ids)
        assert a.decode(ids) == text
    assert len(a.encode(" ".join(docs[:50]))) < 0.7 * len(" ".join(docs[:50]).encode())  # it merges

    uri = f"file://{tmp_path}/sweep/tokenizer.json"
    save_tokenizer(a, uri)
    loaded = load_tokenizer(uri)
    assert isinstance(loaded, BPETokenizer) and loaded.content_hash == a.content_hash
    assert loaded.encode("literal <|endoftext|>") == a.encode("literal <|endoftext|>")
    save_tokenizer(ByteTokenizer(), str(tmp_path / "bytes.json"))
    assert isinstance(load_tokenizer(str(tmp_path / "bytes.json")), ByteTokenizer)

    # The stored tokenizer is what every cell uses: the same sequences as training it afresh.
    spec_bpe = spec(SAMPLE_CORPUS, tokenizer="bpe", vocab_size=400, tokenizer_train_documents=400)
    fresh, stored = load_text_data(spec_bpe), load_text_data(spec_bpe, tokenizer=loaded)
    np.testing.assert_array_equal(fresh.pool, stored.pool)


def test_byte_tokenizer_appends_eos_as_id_256():
    tok = ByteTokenizer()
    assert tok.vocab_size == 257 and tok.decode(tok.encode("été")) == "été"
    rows, stats = unique_sequences(["ab", "cd"], tok, 3)
    np.testing.assert_array_equal(rows, [[97, 98, 256], [99, 100, 256]])
    assert stats.num_tokens == 6


def test_file_uris_folders_and_globs(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", SAMPLE_DOCS[:200])
    write_parquet(folder / "part-1.parquet", SAMPLE_DOCS[200:400])
    (folder / "_SUCCESS").write_text("")
    expected = SAMPLE_DOCS[:400]
    assert list(iter_documents(f"file://{folder}")) == expected
    assert list(iter_documents(str(folder / "part-*"))) == expected
    assert list(iter_documents(f"file://{folder}/*.parquet")) == SAMPLE_DOCS[200:400]
    plain = tmp_path / "corpus.dat"
    write_text(plain, SAMPLE_DOCS[:10])
    assert list(iter_documents(str(plain), format="text")) == SAMPLE_DOCS[:10]


def test_a_star_stays_in_its_folder_and_a_double_star_crosses_folders(tmp_path):
    """As shells, fsspec and DuckDB read globs: `fineweb/*.parquet` must not take `fineweb/old/x.parquet`
    (that would change the corpus, its tokenizer and every cell id without a word)."""
    folder = tmp_path / "fineweb"
    (folder / "old").mkdir(parents=True)
    write_parquet(folder / "a.parquet", SAMPLE_DOCS[:100])
    write_parquet(folder / "old" / "b.parquet", SAMPLE_DOCS[100:200])
    assert list(iter_documents(f"file://{folder}/*.parquet")) == SAMPLE_DOCS[:100]
    assert list(iter_documents(f"{folder}/*.par?uet")) == SAMPLE_DOCS[:100]
    assert list(iter_documents(f"file://{folder}/**/*.parquet")) == SAMPLE_DOCS[:200]  # a/**/b: a/b too
    assert list(iter_documents(f"{folder}/**")) == SAMPLE_DOCS[:200]
    with pytest.raises(TextDataError, match="no file matches"):
        list(iter_documents(f"{folder}/[!a].parquet"))
    assert list(iter_documents(f"{folder}/o*/[a-c].parquet")) == SAMPLE_DOCS[100:200]


def error_of(uri, **overrides) -> str:
    with pytest.raises(TextDataError) as info:
        load_text_data(spec(uri, **overrides))
    message = str(info.value)
    assert str(uri) in message, message  # names the corpus
    return message


def test_unreadable_corpora_give_clear_errors(tmp_path):
    assert "no such file" in error_of(tmp_path / "missing.txt")
    assert "no file matches" in error_of(tmp_path / "*.jsonl")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet at all" * 10)
    assert "unreadable parquet" in error_of(bad)
    no_text = tmp_path / "notext.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), no_text)
    assert "no 'text' column" in error_of(no_text)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "fine"}\n\n{"body": "x"}\n')
    assert "line 3 has no 'text' field" in error_of(jsonl)
    jsonl.write_text('{"text": "fine"}\n{"text": \n')
    assert "line 2 is not JSON" in error_of(jsonl)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    assert "not UTF-8" in error_of(latin)
    odd = tmp_path / "c.csv"
    odd.write_text("text\nhello\n")
    assert "no known extension" in error_of(odd)


def test_a_corpus_without_read_permission_gives_a_clear_error(tmp_path):
    locked = write_text(tmp_path / "locked.txt", SAMPLE_DOCS[:10])
    locked.chmod(0)
    code = (f"from models.text import *\ntry: list(iter_documents({str(locked)!r}))\n"
            "except TextDataError as e: print(e)")
    command = [sys.executable, "-c", code]
    if os.geteuid() == 0:  # root reads anything: drop the capabilities that let it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv")
        caps = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *command]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    if result.returncode and "setpriv" in result.stderr:
        pytest.skip(f"cannot drop root's capabilities here: {result.stderr.strip()}")
    assert f"corpus {str(locked)!r}" in result.stdout and "Permission" in result.stdout, result


def test_empty_short_and_too_small_corpora_give_clear_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n\t\n")
    assert "empty" in error_of(empty)
    assert "empty" in error_of(write_parquet(tmp_path / "empty.parquet", []))
    short = write_text(tmp_path / "short.txt", ["To be,", "or not"])
    message = error_of(short)
    assert "14 tokens" in message and "shorter than data.seq_len=32" in message
    message = error_of(SAMPLE_CORPUS, num_sequences=3000)
    assert "has 3095 distinct complete 32-token sequences" in message and "3100 requested" in message


def test_text_data_spec_validates_with_field_named_errors():
    cases = {
        "data.tokenizer='words'": dict(tokenizer="words"),
        "data.vocab_size=300 must be 257": dict(vocab_size=300),
        "data.vocab_size=100 must be at least 258": dict(tokenizer="bpe", vocab_size=100),
        "data.format='csv'": dict(format="csv"),
        "data.seq_len=1": dict(seq_len=1),
        "data.num_sequences=0": dict(num_sequences=0),
        "data.num_test=-1": dict(num_test=-1),
        "data.max_sequences=10": dict(max_sequences=10),
        "data.corpus_uri=''": dict(corpus_uri=""),
    }
    for expected, overrides in cases.items():
        with pytest.raises(SpecError, match=expected.replace("(", r"\(")):
            spec(SAMPLE_CORPUS, **overrides)
    valid = spec(SAMPLE_CORPUS, tokenizer="bpe", vocab_size=512)
    assert pickle.loads(pickle.dumps(valid)) == valid and valid.num_required == 200


def test_max_sequences_reads_only_a_prefix_of_the_corpus():
    consumed = []

    def documents():
        for i in range(20_000):
            consumed.append(i)
            yield f"document number {i}"

    capped, stats = unique_sequences(documents(), ByteTokenizer(), 32, max_sequences=50)
    full, _ = unique_sequences(SAMPLE_DOCS, ByteTokenizer(), 32)
    assert capped.shape == (50, 32) and stats.num_cut_sequences == 50
    assert len(consumed) < 3000  # stopped after the batch that filled the cap
    prefix, _ = unique_sequences(SAMPLE_DOCS, ByteTokenizer(), 32, max_sequences=300)
    np.testing.assert_array_equal(prefix, full[:300])
