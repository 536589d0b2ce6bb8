"""Where a URI points: the one place that turns a storage root into a pyarrow filesystem and a path.

Checkpoints, tokenizers and corpora all go through it, so a local folder, s3://, gs:// and hdfs:// work
alike. It imports no torch: the driver resolves corpora and storage without loading it.
"""

from __future__ import annotations

import os
import re
import uuid

import pyarrow.fs as pafs

# The URI schemes pyarrow's FileSystem.from_uri opens (pyarrow 25): a storage root or corpus URI with
# any other scheme is refused when the configuration is read, before a run exists.
SCHEMES = ("file", "local", "mock", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def unknown_scheme(uri: str) -> str | None:
    """The scheme of `uri` when no pyarrow filesystem opens it (None for plain paths and known schemes).
    Only the text is read: nothing is connected to."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", uri)
    scheme = match.group(1).lower() if match else None
    return scheme if scheme is not None and scheme not in SCHEMES else None


def glob_pattern(pattern: str) -> re.Pattern:
    """A glob as shells, fsspec and DuckDB read it: `*` and `?` stay inside one folder, `**` crosses
    folders (`a/**/b` also matches `a/b`), `[...]` is a character class (`[!...]` negated)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (end := _class_end(pattern, i)) > 0:
            body, negated = pattern[i + 1:end], pattern[i + 1] == "!"
            body = (body[1:] if negated else body).replace("\\", "\\\\")
            out.append("[" + ("^" if negated else "\\" if body.startswith("^") else "") + body + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _class_end(pattern: str, start: int) -> int:
    """Where the character class opened at `start` closes (-1: an unclosed `[` is literal); a `]`
    right after `[` or `[!` belongs to the class."""
    j = start + 1 + (pattern[start + 1:start + 2] == "!")
    return pattern.find("]", j + (pattern[j:j + 1] == "]"))


def open_storage(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it. Plain paths are local (made absolute)."""
    if "://" not in uri:
        uri = os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def under(root: str, *parts: str) -> str:
    """The URI of `parts` below `root`, keeping the root's query (`s3://b/p?endpoint_override=...`),
    which configures the filesystem and is not part of the path."""
    base, _, query = root.partition("?")
    return "/".join([base.rstrip("/"), *parts]) + (f"?{query}" if query else "")


def write_atomic(uri: str, data: bytes) -> None:
    """Write a small file whole: through a temporary name and a move on a local disk (an object store
    shows each object whole or not at all)."""
    fs, path = open_storage(uri)
    fs.create_dir(path.rpartition("/")[0], recursive=True)
    target = f"{path}.tmp-{uuid.uuid4().hex[:8]}" if fs.type_name == "local" else path
    with fs.open_output_stream(target) as out:
        out.write(data)
    if target != path:
        fs.move(target, path)


def read_bytes(uri: str) -> bytes | None:
    """A file's content, or None when there is no such file."""
    fs, path = open_storage(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path, compression=None) as f:
        return f.read()
