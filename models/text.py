"""Text data: a corpus read as a stream, tokenized, cut into S-token sequences, deduplicated and split.

    documents  iter_documents(uri)       plain text (paragraphs), JSONL or Parquet `text`, streamed
    tokens     ByteTokenizer | BPETokenizer   each document's ids + EOS, concatenated into one stream
    sequences  unique_sequences(...)     non-overlapping (N, S) int64 rows, tail dropped, exact repeats
                                         dropped (first occurrence kept)
    splits     split_sequences(...)      one permutation keyed by the split seed: test, non-members,
                                         then the training pool, so they never share a sequence

A corpus is a local path or any URI pyarrow's filesystems open (file://, s3://, gs://, hdfs://; a URI's
query configures the filesystem), naming one file, a folder (every file of a known format under it,
sorted by path) or a glob of files (`*` and `?` within one folder, `**` across folders, `[...]`; `?`
only in local paths, where it is not a URI's query). Files are read in chunks,
Parquet by record batches, so a corpus never has to fit in memory; only the sequences kept do.

Tokenizers need no downloads: bytes (vocab 256 + EOS = 257), or a byte-level BPE trained here with
Hugging Face `tokenizers` and saved as JSON beside the sweep so every cell uses the same one. The split
takes the test set and the non-members first, so sweeping the pool size keeps those two fixed and the
pools nested. Every problem with the corpus is a `TextDataError` raised before anything trains.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from models.spec import BYTE_VOCAB_SIZE, FORMATS, TextDataSpec
from models.storage import glob_pattern, open_storage, under, write_atomic

EXTENSIONS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl",
              ".ndjson": "jsonl", ".parquet": "parquet"}
# pyarrow's input streams decompress these transparently (compression="detect").
COMPRESSIONS = (".gz", ".bz2", ".zst", ".lz4", ".br")
EOS_TEXT = "<|endoftext|>"
CORPORA = Path(__file__).resolve().parent / "corpora"  # corpora shipped with the package
SAMPLE_CORPUS = CORPORA / "shakespeare_sample.txt"
# `memsweep:NAME` names a shipped corpus (models/corpora/NAME): a URI that is the same on every
# machine and install, so cell ids do not depend on where the package lives.
PACKAGE_SCHEME = "memsweep:"
CHUNK_BYTES = 1 << 20  # read size for text and JSONL files
BATCH_ROWS = 1024  # Parquet rows per record batch, and documents per tokenizer call
SPLIT_STREAM = 4  # the SeedSequence stream of the split (models/data.py uses 0-3)
# A blank line: only whitespace between two newlines. One or more of them end a paragraph.
PARAGRAPH_BREAK = re.compile(r"\n(?:[^\S\n]*\n)+")
LEADING_BLANK_LINES = re.compile(r"^(?:[^\S\n]*\n)+")


class TextDataError(ValueError):
    """A corpus cannot give the data asked of it; the message names the corpus and the problem."""


def _error(uri: str, problem: str) -> TextDataError:
    return TextDataError(f"corpus {uri!r}: {problem}")


# ---------------------------------------------------------------------------------------------------
# Documents


def detect_format(path: str) -> str:
    """'text', 'jsonl' or 'parquet' from a file's extension (a compression suffix is looked through)."""
    name = path.lower()
    for suffix in COMPRESSIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    fmt = EXTENSIONS.get(os.path.splitext(name)[1])
    if fmt is None:
        raise ValueError(f"{path!r} has no known extension ({', '.join(EXTENSIONS)}); name the format")
    return fmt


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def resolve_uri(uri: str) -> str:
    """A corpus URI as pyarrow opens it: `memsweep:NAME` becomes the shipped file's path."""
    if uri.startswith(PACKAGE_SCHEME):
        name = uri[len(PACKAGE_SCHEME):]
        shipped = sorted(p.name for p in CORPORA.iterdir() if not p.name.startswith("."))
        if name not in shipped:
            raise _error(uri, f"no such shipped corpus; memsweep ships {', '.join(shipped)}")
        return str(CORPORA / name)
    return uri


