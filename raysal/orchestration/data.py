"""Ray Datasets for a run: shards → (decode + model preprocessing with coverage) in ``map_batches``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import ray.data

from raysal.data.decode import decode_row
from raysal.data.ray_dataset import coconut_dataset
from raysal.model.build import load_processor
from raysal.preprocess.batches import encode_row
from raysal.preprocess.collate import collate


class EncodeBatch:
    """Callable class for ``map_batches``: the processor loads once per actor, not once per batch."""

    def __init__(self, processor_path: str, prompt: str) -> None:
        self.processor = load_processor(processor_path)
        self.prompt = prompt

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
        n = len(batch["image_id"])
        # decoding happens here, next to the encoding, so decoded images never travel through the object store
        encoded = [
            encode_row(decode_row({k: v[i] for k, v in batch.items()}), self.processor, self.prompt) for i in range(n)
        ]
        return {k: [e[k] for e in encoded] for k in encoded[0]}


def run_datasets(
    data: dict[str, Any], processor_path: str, *, encode_concurrency: int = 1
) -> dict[str, ray.data.Dataset]:
    """{"train": ..., "val": ...}: encoded samples ready for `iter_collated`."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the same order every epoch: exact resume
    ctx.enable_progress_bars = False  # one bar per operator per worker drowns the run summary
    same = data["train_split"] == data["val_split"]
    holdout = float(data.get("val_holdout") or 0.0)
    if same and holdout <= 0:
        raise ValueError(
            "data.val_split equals data.train_split: set data.val_holdout > 0 to hold out validation images"
        )
    train = coconut_dataset(
        data["shards"], data["train_split"], decode=False, holdout=holdout if same else 0.0, part="train"
    )
    val = coconut_dataset(
        data["shards"], data["val_split"], decode=False, holdout=holdout if same else 0.0, part="val",
        limit=data.get("val_max_images"),
    )  # fmt: skip
    kwargs = {
        "fn_constructor_kwargs": {"processor_path": processor_path, "prompt": data["prompt"]},
        "batch_size": 8,
        "concurrency": encode_concurrency,
        "num_cpus": float(data.get("encode_cpus", 1)),
    }
    return {"train": train.map_batches(EncodeBatch, **kwargs), "val": val.map_batches(EncodeBatch, **kwargs)}


def iter_collated(
    shard: Any, batch_size: int, pad_token_id: int, padding_side: str, *, shuffle_seed: int | None = None
) -> Iterator[dict]:
    """A Ray Train dataset shard → collated torch batches (the core's batch format)."""
    kwargs: dict[str, Any] = {"batch_size": batch_size, "batch_format": "numpy"}
    if shuffle_seed is not None:
        kwargs.update(local_shuffle_buffer_size=batch_size * 8, local_shuffle_seed=shuffle_seed)
    for batch in shard.iter_batches(**kwargs):
        n = len(batch["input_ids"])
        rows = [{k: np.asarray(v[i]) for k, v in batch.items() if k != "image_id"} for i in range(n)]
        yield collate(rows, pad_token_id, padding_side)
