"""Shard folder (a local folder or a URI) → `ray.data.Dataset` of decoded COCONut samples (DESIGN §2.4).

The one module of `raysal.data` that imports Ray. Model-specific preprocessing (tokenisation, coverage) is added
by the caller with ``ds.map_batches(<callable class>, ...)`` so the processor loads once per actor.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import ray.data

from raysal import storage
from raysal.data.decode import decode_row
from raysal.data.holdout import Holdout, as_holdout
from raysal.data.shards import shard_files


def _read_rows(item: dict, keep: Holdout | None = None, prepare: Callable[[], None] | None = None) -> list[dict]:
    """One shard file → its rows; with ``keep`` set, only the rows whose image id it keeps (`Holdout.keeps`).
    Filtering here, in the read task, keeps the pipeline at one task operator of a stated CPU fraction.
    ``prepare`` runs first, on the node of the task: it makes first-use data there (a local shard folder exists
    only on the node that made it). The filesystem is resolved here, on that node, so an S3 location uses the
    node's own credentials."""
    if prepare is not None:
        prepare()
    fs, inner = storage.filesystem(item["path"])
    rows = pq.read_table(inner, filesystem=fs).to_pylist()
    if keep is None:
        return rows
    return [r for r in rows if keep.keeps(r["image_id"])]


def coconut_dataset(
    shard_dir: Path | str,
    split: str = "train2017",
    *,
    decode: bool = True,
    num_cpus_per_decode: float = 0.25,
    num_cpus_per_read: float = 0.25,
    holdout: float | Holdout = 0.0,
    part: str = "all",
    limit: int | None = None,
    prepare: Callable[[], None] | None = None,
) -> ray.data.Dataset:
    """Read one split of a shard folder (written by `raysal.data.shards`) as a Ray Dataset.

    Rows hold ``image_id``, ``caption``, spans, segment/category ids, ``height``/``width``; with ``decode=True``
    also ``image`` (H, W, 3) uint8 and ``segment_map`` (H, W) int32 instead of the stored bytes.
    ``part`` = "train" / "val" / "confirm" keeps the image ids ``holdout`` (a `Holdout`, or a bare selection
    fraction) gives training / selection / confirmation ("all": every row);
    ``limit`` caps the rows (evaluation sets). Every operator states its CPU fraction: Ray Data's default, a whole
    CPU, never gets scheduled on a machine whose CPUs the Train workers and encode actors hold.
    ``prepare``: a picklable zero-argument callable that makes the shards where they are missing (first-use
    synthetic data, `raysal.orchestration.train.assets.ensure_data`); called here, before the manifest is read, and at
    the start of every read task, on whichever node runs it. It must be idempotent and cheap when the shards exist.
    """
    if part not in ("all", "train", "val", "confirm"):
        raise ValueError(f"part must be all, train, val or confirm, got {part!r}")
    if prepare is not None:
        prepare()
    files = shard_files(shard_dir, split)
    if not files:
        raise ValueError(f"{shard_dir}: split {split!r} has no rows (every sample was skipped? see manifest.json)")
    h = as_holdout(holdout)
    keep = None if part == "all" else Holdout(h.select, h.confirm, {"val": "select"}.get(part, part))
    if keep is not None and keep.select <= 0 and keep.confirm <= 0:
        keep = None  # nothing held out: every row (no filter in the read task)
    # One row per shard file, read by a task of a fraction of a CPU: reading parquet is I/O, and Ray's
    # read_parquet plans a file-listing task of a whole CPU that can starve a small machine whose other CPU trains.
    ds = ray.data.from_items([{"path": f} for f in files]).flat_map(
        _read_rows,
        fn_kwargs={"keep": keep, "prepare": prepare},
        num_cpus=num_cpus_per_read,
    )
    if limit is not None:
        ds = ds.limit(limit)
    if decode:
        ds = ds.map(decode_row, num_cpus=num_cpus_per_decode)
    return ds
