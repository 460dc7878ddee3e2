"""Shard folder → `ray.data.Dataset` of decoded COCONut samples (DESIGN §2.4).

The one module of `raysal.data` that imports Ray. Model-specific preprocessing (tokenisation, coverage) is added
by the caller with ``ds.map_batches(<callable class>, ...)`` so the processor loads once per actor.
"""

from __future__ import annotations

from pathlib import Path

import ray.data

from raysal.data.decode import decode_row
from raysal.data.shards import shard_files


def coconut_dataset(
    shard_dir: Path | str,
    split: str = "train2017",
    *,
    decode: bool = True,
    num_cpus_per_decode: float = 1.0,
) -> ray.data.Dataset:
    """Read one split of a shard folder (written by `raysal.data.shards`) as a Ray Dataset.

    Rows hold ``image_id``, ``caption``, spans, segment/category ids, ``height``/``width``; with ``decode=True``
    also ``image`` (H, W, 3) uint8 and ``segment_map`` (H, W) int32 instead of the stored bytes.
    """
    files = shard_files(shard_dir, split)
    if not files:
        raise ValueError(f"{shard_dir}: split {split!r} has no rows (every sample was skipped? see manifest.json)")
    ds = ray.data.read_parquet([str(f) for f in files], file_extensions=["parquet"])
    if decode:
        ds = ds.map(decode_row, num_cpus=num_cpus_per_decode)
    return ds
