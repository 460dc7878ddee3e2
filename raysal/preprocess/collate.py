"""Pad encoded samples into a batch. Variable lengths: text (L), segments per token (K), image tokens (I,
LLaVA-NeXT only), segments per image (S), NeXT patches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from raysal.preprocess.encode import IGNORE


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


def collate(samples: Sequence[dict[str, np.ndarray]], pad_token_id: int, padding_side: str = "right") -> dict:
    """Encoded samples (see `encode_sample`) → a dict of tensors for the model and the criteria."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    left = padding_side == "left"
    batch = {
        "input_ids": _pad([s["input_ids"] for s in samples], pad_token_id, left),  # (B, L)
        "attention_mask": _pad([s["attention_mask"] for s in samples], 0, left),  # (B, L)
        "labels": _pad([s["labels"] for s in samples], IGNORE, left),  # (B, L)
        "token_segments": _pad([s["token_segments"] for s in samples], -1, left),  # (B, L, K)
        "pixel_values": _pad([s["pixel_values"] for s in samples], 0.0),  # (B, 3, H, W) | (B, P, 3, H, W)
        "coverage": _pad([s["coverage"] for s in samples], 0.0),  # (B, I, S)
        "segment_ids": _pad([s["segment_ids"] for s in samples], -1),  # (B, S)
    }
    if "image_sizes" in samples[0]:
        batch["image_sizes"] = np.stack([s["image_sizes"] for s in samples])  # (B, 2)
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_sizes")


def model_inputs(batch: dict) -> dict:
    """The subset of a batch the HF model's forward takes."""
    return {k: batch[k] for k in MODEL_KEYS if k in batch}
