"""Ray Datasets for a run: shards → (decode + model preprocessing with coverage) in ``map_batches``."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.data
import torch

from raysal.batch import PixelNorm, to_device
from raysal.data.decode import decode_row
from raysal.data.holdout import holdout_for
from raysal.data.ray_dataset import coconut_dataset
from raysal.model.build import load_processor, pixel_limits
from raysal.orchestration.train.assets import ensure_data, ensure_model
from raysal.preprocess.batches import encode_row
from raysal.preprocess.collate import Collate


class EncodeBatch:
    """Callable class for ``map_batches``: the processor loads once per actor, not once per batch. ``model``: the
    run's model config, whose first-use tiny checkpoint is made on this actor's node before its processor loads."""

    def __init__(self, processor_path: str, prompt: str, model: dict[str, Any] | None = None) -> None:
        if model is not None:
            ensure_model(model)
        self.processor = load_processor(processor_path, **pixel_limits(model or {}))
        self.prompt = prompt

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
        n = len(batch["image_id"])
        # decoding happens here, next to the encoding, so decoded images never travel through the object store
        encoded = [
            encode_row(decode_row({k: v[i] for k, v in batch.items()}), self.processor, self.prompt) for i in range(n)
        ]
        return {k: [e[k] for e in encoded] for k in encoded[0]}


@dataclass(frozen=True)
class DataCPUs:
    """How a run's data CPU budget (``data.encode_cpus``) is shared among its operators.

    A run has two pipelines, training and validation, each split across the workers by one coordinator; each has a
    read task and an encode actor pool. The long-lived actors take 3/4 of a pipeline's share, so a read task always
    fits beside them: a run never needs more than ``num_workers × cpus_per_worker + encode_cpus`` CPUs, whatever the
    data config.
    """

    read: float  # per read task (read + hold-out filter)
    encode: float  # per encode actor

    @staticmethod
    def split(budget: float, encode_actors: int = 1) -> DataCPUs:
        share = budget / 2
        return DataCPUs(read=share / 4, encode=share * 3 / 4 / encode_actors)


def run_datasets(
    data: dict[str, Any], processor_path: str, *, encode_actors: int = 1, model: dict[str, Any] | None = None
) -> dict[str, ray.data.Dataset]:
    """{"train": ..., "val": ...}: encoded samples ready for `iter_collated` (``data`` checked by the preflight).
    First-use assets are made where they are used: the synthetic shards by every read task (`ensure_data`), the
    tiny model (``model``, the run's model config) by every encode actor (`ensure_model`), each on its own node."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the same order every epoch: exact resume
    ctx.enable_progress_bars = False  # one bar per operator per worker drowns the run summary
    cpus = DataCPUs.split(float(data["encode_cpus"]), encode_actors)
    common = {
        "decode": False,
        "num_cpus_per_read": cpus.read,
        "prepare": functools.partial(ensure_data, data),
    }
    train = coconut_dataset(data["shards"], data["train_split"], part="train", holdout=holdout_for(data, "train"),
                            **common)  # fmt: skip
    val = coconut_dataset(data["shards"], data["val_split"], part="val", holdout=holdout_for(data, "select"),
                          limit=data.get("val_max_images"), **common)  # fmt: skip
    kwargs = {
        "fn_constructor_kwargs": {"processor_path": processor_path, "prompt": data["prompt"], "model": model},
        "batch_size": 8,
        "compute": ray.data.ActorPoolStrategy(size=encode_actors),
        "num_cpus": cpus.encode,
    }
    return {"train": train.map_batches(EncodeBatch, **kwargs), "val": val.map_batches(EncodeBatch, **kwargs)}


def iter_collated(
    shard: Any,
    batch_size: int,
    pad_token_id: int,
    padding_side: str,
    *,
    device: torch.device,
    pixels: PixelNorm | None,
    shuffle_seed: int | None = None,
) -> Iterator[dict]:
    """A Ray Train dataset shard → device batches (`raysal.batch`): Ray collates the columns in its prefetch
    thread (`Collate`) and moves the tensors to ``device``; the uint8 pixels are normalised there (``pixels``
    None: left uint8, for batches kept to be moved later)."""
    kwargs: dict[str, Any] = {"batch_size": batch_size, "collate_fn": Collate(pad_token_id, padding_side)}
    if shuffle_seed is not None:
        kwargs.update(local_shuffle_buffer_size=batch_size * 8, local_shuffle_seed=shuffle_seed)
    for batch in shard.iter_torch_batches(device=device, **kwargs):
        yield to_device(batch, device, pixels) if pixels is not None else batch
