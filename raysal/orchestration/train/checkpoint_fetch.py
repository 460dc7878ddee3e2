"""Copying from a checkpoint on storage only what one process reads: a resuming rank's part, or the folder an
export copies.

Why: ``Checkpoint.to_directory`` copies the whole checkpoint to every rank. Full finetuning of a 7B model sharded
over N ranks keeps the gathered ``model/`` (fp32: 28 GB) and every rank's shards of the weights and AdamW moments
(84 GB in all), so each rank pulled ~112 GB to read ``state.pt`` and its own 84/N GB. Here a resuming rank fetches
(`raysal.loop.checkpoint` layout):

- ``state.pt`` (every rank: `load_checkpoint` reads it), ``history.jsonl`` (rank 0 alone re-logs and saves rows);
- of ``sharded/``: ``.metadata``, its own files (``torch.distributed.checkpoint``'s FileSystemWriter names rank
  r's ``__{r}_{i}.distcp``), and from the other ranks' files only the byte ranges of the items every rank loads:
  DCP writes a replicated item once, in one rank's file (the optimizer's ``param_groups`` and AdamW's scalar
  ``step`` per parameter: a few hundred KB for 7B);
- never ``adapter/``, ``model/``, ``connector/`` (what users load, not what a run resumes from).

A checkpoint written by another number of ranks is resharded on load (a rank may read any part of any file): then
the rank fetches every shard file, and says why. The local ``sharded/.metadata`` is rewritten to point at what was
fetched: the replicated ranges at their place in one local file, the other ranks' items at a file named
``….not-fetched-by-rank-{r}`` — should DCP ever want one, the load fails naming it instead of reading zeros.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import pyarrow.fs
import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from raysal import storage
from raysal.loop.checkpoint import HISTORY, SHARDED, STATE

if TYPE_CHECKING:  # Ray Train hands a worker its checkpoint; this module never needs Ray itself
    import ray.train

    Source = ray.train.Checkpoint | str

log = logging.getLogger(__name__)

METADATA = ".metadata"  # DCP's global metadata file in sharded/
REPLICATED = "replicated.distcp"  # local file: the ranges fetched from the other ranks' files, end to end
_RANK_FILE = re.compile(r"__(\d+)_\d+\.distcp")  # FileSystemWriter's name for rank r's i-th file
_CHUNK = 64 << 20  # bytes per read when streaming a file


@dataclass
class Fetched:
    """What was copied into ``local``: checkpoint-relative path → bytes read from it (a part of a file for the
    ranges read from another rank's shard file)."""

    local: Path
    files: dict[str, int] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(self.files.values())

    def describe(self) -> str:
        return f"{len(self.files)} files, {self.bytes / 1e6:.1f} MB"


@dataclass(frozen=True)
class _Source:
    fs: pyarrow.fs.FileSystem
    root: str  # the checkpoint folder inside ``fs``
    label: str  # what error messages name

    def path(self, rel: str = "") -> str:
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    def entries(self, rel: str = "") -> dict[str, pyarrow.fs.FileType]:
        """Names directly under a folder of the checkpoint → their type."""
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.path(rel), allow_not_found=True))
        return {i.base_name: i.type for i in infos}

    def walk(self, rel: str) -> Iterator[tuple[str, int]]:
        """(path relative to the checkpoint, size) of every file under a folder of it."""
        base = self.path(rel).rstrip("/")
        for info in self.fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True)):
            if info.type == pyarrow.fs.FileType.File:
                if not info.path.startswith(base + "/"):
                    raise ValueError(f"{self.label}: {info.path} listed under {base}/ is not inside it")
                yield f"{rel}/{info.path[len(base) + 1 :]}", info.size