def corpus_files(uri: str, format: str | None = None) -> tuple[pafs.FileSystem, list[tuple[str, str]]]:
    """The filesystem and the (path, format) of each file of a corpus, in reading order."""
    if format is not None and format not in FORMATS:
        raise _error(uri, f"format={format!r} is not one of {FORMATS}")
    try:
        fs, path = open_storage(resolve_uri(uri))
        if _is_glob(path):
            base = path[: min(path.find(c) for c in "*?[" if c in path)].rpartition("/")[0] or "/"
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            matches = glob_pattern(path).match
            paths = [i.path for i in infos if i.type == pafs.FileType.File and matches(i.path)]
            if not paths:
                raise _error(uri, "no file matches the pattern")
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise _error(uri, "no such file or folder")
            if info.type == pafs.FileType.Directory:
                infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
                paths = [i.path for i in infos if i.type == pafs.FileType.File
                         and not i.base_name.startswith((".", "_"))  # _SUCCESS, .crc, hidden files
                         and (format is not None or _known(i.path))]
                if not paths:
                    raise _error(uri, "the folder holds no corpus file")
            else:
                paths = [path]
    except TextDataError:
        raise
    except (OSError, pa.ArrowException, ValueError) as e:
        raise _error(uri, f"cannot be opened ({type(e).__name__}: {e})") from e
    files = []
    for p in sorted(paths):
        try:
            files.append((p, format or detect_format(p)))
        except ValueError as e:
            raise _error(uri, str(e)) from None
    return fs, files


def _known(path: str) -> bool:
    try:
        detect_format(path)
        return True
    except ValueError:
        return False


def iter_documents(uri: str, format: str | None = None, *, chunk_bytes: int = CHUNK_BYTES,
                   batch_rows: int = BATCH_ROWS) -> Iterator[str]:
    """The documents of a corpus, one string each, read as a stream.

    Plain text: paragraphs (separated by one or more blank lines; line endings normalised to "\\n",
    leading blank lines and trailing whitespace removed). JSONL: each record's `text` (a str; blank
    lines and null texts are skipped). Parquet: the `text` column, by record batches. Empty documents
    are skipped in every format. The format comes from each file's extension unless `format` is given.
    Errors (unreadable, malformed) raise TextDataError naming the corpus, the file and where."""
    fs, files = corpus_files(uri, format)
    readers = {"text": _text_documents, "jsonl": _jsonl_documents, "parquet": _parquet_documents}
    for path, fmt in files:
        try:
            size = chunk_bytes if fmt != "parquet" else batch_rows
            for doc in readers[fmt](fs, path, uri, size):
                if doc:
                    yield doc
        except TextDataError:
            raise
        except UnicodeDecodeError as e:
            raise _error(uri, f"{path}: not UTF-8 text ({e.reason} at a byte {e.start} of a chunk)") from e
        except (OSError, pa.ArrowException) as e:
            raise _error(uri, f"{path}: unreadable {fmt} ({type(e).__name__}: {e})") from e


def _chunks(fs: pafs.FileSystem, path: str, chunk_bytes: int) -> Iterator[bytes]:
    with fs.open_input_stream(path) as stream:  # compression detected from the extension
        while chunk := stream.read(chunk_bytes):
            yield chunk


def _clean(paragraph: str) -> str:
    return LEADING_BLANK_LINES.sub("", paragraph).rstrip()


def _text_documents(fs: pafs.FileSystem, path: str, uri: str, chunk_bytes: int) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    buffer, held = "", ""  # the paragraph still open; a "\r" whose "\n" may start the next chunk
    for chunk in _chunks(fs, path, chunk_bytes):
        text = held + decoder.decode(chunk)
        text, held = (text[:-1], "\r") if text.endswith("\r") else (text, "")
        # A break is whitespace only, so one that ends in the new text starts in the buffer's
        # trailing whitespace: scan from there, not from the start (a long paragraph stays linear).
        scan_from = len(buffer)
        while scan_from and buffer[scan_from - 1].isspace():
            scan_from -= 1
        buffer += text.replace("\r\n", "\n").replace("\r", "\n")
        start = 0
        for match in PARAGRAPH_BREAK.finditer(buffer, scan_from):
            yield _clean(buffer[start:match.start()])
            start = match.end()
        buffer = buffer[start:]
    tail = held + decoder.decode(b"", final=True)
    yield from (_clean(p) for p in PARAGRAPH_BREAK.split(buffer + tail.replace("\r", "\n")))


