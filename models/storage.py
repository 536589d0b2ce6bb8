"""Where a URI points: the one place that turns a storage root into a pyarrow filesystem and a path.

Checkpoints, tokenizers and corpora all go through it, so a local folder, s3://, gs:// and hdfs:// work
alike. It imports no torch: the driver resolves corpora and storage without loading it.
"""

from __future__ import annotations

import os
import uuid

import pyarrow.fs as pafs


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
