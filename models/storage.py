"""Where a URI points: the one place that turns a storage root into a pyarrow filesystem and a path.

Checkpoints, tokenizers and corpora all go through it, so a local folder, s3://, gs:// and hdfs:// work
alike. It imports no torch: the driver resolves corpora and storage without loading it.
"""

from __future__ import annotations

import os

import pyarrow.fs as pafs


def open_storage(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it. Plain paths are local (made absolute)."""
    if "://" not in uri:
        uri = os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)