def _jsonl_documents(fs: pafs.FileSystem, path: str, uri: str, chunk_bytes: int) -> Iterator[str]:
    line_no, rest = 0, b""
    for chunk in itertools.chain(_chunks(fs, path, chunk_bytes), [None]):
        lines = (rest + (chunk or b"")).split(b"\n")
        rest = b"" if chunk is None else lines.pop()
        for raw in lines:
            line_no += 1
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError as e:
                raise _error(uri, f"{path}: line {line_no} is not JSON ({e})") from None
            if not isinstance(record, dict) or "text" not in record:
                raise _error(uri, f"{path}: line {line_no} has no 'text' field")
            text = record["text"]
            if text is None:
                continue
            if not isinstance(text, str):
                raise _error(uri, f"{path}: line {line_no}: 'text' is a {type(text).__name__}, not a string")
            yield text


def _parquet_documents(fs: pafs.FileSystem, path: str, uri: str, batch_rows: int) -> Iterator[str]:
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        if "text" not in parquet.schema_arrow.names:
            raise _error(uri, f"{path}: no 'text' column (columns: {parquet.schema_arrow.names})")
        text_type = parquet.schema_arrow.field("text").type
        if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)
                or pa.types.is_string_view(text_type)):
            raise _error(uri, f"{path}: column 'text' is {text_type}, not string")
        # One row group at a time: iter_batches over them all pre-buffers the whole file.
        for group in range(parquet.num_row_groups):
            batches = parquet.iter_batches(batch_size=batch_rows, columns=["text"], row_groups=[group])
            for batch in batches:
                for text in batch.column(0).to_pylist():
                    if text is not None:
                        yield text


# ---------------------------------------------------------------------------------------------------
# Tokenizers


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, and id 256 for the end of a document: vocab_size 257."""

    kind = "bytes"
    vocab_size = BYTE_VOCAB_SIZE
    eos_id = BYTE_VOCAB_SIZE - 1

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; EOS shows as "<|endoftext|>", a cut multi-byte character as U+FFFD."""
        out, run = [], bytearray()
        for i in ids:
            if i == self.eos_id:
                out.append(run.decode("utf-8", errors="replace") + EOS_TEXT)
                run = bytearray()
            else:
                run.append(i)
        return "".join(out) + run.decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({"kind": "bytes", "vocab_size": self.vocab_size, "eos_id": self.eos_id},
                          sort_keys=True)

    @property
    def content_hash(self) -> str:
        """sha256 hex of the canonical JSON: equal hashes encode identically."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()


class BPETokenizer:
    """A byte-level BPE (Hugging Face `tokenizers`) whose id 0 is the end-of-document token.

    Any text round-trips (decode(encode(t)) == t); the EOS string inside a document is encoded as
    ordinary text, never as the EOS id."""

    kind = "bpe"

    def __init__(self, tokenizer):
        tokenizer.encode_special_tokens = True  # not serialised: set on every load
        self._tok = tokenizer
        self.eos_id = tokenizer.token_to_id(EOS_TEXT)
        if self.eos_id is None:
            raise ValueError(f"the tokenizer has no {EOS_TEXT} token")
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        return self._tok.to_str()

    @property
    def content_hash(self) -> str:
        """sha256 hex of the canonical JSON (keys sorted): equal hashes encode identically."""
        canonical = json.dumps(json.loads(self.to_json()), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


Tokenizer = ByteTokenizer | BPETokenizer


def train_bpe(documents: Iterable[str], vocab_size: int) -> BPETokenizer:
    """A byte-level BPE with `vocab_size` ids (EOS + 256 bytes + merges), trained on `documents`.

    Deterministic for the same documents in the same order (no seed involved). The vocabulary can
    come out smaller than asked when the documents allow fewer merges."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise ValueError(f"vocab_size={vocab_size} must be at least 258 (EOS + 256 bytes + 1 merge)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=0, show_progress=False,
                                  special_tokens=[EOS_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents, trainer=trainer)
    return BPETokenizer(tok)


def tokenizer_from_json(text: str) -> Tokenizer:
    record = json.loads(text)
    if record.get("kind") == "bytes":
        return ByteTokenizer()
    from tokenizers import Tokenizer as HFTokenizer

    return BPETokenizer(HFTokenizer.from_str(text))


def save_tokenizer(tokenizer: Tokenizer, uri: str) -> None:
    """Write the tokenizer's JSON to `uri` (a path or pyarrow URI), whole."""
    write_atomic(uri, tokenizer.to_json().encode())


def load_tokenizer(uri: str) -> Tokenizer:
    fs, path = open_storage(uri)
    with fs.open_input_stream(path, compression=None) as f:
        return tokenizer_from_json(f.read().decode())


