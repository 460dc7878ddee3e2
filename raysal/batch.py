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
MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "image_grid_thw", "mm_token_type_ids")


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
    image_grid_thw: np.ndarray  # (3,) int64, Qwen only: (1, H'/p, W'/p) patches of the resized image
    mm_token_type_ids: np.ndarray  # (L,) int64, Qwen only: 1 at image tokens (the model's M-RoPE positions need it)
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
    pixel_values: torch.Tensor  # (B, 3, H, W) | (B, P, 3, H, W) uint8 (float32 after `to_device`), 0 pad;
    # Qwen after `to_device`: (Σ patches, 3·2·p·p) float32, the model's patch rows (`patchify`, below)
    image_sizes: torch.Tensor  # (B, 2) long, NeXT only
    image_grid_thw: torch.Tensor  # (B, 3) long, Qwen only
    mm_token_type_ids: torch.Tensor  # (B, L) long, Qwen only, 0 at padding
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
    cropped uint8 image; these are its own settings, applied in the same order and in float32. Qwen's processor
    then cuts the image into patch rows (`patchify`, below): ``patches`` = (patch, merge, temporal).
    """

    scale: float | None  # None: the processor does not rescale
    mean: tuple[float, ...] | None  # None: the processor does not normalise
    std: tuple[float, ...] | None
    patches: tuple[int, int, int] | None = None

    @staticmethod
    def from_processor(processor: Any) -> PixelNorm:
        ip = getattr(processor, "image_processor", processor)
        scale = float(ip.rescale_factor) if getattr(ip, "do_rescale", True) else None
        # the Qwen2-VL image processor's patch layout (its merge_size and temporal_patch_size say it has one)
        patches = None
        if getattr(ip, "merge_size", None) and getattr(ip, "temporal_patch_size", None):
            patches = (int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size))
        if not getattr(ip, "do_normalize", True):
            return PixelNorm(scale, None, None, patches)
        mean, std = _per_channel(ip.image_mean), _per_channel(ip.image_std)
        return PixelNorm(scale, mean, std, patches)

    def __call__(self, pixels: torch.Tensor, grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """(..., 3, H, W) uint8 → float32; with ``patches``, (B, 3, H, W) + (B, 3) ``grid_thw`` → patch rows."""
        x = self.normalise(pixels)
        if self.patches is None:
            return x
        if grid_thw is None:
            raise ValueError("Qwen pixels need the batch's image_grid_thw to be cut into patch rows")
        return patchify_batch(x, grid_thw, *self.patches)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
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
        out["pixel_values"] = pixels(out["pixel_values"], out.get("image_grid_thw"))
    return out


# ------------------------------------------------------------------------------- Qwen2-VL's patch rows, both ways
# The image processor hands the model an image as rows of patches, not as (3, H, W): row r is one p×p patch
# flattened as (C, T, p, p), its T = 2 temporal copies identical for a still image, and rows come merge window by
# merge window (the merger joins each m×m window's m² consecutive rows into one image token), windows row-major
# (transformers' ``Qwen2VLImageProcessor*._preprocess``: reshape (C, gh/m, m, p, gw/m, m, p), permute to
# (gh/m, gw/m, m, m, C, p, p), repeat T). A Qwen sample ships the resized image as (3, H', W') uint8 (half the bytes:
# no temporal copy; a quarter of float32's) and `PixelNorm` makes the rows on the device after normalising, so
# `unpatchify` and `patchify` are exact inverses of each other and of the processor (tests/test_qwen_batch.py).


def unpatchify(rows: np.ndarray, grid_hw: tuple[int, int], patch: int, merge: int, temporal: int) -> np.ndarray:
    """(gh·gw, C·T·p·p) processor rows → (C, gh·p, gw·p), the first temporal copy."""
    gh, gw = grid_hw
    c = rows.shape[1] // (temporal * patch * patch)
    x = rows.reshape(gh // merge, gw // merge, merge, merge, c, temporal, patch, patch)[:, :, :, :, :, 0]
    # (gh/m, gw/m, m_h, m_w, C, p_h, p_w) → (C, gh/m, m_h, p_h, gw/m, m_w, p_w)
    return x.transpose(4, 0, 2, 5, 1, 3, 6).reshape(c, gh * patch, gw * patch)


def patchify(image: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """(C, H', W') → (gh·gw, C·T·p·p) rows in the processor's order (H', W' multiples of p·m)."""
    c, h, w = image.shape
    gh, gw = h // patch, w // patch
    x = image.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m_h, m_w, C, p_h, p_w)
    x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, temporal, -1, -1)  # the temporal copies, after C
    return x.reshape(gh * gw, c * temporal * patch * patch)


def patchify_batch(images: torch.Tensor, grid_thw: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """(B, C, Hmax, Wmax) padded images + (B, 3) image_grid_thw → the rows of every image, concatenated: what the
    model's ``pixel_values`` is for a batch (each image cropped to its own grid first)."""
    out = []
    for image, (_, gh, gw) in zip(images, grid_thw.tolist(), strict=True):
        out.append(patchify(image[:, : gh * patch, : gw * patch], patch, merge, temporal))
    return torch.cat(out)
