"""The storage layer: every file of a run or a search that outlives a process is read and written here, whether the
location is a local folder or a URI (``s3://``, ``gs://``, ``file://``, ...), through pyarrow.fs.

Why one layer: ``Path("s3://b/x")`` is ``s3:/b/x``, a relative local path, so any code that builds a ``Path`` from a
storage location works on a laptop and silently writes to the wrong place on a cluster. Here a location is always a
string, joined with ``/``; local folders and URIs take the same code path (a ``file://`` URI is a local folder seen
through the URI branch, which is how tests prove the URI path on one machine).

Writes are atomic where a reader could see half a file: on a local filesystem a file is written beside its target
and renamed over it; an object store publishes an object only when its upload completes.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.fs

log = logging.getLogger(__name__)


def is_uri(path: str) -> bool:
    """A location with a scheme (``s3://``, ``file://``): only `filesystem` and `absolute` need to know."""
    return "://" in str(path)


def absolute(path: str) -> str:
    """A location every process reads the same: a local path made absolute (``~`` expanded) against the working
    directory of the entry point that was given it — Ray Train's ``Result.from_path`` and Ray's workers need that;
    a URI as it is. Entry points call this once on what the user typed."""
    path = str(path)
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


def filesystem(path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    path = str(path)
    if is_uri(path):
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), str(Path(path).expanduser())


def _split_query(path: str) -> tuple[str, str]:
    """``s3://b/x?endpoint_override=host:9000&scheme=http`` → (``s3://b/x``, ``?endpoint_override=…``): a URI's
    options (an S3-compatible server's address) stay at its end whatever is joined to it."""
    path = str(path)
    if is_uri(path) and "?" in path:
        head, query = path.split("?", 1)
        return head, f"?{query}"
    return path, ""


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI, its ``?options`` kept last (never through ``Path``: it would
    fold ``s3://`` into ``s3:/``)."""
    out, query = _split_query(base)
    out = out.rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out + query


def name(path: str) -> str:
    return _split_query(path)[0].rstrip("/").rsplit("/", 1)[-1]


def _type(path: str) -> pyarrow.fs.FileType:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type


def is_file(path: str) -> bool:
    return _type(path) == pyarrow.fs.FileType.File


def is_dir(path: str) -> bool:
    return _type(path) == pyarrow.fs.FileType.Directory


def exists(path: str) -> bool:
    return _type(path) != pyarrow.fs.FileType.NotFound


def makedirs(path: str) -> None:
    fs, inner = filesystem(path)
    fs.create_dir(inner, recursive=True)


def read_bytes(path: str) -> bytes:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode()


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file; a reader sees the old file or the new one, never a part."""
    fs, inner = filesystem(path)
    parent = inner.rsplit("/", 1)[0] if "/" in inner else ""
    if parent:
        fs.create_dir(parent, recursive=True)
    if fs.type_name != "local":  # an object appears only when its upload completes
        with fs.open_output_stream(inner) as f:
            f.write(data)
        return
    tmp = f"{inner}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, inner)  # rename: atomic on one local filesystem


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2, default=str))


def append_line(path: str, line: str) -> None:
    """Append one line (object stores cannot append: the file is rewritten; callers are its only writer)."""
    old = read_bytes(path) if is_file(path) else b""
    write_bytes(path, old + line.rstrip("\n").encode() + b"\n")


def list_names(path: str, *, dirs: bool | None = None) -> list[str]:
    """Names directly under a folder (sorted; only folders with ``dirs=True``, only files with ``dirs=False``);
    nothing when it does not exist."""
    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type != pyarrow.fs.FileType.Directory:
        return []
    infos = fs.get_file_info(pyarrow.fs.FileSelector(inner))
    want = {None: None, True: pyarrow.fs.FileType.Directory, False: pyarrow.fs.FileType.File}[dirs]
    return sorted(i.base_name for i in infos if want is None or i.type == want)


def delete_file(path: str) -> None:
    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type == pyarrow.fs.FileType.File:
        fs.delete_file(inner)


def delete_dir(path: str) -> None:
    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type == pyarrow.fs.FileType.Directory:
        fs.delete_dir(inner)


def same_place(local: str | Path, location: str) -> bool:
    """True when ``location`` is the local folder ``local`` itself (nothing to copy)."""
    fs, inner = filesystem(location)
    return fs.type_name == "local" and Path(inner).resolve() == Path(local).expanduser().resolve()


def upload(local: str | Path, dest: str) -> None:
    """Copy a local file or folder (recursively) to ``dest``; existing files there are overwritten."""
    local = Path(local)
    if same_place(local, dest):
        return
    if local.is_file():
        write_bytes(dest, local.read_bytes())
        return
    fs, inner = filesystem(dest)
    fs.create_dir(inner, recursive=True)
    pyarrow.fs.copy_files(str(local), inner, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)


def download(src: str, local: str | Path) -> Path:
    """Copy a file or folder at ``src`` to the local path ``local`` → ``local``."""
    local = Path(local)
    if same_place(local, src):
        return local
    fs, inner = filesystem(src)
    if fs.get_file_info(inner).type == pyarrow.fs.FileType.File:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f"{local.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(read_bytes(src))
        tmp.replace(local)
        return local
    local.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(inner, str(local), source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
    return local


def replace_dir(local: str | Path, dest: str) -> None:
    """Make ``dest`` a copy of the local folder ``local`` (what was there before is removed first)."""
    if same_place(local, dest):
        return
    delete_dir(dest)
    upload(local, dest)


@contextmanager
def local_copy(path: str) -> Iterator[Path]:
    """A local path holding the file or folder at ``path``: the path itself when it is local, else a temporary copy
    (for readers that need a real file: SQLite, PIL, ``from_pretrained``)."""
    fs, inner = filesystem(path)
    if fs.type_name == "local":
        yield Path(inner)
        return

    tmp = tempfile.mkdtemp(prefix="raysal-")
    try:
        yield download(path, Path(tmp) / name(path))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def local_path(path: str) -> Path | None:
    """The local path of a location on a local filesystem (a folder or ``file://``), None for a remote one."""
    fs, inner = filesystem(path)
    return Path(inner) if fs.type_name == "local" else None
