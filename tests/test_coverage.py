"""Coverage geometry proven against the REAL processors (tiny checkpoints with the llava-hf geometry).

The probe image encodes its own coordinates: R = round(255·x/(W−1)), G = round(255·y/(H−1)) and B = 255 (a
validity channel: the processors pad with 0, so B/255 pooled per cell is the fraction of real pixels). The
processor's 14×14-cell means of R, G, B — arranged for NeXT by the model's own ``pack_image_features`` — must match
what our coverage predicts when the segment map labels every pixel with its column (or row): the coverage-weighted
mean of R (G) over the cell, with padding counting as 0 exactly like the processor's black padding.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaNextConfig, LlavaNextModel
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
from transformers.image_utils import ChannelDimension

from raysal.model.tiny import PINPOINTS, write_tiny
from raysal.preprocess.coverage import coverage, coverage_llava, coverage_llava_next

P = 14
# (W, H): COCO-like, square, 3:1 and 1:3, exact pinpoint shapes, 2:1 and 1:2, odd sizes, a tiny upsampled one
SIZES = [
    (640, 480), (480, 640), (500, 500), (640, 213), (213, 640), (1008, 336), (336, 1008), (800, 400), (400, 800),
    (333, 517), (1001, 999), (37, 50),
]  # fmt: skip
# Bicubic resampling reproduces a linear ramp (its weights are symmetric and sum to 1), so a cell's mean coordinate
# is the mean of its source pixel centres; nearest-neighbour label sampling picks source pixels within half a source
# pixel of those centres, and 8-bit quantisation of R/G averages out over a cell. Observed: ≤ 0.02 cell, 0.09 for a
# 37×50 image upsampled ×9 (half a source px = 0.3 output px). 0.15 cell fails a crop/pad offset off by 2 output px
# on every token; the median bound (0.04 cell, about half a px) fails a 1 px shift on all interior tokens.
TOL_MAX_CELLS = 0.15
TOL_MEDIAN_CELLS = 0.04
TOL_VALID = 0.02  # B channel: bicubic of a constant is the constant, up to uint8 rounding at the padding edge
TOL_VALID_PADDED = 0.05  # pad-then-resize blurs the B edge (measured ≤ 0.025); a 1 px slip at ×6.7 moves 0.48


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_coverage")
    return {arch: write_tiny(root / arch, arch) for arch in ("llava", "llava_next")}


@pytest.fixture(scope="module")
def processors(tiny: dict[str, Path]) -> dict:
    return {arch: AutoProcessor.from_pretrained(path) for arch, path in tiny.items()}


@pytest.fixture(scope="module")
def next_model(tiny: dict[str, Path]) -> LlavaNextModel:
    return LlavaNextModel(LlavaNextConfig.from_pretrained(tiny["llava_next"])).eval()


def probe_image(w: int, h: int) -> Image.Image:
    r = np.round(255 * np.arange(w) / (w - 1))[None, :].repeat(h, 0)
    g = np.round(255 * np.arange(h) / (h - 1))[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([r, g, np.full((h, w), 255.0)], -1).astype(np.uint8))


def pool_cells(pixel_values: np.ndarray) -> np.ndarray:
    """(B, 3, h, w) → (B, gh·gw, 3) mean per 14×14 cell, token order row-major."""
    b, c, h, w = pixel_values.shape
    cells = pixel_values.reshape(b, c, h // P, P, w // P, P).mean(axis=(3, 5))  # (B, 3, gh, gw)
    return cells.reshape(b, c, -1).transpose(0, 2, 1)


def processor_tokens(arch: str, processor, model, img: Image.Image) -> np.ndarray:
    """(I, 3) per-token pooled (R, G, B) of the processor's pixels, in the model's image-token order."""
    out = processor.image_processor(images=img, do_rescale=False, do_normalize=False, return_tensors="np")
    pv = np.asarray(out["pixel_values"], dtype=np.float64)
    if arch == "llava":
        return pool_cells(pv)[0]
    feats = torch.from_numpy(pool_cells(pv[0]))  # (1 + tiles, 576, 3)
    sentinel = torch.full((3,), -1.0, dtype=feats.dtype)
    packed, _ = model.pack_image_features([feats], torch.tensor(out["image_sizes"]), "default", image_newline=sentinel)
    return packed[0].numpy()


def n_image_tokens(processor, img: Image.Image) -> int:
    ids = np.asarray(processor(text=processor.image_token, images=img)["input_ids"])
    return int((ids == processor.image_token_id).sum())


def scales(arch: str, w: int, h: int, n_rows: int) -> np.ndarray:
    """(I, 2) processed-px per original-px (x, y) of each token's block, to express errors in cells."""
    if arch == "llava":
        s = 336 / min(w, h)  # shortest edge → 336
        return np.full((n_rows, 2), s)
    nh, nw = get_patch_output_size(
        np.zeros((1, h, w)), select_best_resolution((h, w), PINPOINTS), ChannelDimension.FIRST
    )
    out = np.tile([nw / w, nh / h], (n_rows, 1))
    out[:576] = [336 / w, 336 / h]  # base image: squashed
    return out


