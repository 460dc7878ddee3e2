"""In-process data path (no Ray): shard rows → decoded → encoded → shuffled, collated device batches.

Used by tests, benchmarks and single-process runs; under Ray the same `encode_sample` runs in ``map_batches``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from raysal.batch import PixelNorm, to_device
from raysal.data.decode import decode_row
from raysal.data.shards import shard_paths
from raysal.preprocess.collate import collate
from raysal.preprocess.encode import DEFAULT_PROMPT, encode_sample


def encode_row(row: dict[str, Any], processor: Any, prompt: str = DEFAULT_PROMPT) -> dict[str, np.ndarray]:
    """A decoded shard row (see `raysal.data.decode.decode_row`) → encoded arrays (+ ``image_id``)."""
    spans = list(zip(row["span_start"], row["span_end"], row["span_segment_ids"], strict=True))
    out = encode_sample(row["image"], row["segment_map"], row["caption"], spans, row["segment_ids"], processor, prompt)
    out["image_id"] = np.asarray(row["image_id"], np.int64)
    return out


def load_encoded(shard_dir: Path | str, split: str, processor: Any, limit: int | None = None) -> list[dict]:
    fs, files = shard_paths(str(shard_dir), split)  # a local folder or a storage URI
    rows = [r for f in files for r in pq.read_table(f, filesystem=fs).to_pylist()]
    return [encode_row(decode_row(r), processor) for r in rows[:limit]]


def batch_factory(
    samples: Sequence[dict], batch_size: int, pad_token_id: int, pixels: PixelNorm, *, shuffle: bool = True,
    seed: int = 0, padding_side: str = "right", drop_last: bool = False, device: torch.device | str = "cpu",
) -> Callable[[int], Iterator[dict]]:  # fmt: skip
    """``epoch → device batches``: the same order for the same (seed, epoch), as `raysal.loop.fit.fit` requires.
    ``pixels``: the processor's normalisation (`PixelNorm.from_processor`), applied on ``device``."""

    def batches(epoch: int = 0) -> Iterator[dict]:
        order = np.random.default_rng([seed, epoch]).permutation(len(samples)) if shuffle else np.arange(len(samples))
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for lo in range(0, stop, batch_size):
            chunk = [samples[i] for i in order[lo : lo + batch_size]]
            yield to_device(collate(chunk, pad_token_id, padding_side), device, pixels)

    return batches