def tokenizer_uri(storage: str, content_hash: str) -> str:
    """Where a sweep's tokenizer lives: beside the checkpoints, named by its content hash."""
    return under(storage, "tokenizers", f"{content_hash}.json")


def stored_tokenizer(storage: str, content_hash: str) -> Tokenizer:
    """The tokenizer the driver stored for a sweep, checked against the hash its cells carry."""
    uri = tokenizer_uri(storage, content_hash)
    try:
        tokenizer = load_tokenizer(uri)
    except (OSError, pa.ArrowException) as e:
        raise TextDataError(f"tokenizer {uri!r} cannot be read ({type(e).__name__}: {e}); "
                            "relaunch the sweep so the driver stores it again") from e
    if tokenizer.content_hash != content_hash:
        raise TextDataError(f"tokenizer {uri!r} has hash {tokenizer.content_hash[:12]}, "
                            f"not the {content_hash[:12]} its cells were planned with")
    return tokenizer


# ---------------------------------------------------------------------------------------------------
# Sequences and splits


def iter_token_batches(documents: Iterable[str], tokenizer: Tokenizer,
                       batch_docs: int = BATCH_ROWS) -> Iterator[np.ndarray]:
    """1-D int64 arrays: each batch of `batch_docs` documents' ids, each followed by EOS, in order."""
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    docs = iter(documents)
    while batch := list(itertools.islice(docs, batch_docs)):
        yield np.concatenate([a for ids in tokenizer.encode_batch(batch) for a in (ids, eos)])


@dataclass(frozen=True)
class SequenceStats:
    """What reading a corpus found: documents (after document dedupe), tokens in the stream
    (with EOS), complete S-token sequences, and exact repeats dropped."""

    num_documents: int
    num_duplicate_documents: int
    num_tokens: int
    num_cut_sequences: int
    num_duplicate_sequences: int


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def unique_sequences(documents: Iterable[str], tokenizer: Tokenizer, seq_len: int, *,
                     dedupe_documents: bool = True, max_sequences: int | None = None,
                     ) -> tuple[np.ndarray, SequenceStats]:
    """(N, S) int64 sequences in corpus order with exact repeats dropped (first occurrence kept),
    and counts. With `dedupe_documents`, repeated documents are dropped before tokenizing, so a
    paragraph that recurs off a sequence boundary cannot leak between splits either. Reading stops
    once `max_sequences` unique sequences are in hand."""
    counts = {"docs": 0, "dup_docs": 0}

    def distinct(docs: Iterable[str]) -> Iterator[str]:
        seen: set[bytes] = set()
        for doc in docs:
            if dedupe_documents:
                key = _digest(doc.encode("utf-8", errors="surrogatepass"))
                if key in seen:
                    counts["dup_docs"] += 1
                    continue
                seen.add(key)
            counts["docs"] += 1
            yield doc

    seen_rows: set[bytes] = set()
    kept: list[np.ndarray] = []  # (k, S) blocks of unique rows
    num_kept = num_cut = num_tokens = 0
    carry = np.empty(0, dtype=np.int64)  # under S tokens waiting for the next batch
    for ids in iter_token_batches(distinct(documents), tokenizer):
        num_tokens += len(ids)
        stream = np.concatenate([carry, ids])
        k = len(stream) // seq_len
        block, carry = stream[: k * seq_len].reshape(k, seq_len), stream[k * seq_len:]
        mask = np.zeros(k, dtype=bool)
        for i, row in enumerate(block):
            if max_sequences is not None and num_kept >= max_sequences:
                break
            num_cut += 1
            key = _digest(row.tobytes())
            if key not in seen_rows:
                seen_rows.add(key)
                mask[i] = True
                num_kept += 1
        kept.append(block[mask])
        if max_sequences is not None and num_kept >= max_sequences:
            break
    sequences = np.concatenate(kept) if kept else np.empty((0, seq_len), dtype=np.int64)
    stats = SequenceStats(counts["docs"], counts["dup_docs"], num_tokens, num_cut, num_cut - num_kept)
    return sequences, stats


