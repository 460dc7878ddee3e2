"""Qwen2.5-VL / Qwen3-VL coverage against the REAL image processor (the probe of tests/test_coverage.py).

The probe image encodes its coordinates (R = x, G = y); the processor's pixel_values rows are patches, four
consecutive rows one merged image token. Each token's mean R and G, read back from the processor's own output, must
equal the coverage-weighted mean coordinate our geometry predicts. Sizes: COCO-like, the issue's 500×375 (→ 504×364:
each side rounded on its own), thin ones (1:50), images below the minimum and above the maximum pixel count, with
the tiny checkpoints' pins and the 7B/8B model configs' pins.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raysal.model.qwen_processor import IMAGE_ONLY
from raysal.model.tiny import TINY_PIXELS, write_tiny
from raysal.preprocess.coverage import coverage, qwen_resized_size

# (min_pixels, max_pixels): the tiny checkpoints' and the 7B/8B model configs' (configs/model/qwen*.yaml)
PINS = {"tiny": TINY_PIXELS, "qwen2_5_vl": (3136, 1280 * 28 * 28), "qwen3_vl": (65536, 1280 * 32 * 32)}
# (W, H)
SIZES = [
    (640, 480), (480, 640), (500, 375), (375, 500), (500, 500), (333, 517), (1001, 999), (427, 640), (612, 612),
    (1000, 20), (20, 1000), (2000, 45), (45, 900),  # thin: 1:50, 1:44, 1:20
    (37, 50), (20, 20), (150, 120), (200, 200),  # below the minimum pixel count (some pins)
    (3000, 2000), (1920, 1080), (4000, 300), (1333, 1000), (801, 533),  # above the maximum (some pins)
]  # fmt: skip
# in token cells (28 / 32 px): observed ≤ 0.018 (a 20×20 image upsampled; elsewhere ≤ 0.011); a slip of one
# processed px is 0.031-0.036 cell on every token, which the median bound fails
TOL_MAX_CELLS = 0.06
TOL_MEDIAN_CELLS = 0.025


@pytest.fixture(scope="module")
def processors(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tiny_qwen")
    return {arch: IMAGE_ONLY[arch].from_pretrained(write_tiny(Path(root) / arch, arch)) for arch in IMAGE_ONLY}


def _pinned(processor, pins: tuple[int, int]):
    processor.image_processor.size = {"shortest_edge": pins[0], "longest_edge": pins[1]}
    return processor


def probe_image(w: int, h: int) -> Image.Image:
    r = np.round(255 * np.arange(w) / max(w - 1, 1))[None, :].repeat(h, 0)
    g = np.round(255 * np.arange(h) / max(h - 1, 1))[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([r, g, np.full((h, w), 255.0)], -1).astype(np.uint8))


def processor_tokens(processor, img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(I, 3) each merged token's mean (R, G, B) from the processor's own pixel_values, and image_grid_thw."""
    out = processor.image_processor(images=img, do_rescale=False, do_normalize=False, return_tensors="np")
    ip = processor.image_processor
    p, m, t = int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size)
    pv = np.asarray(out["pixel_values"], dtype=np.float64).reshape(-1, m * m, 3, t, p, p)  # (I, m², C, T, p, p)
    return pv.mean(axis=(1, 3, 4, 5)), np.asarray(out["image_grid_thw"])[0]


def predicted_tokens(processor, w: int, h: int) -> np.ndarray:
    r_val = np.round(255 * np.arange(w) / max(w - 1, 1))
    g_val = np.round(255 * np.arange(h) / max(h - 1, 1))
    cols = np.broadcast_to(np.arange(1, w + 1, dtype=np.int32), (h, w))
    rows = np.broadcast_to(np.arange(1, h + 1, dtype=np.int32)[:, None], (h, w))
    cx = coverage(cols, np.arange(1, w + 1), processor)  # (I, W)
    cy = coverage(rows, np.arange(1, h + 1), processor)  # (I, H)
    np.testing.assert_allclose(cx.sum(1), 1.0, atol=1e-6)  # Qwen never pads: every token is all image
    np.testing.assert_allclose(cy.sum(1), 1.0, atol=1e-6)
    return np.stack([cx @ r_val, cy @ g_val], axis=1)


@pytest.mark.parametrize("pin", ["tiny", "model"])
@pytest.mark.parametrize("arch", sorted(IMAGE_ONLY))
@pytest.mark.parametrize(("w", "h"), SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_geometry_matches_real_processor(arch, pin, w, h, processors):
    processor = _pinned(processors[arch], PINS["tiny" if pin == "tiny" else arch])
    img = probe_image(w, h)
    got, grid = processor_tokens(processor, img)
    nh, nw = qwen_resized_size(h, w, processor.image_processor)
    p, m = int(processor.image_processor.patch_size), int(processor.image_processor.merge_size)
    assert (grid[1] * p, grid[2] * p) == (nh, nw)  # our resized size is the processor's
    ids = np.asarray(processor(text="<|image_pad|>", images=img)["input_ids"])
    assert int((ids == processor.image_token_id).sum()) == int(np.prod(grid)) // m**2 == len(got)

    pred = predicted_tokens(processor, w, h)
    assert pred.shape[0] == len(got)
    scale = np.array([nw / w, nh / h])  # processed px per original px
    xy_got = got[:, :2] / 255 * np.array([w - 1, h - 1])
    xy_pred = pred / 255 * np.array([w - 1, h - 1])
    err = np.abs(xy_got - xy_pred) * scale / (p * m)  # in token cells
    print(f"{arch} {pin} {w}x{h} → {nw}x{nh}: max {err.max():.3f} median {np.median(err, 0).max():.3f} cells")
    assert err.max() <= TOL_MAX_CELLS
    assert np.median(err, axis=0).max() <= TOL_MEDIAN_CELLS


def test_sizes_reach_below_the_minimum_above_the_maximum_and_per_side_rounding(processors):
    """The size list exercises every branch of smart_resize for both families' model pins; 500×375 is rounded per
    side (504×364 at patch 14: one scale factor would give 504×378)."""
    for arch in IMAGE_ONLY:
        lo, hi = PINS[arch]
        areas = [w * h for w, h in SIZES]
        assert min(areas) < lo and max(areas) > hi
    ip = _pinned(processors["qwen2_5_vl"], PINS["qwen2_5_vl"]).image_processor
    assert qwen_resized_size(375, 500, ip) == (364, 504)
    assert qwen_resized_size(480, 640, ip) == (476, 644)  # 391 tokens, as the issue counts
    ip3 = _pinned(processors["qwen3_vl"], PINS["qwen3_vl"]).image_processor
    assert qwen_resized_size(480, 640, ip3) == (480, 640)  # 300 tokens


def test_two_halves_by_hand(processors):
    """A left/right split at a token boundary: every token is wholly one segment."""
    processor = _pinned(processors["qwen2_5_vl"], PINS["qwen2_5_vl"])
    seg = np.zeros((112, 224), np.int32)
    seg[:, :112] = 7
    seg[:, 112:] = 9
    cov = coverage(seg, [7, 9], processor)  # 112×224 → 112×224: 4 × 8 tokens of 28 px
    assert cov.shape == (32, 2)
    left = np.tile(np.arange(8) < 4, 4)
    np.testing.assert_array_equal(cov[:, 0], left.astype(np.float32))
    np.testing.assert_array_equal(cov[:, 1], (~left).astype(np.float32))
