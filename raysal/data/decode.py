"""Decode a shard row (image and mask bytes) into arrays. Plain NumPy/Pillow: runs in Ray Data workers and tests."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from raysal.data.mask import decode_mask_png


def decode_image(data: bytes) -> np.ndarray:
    """Image file bytes → (H, W, 3) uint8 RGB."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """Shard row → decoded sample: ``image`` (H, W, 3) uint8 and ``segment_map`` (H, W) int32 replace the bytes.

    Spans stay as three aligned lists (``span_start``, ``span_end``, ``span_segment_ids``) so that rows keep a
    flat, Arrow-friendly schema for Ray Data.
    """
    out = {k: v for k, v in row.items() if k not in ("image", "mask")}
    out["image"] = decode_image(row["image"])
    out["segment_map"] = decode_mask_png(row["mask"])
    return out
