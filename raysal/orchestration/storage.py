"""Where a run's and a search's files live: a local folder or a URI (``s3://``, ``gs://``, ...), via pyarrow.fs.
The one place that tells them apart."""

from __future__ import annotations

import pyarrow.fs


def is_uri(path: str) -> bool:
    return "://" in path


def filesystem(path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if is_uri(path):
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), path