def _source(checkpoint: Source) -> _Source:
    """A ``ray.train.Checkpoint`` (its ``filesystem`` and ``path``) or a storage location (local path or URI)."""
    if hasattr(checkpoint, "filesystem") and hasattr(checkpoint, "path"):
        src = _Source(checkpoint.filesystem, str(checkpoint.path), str(checkpoint.path))
    else:
        fs, inner = storage.filesystem(str(checkpoint))
        src = _Source(fs, inner, str(checkpoint))
    if src.fs.get_file_info(src.root).type != pyarrow.fs.FileType.Directory:
        raise FileNotFoundError(f"{src.label}: no checkpoint folder there")
    return src


def _copy(src: _Source, rel: str, dest: Path) -> int:
    """Stream one file of the checkpoint to ``dest`` (written beside it, then renamed) → bytes copied."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    n = 0
    with src.fs.open_input_stream(src.path(rel)) as f, tmp.open("wb") as out:
        while chunk := f.read(_CHUNK):
            out.write(chunk)
            n += len(chunk)
    tmp.replace(dest)
    return n


def folders(checkpoint: Source) -> list[str]:
    """The folders at the top of a checkpoint (``adapter``, ``model``, ``sharded``, ...), listed, not fetched."""
    src = _source(checkpoint)
    return sorted(n for n, t in src.entries().items() if t == pyarrow.fs.FileType.Directory)


def fetch_folder(checkpoint: Source, name: str, local: Path | str) -> Fetched:
    """Copy the folder ``name`` of a checkpoint (an export's ``adapter/``, ``model/``, ``connector/``) to the local
    folder ``local`` and nothing else."""
    src, local = _source(checkpoint), Path(local)
    if src.entries().get(name) != pyarrow.fs.FileType.Directory:
        raise FileNotFoundError(f"{src.label}: no {name}/ in the checkpoint")
    got = Fetched(local)
    local.mkdir(parents=True, exist_ok=True)
    for rel, _ in src.walk(name):
        got.files[rel] = _copy(src, rel, local / rel.removeprefix(f"{name}/"))
    log.info("fetched %s (%s) from %s", f"{name}/", got.describe(), src.label)
    return got


def fetch_for_resume(checkpoint: Source, local: Path | str, *, rank: int, world_size: int) -> Fetched:
    """Copy to the local folder ``local`` what rank ``rank`` of ``world_size`` reads to resume from a checkpoint
    (`load_checkpoint`, `load_history`); ``local`` is then the folder to resume from."""
    src, local = _source(checkpoint), Path(local)
    top = src.entries()
    if top.get(STATE) != pyarrow.fs.FileType.File:
        raise FileNotFoundError(f"{src.label}: not a raysal checkpoint (no {STATE})")
    got = Fetched(local)
    local.mkdir(parents=True, exist_ok=True)
    got.files[STATE] = _copy(src, STATE, local / STATE)
    if rank == 0 and top.get(HISTORY) == pyarrow.fs.FileType.File:
        got.files[HISTORY] = _copy(src, HISTORY, local / HISTORY)
    if top.get(SHARDED) == pyarrow.fs.FileType.Directory:
        _fetch_shards(src, local, rank, world_size, got)
    log.info("rank %d: fetched %s for resume from %s", rank, got.describe(), src.label)
    return got


def _saved_world_size(state_file: Path) -> int | None:
    """The number of ranks that wrote a checkpoint (`save_checkpoint` records it; None before it did)."""
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    return state.get("world_size")


def _every_rank_reads(item: Any) -> bool:
    """True for a DCP item that each rank loads whole: bytes (``param_groups``) or a tensor saved as one chunk
    covering all of it (a replicated tensor: AdamW's ``step``); False for a tensor saved as several ranks' chunks."""
    if not isinstance(item, TensorStorageMetadata):
        return True
    return len(item.chunks) == 1 and tuple(item.chunks[0].sizes) == tuple(item.size)


def _fetch_shards(src: _Source, local: Path, rank: int, world_size: int, got: Fetched) -> None:
    names = {n for n, t in src.entries(SHARDED).items() if t == pyarrow.fs.FileType.File}
    where = f"{src.label}/{SHARDED}"
    if METADATA not in names:
        raise FileNotFoundError(f"{where}: no {METADATA} (an incomplete sharded checkpoint)")
    out = local / SHARDED
    out.mkdir(parents=True, exist_ok=True)
    meta_rel = f"{SHARDED}/{METADATA}"
    got.files[meta_rel] = _copy(src, meta_rel, out / METADATA)
    with (out / METADATA).open("rb") as f:
        metadata = pickle.load(f)  # what FileSystemReader.read_metadata reads
    paths = {info.relative_path for info in metadata.storage_data.values()}
    missing = sorted(paths - names)
    if missing:
        raise FileNotFoundError(f"{where}: {missing[:3]} named in {METADATA} are missing (an incomplete upload?)")
    saved = _saved_world_size(local / STATE)
    unknown = sorted(p for p in paths if not _RANK_FILE.fullmatch(p))
    why = None
    if saved is None:
        why = f"its {STATE} does not record how many ranks wrote it (saved before raysal recorded it)"
    elif saved != world_size:
        why = f"it was written by {saved} ranks, this run has {world_size} (DCP reshards: a rank may read any file)"
    elif unknown:
        why = f"files not named __<rank>_<i>.distcp: {unknown[:3]}"
    if why is not None:
        log.info("rank %d: fetching every shard file of %s: %s", rank, where, why)
        for rel in sorted(paths):
            got.files[f"{SHARDED}/{rel}"] = _copy(src, f"{SHARDED}/{rel}", out / rel)
        return

    # this rank's files whole; from the others, the items every rank loads (ranges), nothing of their shards
    ranges: dict[str, list[tuple[Any, Any]]] = {}  # other rank's file → [(index, storage info)]
    for index, info in metadata.storage_data.items():
        writer = int(_RANK_FILE.fullmatch(info.relative_path).group(1))
        if writer == rank:
            continue
        if _every_rank_reads(metadata.state_dict_metadata[index.fqn]):
            ranges.setdefault(info.relative_path, []).append((index, info))
        else:
            missing_name = f"{info.relative_path}.not-fetched-by-rank-{rank}"
            metadata.storage_data[index] = dataclasses.replace(info, relative_path=missing_name)
    for rel in sorted(p for p in paths if int(_RANK_FILE.fullmatch(p).group(1)) == rank):
        got.files[f"{SHARDED}/{rel}"] = _copy(src, f"{SHARDED}/{rel}", out / rel)
    if ranges:
        with (out / REPLICATED).open("wb") as dest:
            for rel, items in sorted(ranges.items()):
                got.files[f"{SHARDED}/{rel}"] = _fetch_ranges(src, f"{SHARDED}/{rel}", items, dest, metadata)
    # the local metadata: the same items, each where this rank's copy holds it (or a name saying it does not)
    with (out / METADATA).open("wb") as f:
        pickle.dump(metadata, f)


def _fetch_ranges(src: _Source, rel: str, items: list[tuple[Any, Any]], dest: BinaryIO, metadata: Metadata) -> int:
    """Read ``items``' byte ranges of one file (adjacent ones in one read) and append them to ``dest``, pointing
    their storage info at their new place → bytes read."""
    items = sorted(items, key=lambda x: x[1].offset)
    spans: list[list] = []  # [start, end, items]: contiguous runs of items
    for index, info in items:
        if spans and info.offset == spans[-1][1]:
            spans[-1][1] = info.offset + info.length
            spans[-1][2].append((index, info))
        else:
            spans.append([info.offset, info.offset + info.length, [(index, info)]])
    n = 0
    with src.fs.open_input_file(src.path(rel)) as f:
        for start, end, run in spans:
            data = f.read_at(end - start, start)
            if len(data) != end - start:
                raise OSError(f"{src.label}/{rel}: {len(data)} bytes at {start}, {METADATA} says {end - start}")
            at = dest.tell()
            dest.write(data)
            n += len(data)
            for index, info in run:
                metadata.storage_data[index] = dataclasses.replace(
                    info, relative_path=REPLICATED, offset=at + info.offset - start
                )
    return n
