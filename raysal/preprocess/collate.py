"""Pad encoded samples into a `raysal.batch.Batch`, column by column.

Ray Data hands `iter_torch_batches(collate_fn=...)` a batch as columns (one numpy array per key, an object array
of per-sample arrays where lengths differ), so the collate works on columns; `collate` adapts a list of samples
(the in-process path). Variable lengths: text (L), segments per token (K), image tokens (I, LLaVA-NeXT only),
grounded tokens (T), segments per image (S), NeXT patches (P).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from raysal.batch import PAD, POSITION_KEYS, SEQUENCE_KEYS, Batch


def _pad(arrays: Sequence[np.ndarray], value: float, left: bool = False) -> np.ndarray:
    """Stack arrays padding every axis to the max; ``left`` pads axis 0 on the left (left-padded sequences)."""
    shape = tuple(max(a.shape[d] for a in arrays) for d in range(arrays[0].ndim))
    out = np.full((len(arrays), *shape), value, dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        index = tuple(slice(0, n) for n in a.shape)
        if left:
            index = (slice(shape[0] - a.shape[0], shape[0]), *index[1:])
        out[(i, *index)] = a
    return out


def collate_columns(
    columns: Mapping[str, Sequence[np.ndarray] | np.ndarray], pad_token_id: int, padding_side: str = "right"
) -> Batch:
    """{key: per-sample arrays} → a `Batch` of tensors. Keys outside the contract are dropped."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    left = padding_side == "left"
    lengths = np.array([len(ids) for ids in columns["input_ids"]])
    batch: dict[str, np.ndarray] = {}
    missing = [k for k in PAD if k not in columns]
    if missing:
        raise KeyError(f"batch columns {missing} missing (samples come from raysal.preprocess.encode.encode_sample)")
    for key, pad in PAD.items():
        arrays = [np.asarray(a) for a in columns[key]]
        value = pad_token_id if pad == "pad_token_id" else pad
        batch[key] = _pad(arrays, value, left and key in SEQUENCE_KEYS)
    if left:  # positions index the padded sequence: shift by each sample's left padding
        shift = (lengths.max() - lengths)[:, None]  # (B, 1)
        for key in POSITION_KEYS:
            if key in batch:
                batch[key] = np.where(batch[key] >= 0, batch[key] + shift, -1)
    if "image_sizes" in columns:
        batch["image_sizes"] = np.stack([np.asarray(a) for a in columns["image_sizes"]])  # (B, 2)
    if "image_grid_thw" in columns:  # Qwen: each image's patch grid, and text/image token types as the ids
        batch["image_grid_thw"] = np.stack([np.asarray(a) for a in columns["image_grid_thw"]])  # (B, 3)
        batch["mm_token_type_ids"] = _pad([np.asarray(a) for a in columns["mm_token_type_ids"]], 0, left)  # (B, L)
    if "image_id" in columns:
        batch["image_id"] = np.asarray([int(np.asarray(a)) for a in columns["image_id"]], np.int64)  # (B,)
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}  # type: ignore[return-value]


def collate(samples: Sequence[Mapping[str, np.ndarray]], pad_token_id: int, padding_side: str = "right") -> Batch:
    """Encoded samples (see `encode_sample`) → a `Batch`."""
    columns = {k: [s[k] for s in samples] for k in samples[0]}
    return collate_columns(columns, pad_token_id, padding_side)


class Collate:
    """``collate_fn`` for Ray's ``iter_torch_batches``: picklable, runs in Ray's prefetch threads, off the training
    thread; Ray then moves the tensors to the worker's device (`raysal.batch.to_device` normalises the pixels)."""

    def __init__(self, pad_token_id: int, padding_side: str = "right") -> None:
        self.pad_token_id, self.padding_side = pad_token_id, padding_side

    def __call__(self, columns: dict[str, np.ndarray]) -> Batch:
        return collate_columns(columns, self.pad_token_id, self.padding_side)
