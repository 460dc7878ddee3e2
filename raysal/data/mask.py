"""Panoptic PNG masks: segment id = R + 256·G + 256²·B (COCO panoptic convention; 0 = void in COCONut)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def rgb_to_ids(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 → (H, W) int32 segment ids."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"panoptic mask must be (H, W, 3) RGB, got shape {rgb.shape}")
    rgb = rgb.astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def ids_to_rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) integer segment ids → (H, W, 3) uint8 RGB; ids must lie in [0, 256³)."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"segment id map must be (H, W), got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= 256**3):
        raise ValueError("segment ids must lie in [0, 256^3) to fit an RGB PNG")
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, (ids // 256) % 256, ids // (256 * 256)], axis=-1).astype(np.uint8)


def decode_mask_png(data: bytes) -> np.ndarray:
    """PNG bytes → (H, W) int32 segment ids. Raises on truncated or non-RGB data."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # full decode: a truncated PNG fails here, not later in a worker
        if img.mode != "RGB":
            img = img.convert("RGB")
        return rgb_to_ids(np.asarray(img))


def encode_mask_png(ids: np.ndarray) -> bytes:
    """(H, W) segment ids → lossless RGB PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(ids_to_rgb(ids)).save(buf, format="PNG")
    return buf.getvalue()