def predicted_tokens(arch: str, processor, w: int, h: int) -> np.ndarray:
    """(I, 3) our prediction of the processor's pooled (R, G, B) via coverage of column / row label maps."""
    r_val = np.round(255 * np.arange(w) / (w - 1))
    g_val = np.round(255 * np.arange(h) / (h - 1))
    cols = np.broadcast_to(np.arange(1, w + 1, dtype=np.int32), (h, w))
    rows = np.broadcast_to(np.arange(1, h + 1, dtype=np.int32)[:, None], (h, w))
    cx = coverage(cols, np.arange(1, w + 1), processor)  # (I, W)
    cy = coverage(rows, np.arange(1, h + 1), processor)  # (I, H)
    np.testing.assert_allclose(cx.sum(1), cy.sum(1), atol=1e-6)  # same validity whichever labelling
    return np.stack([cx @ r_val, cy @ g_val, 255 * cx.sum(1)], axis=1)


def coordinate_error_cells(got: np.ndarray, pred: np.ndarray, scale: np.ndarray, w: int, h: int) -> np.ndarray:
    """(I, 2) |Δx|, |Δy| in cells of each token's block; NaN for tokens with under 10 % real pixels.

    Coordinates are R/B and G/B: the mean coordinate over a cell's real pixels. Dividing by the validity channel
    cancels the zero padding (also where a pad-then-resize blurs the edge: ramp and mask blur alike)."""
    ok = (pred[:, 2] > 0.1 * 255) & (got[:, 2] > 0.1 * 255)
    err = np.full((len(got), 2), np.nan)
    xy_got = got[ok, :2] / got[ok, 2:] * np.array([w - 1, h - 1])  # original px
    xy_pred = pred[ok, :2] / pred[ok, 2:] * np.array([w - 1, h - 1])
    err[ok] = np.abs(xy_got - xy_pred) * scale[ok] / P
    return err


