"""The batch contract: what the data path hands the training core, key by key.

Three stages, one set of keys:
- `Sample`: one encoded sample (numpy), what `raysal.preprocess.encode.encode_sample` returns and Ray Data ships.
- `Batch`: samples padded together (torch, on the host), what `raysal.preprocess.collate` returns; pixels are
  still uint8: a quarter of float32's bytes through the object store and over PCIe.
- the device batch: `to_device` moves a `Batch` and finishes the image processor's work there (rescale +
  normalise, `PixelNorm`), so `pixel_values` are float32 exactly as the processor would have made them.

Positions known when a sample is encoded (its image tokens, its grounded caption tokens) travel with it, so no step
searches `input_ids` for them again. Pad values are in `PAD`: −1 marks a padded position or segment slot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
import torch

IGNORE = -100  # labels at positions without a next-token loss (prompt, image tokens, padding)

# What the HF model's forward takes; everything else in a batch is for the criteria and the metrics.
MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_sizes")


class Sample(TypedDict, total=False):
    """One encoded sample. L = tokens, K = segments per token, I = image tokens, T = grounded tokens,
    S = segments of the image, P = LLaVA-NeXT patches."""

    input_ids: np.ndarray  # (L,) int64, image tokens expanded
    attention_mask: np.ndarray  # (L,) int64, ones
    labels: np.ndarray  # (L,) int64, IGNORE outside the caption (and its end-of-turn)
    token_segments: np.ndarray  # (L, K) int32: segment ids each token names, −1 pad; K ≥ 1
    image_pos: np.ndarray  # (I,) int64: positions of the image tokens in input_ids, ascending = coverage rows
    grounded_pos: np.ndarray  # (T,) int64: positions of label tokens that name ≥ 1 segment, ascending
    pixel_values: np.ndarray  # (3, H, W) uint8 | NeXT (P, 3, H, W) uint8: resized, cropped, not yet normalised
    image_sizes: np.ndarray  # (2,) int64, NeXT only: the original (height, width)
    coverage: np.ndarray  # (I, S) float32: fraction of image token i's receptive field in segment s
    segment_ids: np.ndarray  # (S,) int32: the image's segments, the columns of coverage
    image_id: np.ndarray  # () int64: the dataset's image id (bookkeeping: which samples a rank saw)


class Batch(TypedDict, total=False):
    """Collated samples (B = batch). Sequences are padded on the model's padding side; positions (`image_pos`,
    `grounded_pos`) index the padded sequence."""

    input_ids: torch.Tensor  # (B, L) long, pad_token_id
    attention_mask: torch.Tensor  # (B, L) long, 0 at padding
    labels: torch.Tensor  # (B, L) long, IGNORE at padding
    token_segments: torch.Tensor  # (B, L, K) int32, −1
    image_pos: torch.Tensor  # (B, I) long, −1 past a sample's image tokens
    grounded_pos: torch.Tensor  # (B, T) long, −1 past a sample's grounded tokens
    pixel_values: torch.Tensor  # (B, 3, H, W) | (B, P, 3, H, W) uint8 (float32 after `to_device`), 0 pad
    image_sizes: torch.Tensor  # (B, 2) long, NeXT only
    coverage: torch.Tensor  # (B, I, S) float32, 0
    segment_ids: torch.Tensor  # (B, S) int32, −1
    image_id: torch.Tensor  # (B,) long, when the samples carry one


# Pad value of every batched key; "pad_token_id" stands for the tokenizer's.
PAD: Mapping[str, float | str] = {
    "input_ids": "pad_token_id",
    "attention_mask": 0,
    "labels": IGNORE,
    "token_segments": -1,
    "image_pos": -1,
    "grounded_pos": -1,
    "pixel_values": 0,
    "coverage": 0.0,
    "segment_ids": -1,
}
SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels", "token_segments")  # padded on the padding side
POSITION_KEYS = ("image_pos", "grounded_pos")  # shifted by the left padding


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The subset of a device batch the HF model's forward takes."""
    pixels = batch.get("pixel_values")
    if pixels is not None and pixels.dtype == torch.uint8:
        raise ValueError("pixel_values are uint8: move the batch with raysal.batch.to_device, which normalises them")
    return {k: batch[k] for k in MODEL_KEYS if k in batch}


@dataclass(frozen=True)
class PixelNorm:
    """The image processor's last two steps, done on the device: x · scale, then (x − mean) / std per channel.

    The processor runs with rescaling and normalisation off (`encode_sample`), so its output is the resized,
    cropped uint8 image; these are its own settings, applied in the same order and in float32.
    """

    scale: float | None  # None: the processor does not rescale
    mean: tuple[float, ...] | None  # None: the processor does not normalise
    std: tuple[float, ...] | None

    @staticmethod
    def from_processor(processor: Any) -> PixelNorm:
        ip = getattr(processor, "image_processor", processor)
        scale = float(ip.rescale_factor) if getattr(ip, "do_rescale", True) else None
        if not getattr(ip, "do_normalize", True):
            return PixelNorm(scale, None, None)
        mean, std = _per_channel(ip.image_mean), _per_channel(ip.image_std)
        return PixelNorm(scale, mean, std)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) uint8 → float32."""
        x = pixels.float()
        if self.scale is not None:
            x = x * self.scale
        if self.mean is not None and self.std is not None:
            shape = (len(self.mean), 1, 1)
            mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(shape)
            std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(shape)
            x = (x - mean) / std
        return x


def _per_channel(value: float | Sequence[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, Sequence) else (float(value),) * 3


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device | str, pixels: PixelNorm) -> dict:
    """A collated `Batch` → the device batch the core takes: every tensor on ``device``, uint8 pixels normalised
    there (a batch already moved passes through unchanged)."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if "pixel_values" in out and out["pixel_values"].dtype == torch.uint8:
        out["pixel_values"] = pixels(out["pixel_values"])
    return out
