"""Model-specific preprocessing of one decoded sample (runs inside Ray Data ``map_batches`` and in tests).

prompt + caption → the model's chat template → the real processor (pixels, image-token expansion) and, on the
*whole* templated text, the fast tokenizer's ``offset_mapping`` → per-token segment ids from the caption spans.
Tokenising the caption on its own (what upstream does) shifts SentencePiece merges at the boundary; here the
offsets come from exactly the tokens the model sees, and the expanded ids are checked against the processor's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from raysal.batch import IGNORE, Sample, unpatchify
from raysal.preprocess.coverage import coverage

DEFAULT_PROMPT = "Describe the image in detail."


def _messages(prompt: str, caption: str) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": caption}]},
    ]


def _token_segments(
    offsets: np.ndarray, text: str, caption_start: int, spans: Sequence[tuple[int, int, Sequence[int]]]
) -> list[list[int]]:
    """Segment ids per token: the union over spans that share a non-space character with the token."""
    out: list[list[int]] = [[] for _ in range(len(offsets))]
    for start, end, ids in spans:
        a_span, b_span = caption_start + start, caption_start + end
        for t, (a, b) in enumerate(offsets):
            lo, hi = max(a, a_span), min(b, b_span)
            if lo < hi and text[lo:hi].strip():
                out[t].extend(i for i in ids if i not in out[t])
    return out


def encode_sample(
    image: np.ndarray,  # (H, W, 3) uint8
    segment_map: np.ndarray,  # (H, W) int segment ids
    caption: str,
    spans: Sequence[tuple[int, int, Sequence[int]]],  # (start, end, segment ids) into `caption`
    segment_ids: Sequence[int],  # (S,) segments of this image, from segments_info
    processor: Any,
    prompt: str = DEFAULT_PROMPT,
    cov: np.ndarray | None = None,  # (I, S) this image's coverage, when the caller has it (one image, many spans)
) -> Sample:
    """One sample → arrays for the model and the criteria (`raysal.batch.Sample`: keys, dtypes, shapes).

    ``pixel_values`` are the processor's resized, cropped pixels as uint8: rescaling and normalisation happen on
    the device (`raysal.batch.PixelNorm`), so a NeXT sample ships 1.7 MB instead of 6.8 MB through Ray's object
    store, and the float work runs where it is cheap.
    """
    tok = processor.tokenizer
    text = processor.apply_chat_template(_messages(prompt, caption), tokenize=False)
    caption_start = text.rfind(caption)
    if caption_start < 0:
        raise ValueError(f"chat template dropped or rewrote the caption: {caption[:60]!r} not found in {text[:200]!r}")

    # channels_last said explicitly: for an image 1, 3 or 4 pixels tall the processor would otherwise guess
    # channels-first from the shape — wrong pixels for LLaVA-1.5, a wrong anyres canvas for NeXT
    enc = processor(text=text, images=image, return_tensors="np", input_data_format="channels_last",
                    do_rescale=False, do_normalize=False)  # fmt: skip
    ids = enc["input_ids"][0]
    plain = tok(text, return_offsets_mapping=True)  # the same text with one image placeholder
    image_token_id = tok.convert_tokens_to_ids(processor.image_token)
    n_image = int((ids == image_token_id).sum())
    plain_ids = np.asarray(plain["input_ids"])
    where = np.nonzero(plain_ids == image_token_id)[0]
    if len(where) != 1:
        raise ValueError(
            f"expected one {processor.image_token!r} placeholder in the templated text, found {len(where)}"
        )
    k = int(where[0])
    expanded = np.concatenate([plain_ids[:k], np.full(n_image, image_token_id), plain_ids[k + 1 :]])
    if not np.array_equal(expanded, ids):
        raise ValueError("tokenizer and processor disagree on the token sequence; offsets would point at wrong tokens")

    offsets = np.asarray(plain["offset_mapping"])
    seg_plain = _token_segments(offsets, text, caption_start, spans)
    seg = seg_plain[:k] + [[] for _ in range(n_image)] + seg_plain[k + 1 :]  # image tokens name no caption span
    width = max(1, max(len(s) for s in seg))
    token_segments = np.full((len(seg), width), -1, np.int32)
    for t, s in enumerate(seg):
        token_segments[t, : len(s)] = s

    # labels: the caption and what the template puts after it (end of turn), never prompt or image tokens.
    # Token *ends* decide: a SentencePiece token "▁This" may start at the space before the caption.
    ends = np.concatenate([offsets[:k, 1], np.full(n_image, -1), offsets[k + 1 :, 1]])
    labels = np.where(ends > caption_start, ids, IGNORE).astype(np.int64)

    if cov is None:
        cov = coverage(segment_map, segment_ids, processor)  # (I, S)
    if cov.shape[0] != n_image:
        raise ValueError(f"coverage has {cov.shape[0]} rows but input_ids hold {n_image} image tokens")
    grounded = (token_segments >= 0).any(1) & (labels != IGNORE)  # (L,)
    pixels = enc["pixel_values"][0]  # (3, H, W) | NeXT (P, 3, H, W)
    if "image_grid_thw" in enc:  # Qwen: patch rows, not batched → the resized image (3, H', W')
        ip = processor.image_processor
        grid = np.asarray(enc["image_grid_thw"][0], np.int64)  # (3,) = (1, gh, gw)
        pixels = unpatchify(np.asarray(enc["pixel_values"]), (int(grid[1]), int(grid[2])), int(ip.patch_size),
                            int(ip.merge_size), int(ip.temporal_patch_size))  # fmt: skip
    out: Sample = {
        "input_ids": ids.astype(np.int64),
        "attention_mask": np.ones_like(ids, dtype=np.int64),
        "labels": labels,
        "token_segments": token_segments,
        "image_pos": np.nonzero(ids == image_token_id)[0].astype(np.int64),  # (I,) = coverage rows, in order
        "grounded_pos": np.nonzero(grounded)[0].astype(np.int64),  # (T,)
        "pixel_values": _uint8(pixels),
        "coverage": cov.astype(np.float32),
        "segment_ids": np.asarray(segment_ids, np.int32),
    }
    if "image_grid_thw" in enc:
        out["image_grid_thw"] = grid
        out["mm_token_type_ids"] = np.asarray(enc["mm_token_type_ids"][0], np.int64)  # (L,) 1 at image tokens
    if "image_sizes" in enc:
        out["image_sizes"] = np.asarray(enc["image_sizes"][0], np.int64)
    return out


def _uint8(pixels: np.ndarray) -> np.ndarray:
    """The processor's un-normalised output as uint8 (a processor may hand back float32 holding whole numbers)."""
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.min() < 0 or pixels.max() > 255 or not np.array_equal(pixels, np.round(pixels)):
        raise ValueError(
            f"the image processor ignored do_rescale=False / do_normalize=False (pixel range "
            f"{float(pixels.min()):.3g}..{float(pixels.max()):.3g}): raysal ships uint8 pixels and normalises them "
            "on the device; this processor class is not supported"
        )
    return pixels.astype(np.uint8)