def test_every_pinpoint_is_exercised():
    hit = {select_best_resolution((h, w), PINPOINTS) for w, h in SIZES}
    assert hit == {tuple(p) for p in PINPOINTS}


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
@pytest.mark.parametrize(("w", "h"), SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_geometry_matches_real_processor(arch, w, h, processors, next_model):
    processor = processors[arch]
    img = probe_image(w, h)
    got = processor_tokens(arch, processor, next_model, img)  # (I, 3)
    pred = predicted_tokens(arch, processor, w, h)  # (I, 3)
    assert pred.shape[0] == got.shape[0] == n_image_tokens(processor, img)

    newline = (got == -1).all(1)
    assert (arch == "llava_next") == newline.any()
    assert (pred[newline] == 0).all()  # newline tokens: zero coverage rows
    got, pred = got[~newline], pred[~newline]

    err_cells = coordinate_error_cells(got, pred, scales(arch, w, h, len(newline))[~newline], w, h)
    assert np.isfinite(err_cells).mean() > 0.9
    median = np.nanmedian(err_cells, axis=0).max()  # per axis: a shift along one axis must not hide
    print(f"{arch} {w}x{h}: max {np.nanmax(err_cells):.3f} median {median:.3f} cells")
    assert np.nanmax(err_cells) <= TOL_MAX_CELLS
    assert median <= TOL_MEDIAN_CELLS
    # validity: the fraction of real (non-padding) pixels per cell equals our row sums
    np.testing.assert_allclose(got[:, 2] / 255, pred[:, 2] / 255, atol=TOL_VALID)


def test_pad_to_square_variant_matches_real_processor(processors):
    from transformers import LlavaImageProcessorPil

    # image_mean 0 makes the pad background black (it is mean·255), like the coverage's void
    ip = LlavaImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_pad=True, image_mean=[0, 0, 0]
    )
    for w, h in [(640, 480), (213, 640), (333, 517), (37, 50), (101, 40)]:  # odd pads: a 1 px slip is visible
        pv = ip(images=probe_image(w, h), do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"]
        got = pool_cells(np.asarray(pv, np.float64))[0]
        cols = np.broadcast_to(np.arange(1, w + 1, dtype=np.int32), (h, w))
        rows = np.broadcast_to(np.arange(1, h + 1, dtype=np.int32)[:, None], (h, w))
        cx, cy = coverage_llava(cols, np.arange(1, w + 1), ip), coverage_llava(rows, np.arange(1, h + 1), ip)
        assert cx.shape == (576, w)
        pred = np.stack(
            [cx @ np.round(255 * np.arange(w) / (w - 1)), cy @ np.round(255 * np.arange(h) / (h - 1)), 255 * cx.sum(1)],
            axis=1,
        )
        # Padding happens BEFORE the bicubic resize here, so zeros blur into the image edge and the uint8 clip of
        # the ringing biases edge cells (up to ~0.7 cell for a ×9 upsample): compare coordinates on cells whose
        # 3×3 neighbourhood is all real pixels, and the validity fraction everywhere at a looser bound.
        full = np.pad(pred[:, 2].reshape(24, 24) > 254.99, 1)  # (26, 26)
        inner = np.all([full[1 + dy : 25 + dy, 1 + dx : 25 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
        err = coordinate_error_cells(got, pred, np.full((576, 2), 336 / max(w, h)), w, h)[inner.ravel()]  # → 336
        assert err.max() <= TOL_MAX_CELLS and np.median(err, axis=0).max() <= TOL_MEDIAN_CELLS, (w, h, err.max())
        print(f"pad {w}x{h}: valid max err {np.abs(got[:, 2] - pred[:, 2]).max() / 255:.3f}")
        np.testing.assert_allclose(got[:, 2] / 255, pred[:, 2] / 255, atol=TOL_VALID_PADDED)
        assert (cx.sum(1) < 1).any()  # padding really present


def test_two_halves_by_hand(processors):
    # llava: 672×336 needs no resize; the 336 crop keeps x ∈ [168, 504). A split at x = 343 = 168 + 12.5 cells.
    seg = np.ones((336, 672), np.int32)
    seg[:, 343:] = 2
    cov = coverage(seg, [1, 2], processors["llava"]).reshape(24, 24, 2)
    assert np.array_equal(cov[:, :12], np.broadcast_to([1.0, 0.0], (24, 12, 2)))
    assert np.array_equal(cov[:, 12], np.broadcast_to([0.5, 0.5], (24, 2)))
    assert np.array_equal(cov[:, 13:], np.broadcast_to([0.0, 1.0], (24, 11, 2)))
    # id order is the column order; an absent id gets a zero column
    cov2 = coverage(seg, [2, 9, 1], processors["llava"]).reshape(24, 24, 3)
    assert np.array_equal(cov2[..., [2, 0]], cov) and not cov2[..., 1].any()
    assert coverage(seg, [], processors["llava"]).shape == (576, 0)

    # NeXT: a 336×336 image goes on the 336×672 canvas (pad 168 px = 12 tokens each side, removed by unpadding);
    # base 576 rows = the image itself, then 24 rows of (24 tokens + newline) = 1176 rows
    sq = np.ones((336, 336), np.int32)
    sq[:, 168:] = 2
    cov = coverage(sq, [1, 2], processors["llava_next"])
    assert cov.shape == (576 + 24 * 25, 2)
    assert coverage(sq * 10**6, [], processors["llava_next"]).shape == (576 + 24 * 25, 0)  # large-id path too
    half = np.zeros((24, 24, 2), np.float32)
    half[:, :12, 0] = half[:, 12:, 1] = 1
    assert np.array_equal(cov[:576].reshape(24, 24, 2), half)
    grid = cov[576:].reshape(24, 25, 2)
    assert np.array_equal(grid[:, :24], half) and not grid[:, 24].any()


def test_void_unknown_ids_and_cropped_border(processors):
    # 640×480 → 448×336, crop offset 56 px = 80 original px each side
    seg = np.full((480, 640), 5, np.int32)
    seg[:, :78] = 1  # left border, cropped away
    seg[:, 563:] = 3  # right border, cropped away
    seg[:100, 200:300] = 0  # void
    seg[300:, 200:300] = 77  # not in segment_ids
    cov = coverage(seg, [1, 3, 5], processors["llava"])
    assert cov.shape == (576, 3) and cov.dtype == np.float32
    assert not cov[:, 0].any() and not cov[:, 1].any() and cov[:, 2].any()
    sums = cov.sum(1)
    assert (sums <= 1 + 1e-6).all() and (sums < 1).any() and np.isclose(sums, 1).any()
    # NeXT sees the whole image: the border segments are back
    cov = coverage(seg, [1, 3, 5], processors["llava_next"])
    assert cov.shape[0] == n_image_tokens(processors["llava_next"], Image.new("RGB", (640, 480))) == 2340
    assert cov[:, 0].any() and cov[:, 1].any() and (cov.sum(1) <= 1 + 1e-6).all()
    # every pixel labelled: 640×480 sits on 672×504 in the 672² canvas, 84 px = 6 token rows of padding each side,
    # all removed by unpadding → every grid row sums to 1, the 36 newline rows to 0, the base rows to 1
    sums = coverage(np.ones((480, 640), np.int32), [1], processors["llava_next"])[:, 0]
    newline = np.zeros(2340, bool)
    newline[576 + 48 :: 49] = True
    assert newline.sum() == 36
    np.testing.assert_allclose(sums[~newline], 1, atol=1e-6)
    assert not sums[newline].any()


def test_bad_input_is_rejected(processors):
    with pytest.raises(ValueError, match="unique"):
        coverage(np.zeros((10, 10), np.int32), [1, 1], processors["llava"])
    with pytest.raises(ValueError, match="integer"):
        coverage(np.zeros((10, 10), np.float32), [1], processors["llava"])
    with pytest.raises(TypeError, match="LlavaProcessor"):
        coverage(np.zeros((10, 10), np.int32), [1], processors["llava"].tokenizer)
    with pytest.raises(ValueError, match="default"):
        coverage_llava_next(np.zeros((10, 10), np.int32), [1], processors["llava_next"].image_processor,
                            vision_feature_select_strategy="full")  # fmt: skip


def test_speed_sanity(processors):
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 30, size=(480, 640)).astype(np.int32) * 99991  # COCO-panoptic-sized ids
    ids = np.unique(seg)[1:]
    for arch in ("llava", "llava_next"):
        coverage(seg, ids, processors[arch])
        t = time.perf_counter()
        for _ in range(10):
            coverage(seg, ids, processors[arch])
        print(f"coverage {arch} 640x480, {len(ids)} segments: {(time.perf_counter() - t) * 100:.1f} ms/call")