def split_sequences(sequences: np.ndarray, num_sequences: int, num_nonmembers: int, num_test: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pool, nonmembers, test) rows of `sequences` (unique rows): one permutation keyed by
    (seed, number of rows) orders them; test takes the first `num_test`, non-members the next, the
    pool the next `num_sequences`. A larger pool therefore contains a smaller one, over fixed
    test and non-member sets."""
    n = len(sequences)
    need = num_sequences + num_nonmembers + num_test
    if need > n:
        raise ValueError(f"{need} sequences requested, {n} available")
    rng = np.random.default_rng(np.random.SeedSequence([SPLIT_STREAM, seed, n]))
    order = rng.permutation(n)
    test = order[:num_test]
    nonmembers = order[num_test:num_test + num_nonmembers]
    pool = order[num_test + num_nonmembers:need]
    return sequences[pool], sequences[nonmembers], sequences[test]


def assert_disjoint(*splits: np.ndarray) -> None:
    """Raise AssertionError if two rows of the given (k, S) arrays hold the same tokens."""
    seen: dict[bytes, int] = {}
    for which, rows in enumerate(splits):
        for row in np.ascontiguousarray(rows, dtype=np.int64):
            key = _digest(row.tobytes())
            if key in seen:
                raise AssertionError(f"a sequence of split {which} repeats one of split {seen[key]}")
            seen[key] = which


@dataclass(frozen=True)
class TextData:
    """The three splits, (k, S) int64 each, the tokenizer they were made with, and the counts."""

    pool: np.ndarray
    nonmembers: np.ndarray
    test: np.ndarray
    tokenizer: Tokenizer
    stats: SequenceStats

    @property
    def num_available(self) -> int:
        return self.stats.num_cut_sequences - self.stats.num_duplicate_sequences


def build_tokenizer(spec: TextDataSpec) -> Tokenizer:
    """The spec's tokenizer: bytes, or a BPE trained on the corpus (deterministic for a corpus)."""
    if spec.tokenizer == "bytes":
        return ByteTokenizer()
    documents = iter_documents(spec.corpus_uri, spec.format)
    if spec.tokenizer_train_documents is not None:
        documents = itertools.islice(documents, spec.tokenizer_train_documents)
    first = next(documents, None)
    if first is None:
        raise _error(spec.corpus_uri, "empty: it holds no document")
    return train_bpe(itertools.chain([first], documents), spec.vocab_size)


def load_text_data(spec: TextDataSpec, tokenizer: Tokenizer | None = None) -> TextData:
    """Read, tokenize, cut, deduplicate and split the spec's corpus; check everything it can.

    Pass the sweep's stored tokenizer (load_tokenizer) so every cell uses the same one; without one
    it is built from the spec. Raises TextDataError (unreadable, empty, too short for one sequence,
    too few sequences for the splits) before anything trains."""
    uri = spec.corpus_uri
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(spec)
    sequences, stats = read_sequences(spec, tokenizer)
    if len(sequences) < spec.num_required:
        raise _error(uri, f"has {len(sequences)} distinct complete {spec.seq_len}-token sequences "
                          f"({stats.num_duplicate_sequences} repeats dropped), fewer than the "
                          f"{spec.num_required} requested (pool {spec.num_sequences} + non-members "
                          f"{spec.num_nonmembers} + test {spec.num_test})")
    pool, nonmembers, test = split_sequences(sequences, spec.num_sequences, spec.num_nonmembers,
                                             spec.num_test, spec.split_seed)
    assert_disjoint(pool, nonmembers, test)
    return TextData(pool, nonmembers, test, tokenizer, stats)


def read_sequences(spec: TextDataSpec, tokenizer: Tokenizer) -> tuple[np.ndarray, SequenceStats]:
    """Every distinct S-token sequence of the corpus, in corpus order, and the counts; raises
    TextDataError when the corpus is unreadable, empty, or shorter than one sequence."""
    uri = spec.corpus_uri
    if tokenizer.kind != spec.tokenizer or tokenizer.vocab_size > spec.vocab_size:
        raise _error(uri, f"the tokenizer ({tokenizer.kind}, vocab {tokenizer.vocab_size}) does not "
                          f"match data.tokenizer={spec.tokenizer!r}, data.vocab_size={spec.vocab_size}")
    documents = iter_documents(uri, spec.format)
    first = next(documents, None)
    if first is None:
        raise _error(uri, "empty: it holds no document")
    sequences, stats = unique_sequences(itertools.chain([first], documents), tokenizer, spec.seq_len,
                                        dedupe_documents=spec.dedupe_documents,
                                        max_sequences=spec.max_sequences)
    if stats.num_cut_sequences == 0:
        raise _error(uri, f"its whole token stream ({stats.num_tokens} tokens in {stats.num_documents} "
                          f"documents, with EOS) is shorter than data.seq_len={spec.seq_len}: "
                          "no complete sequence")
    return sequences, stats
