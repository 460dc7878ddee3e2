"""The localisation readout (smooth → threshold at the mean → the box of what is above) and its sums; its inputs,
encoded once where the readout set is chosen, and a back-projection kept sparse that maps exactly as a fresh one."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from raysal.metrics.localization import (
    LocalizationSums,
    box_iou,
    cell_side,
    cell_values,
    mask_box,
    phrase_iou,
    readout_box,
    readout_mask,
    smooth_cells,
)
from raysal.metrics.records import ItemRecords


def _cells(gh: int, gw: int, blocks: list[tuple[int, int, int, int, float]], fill: float = 0.0) -> np.ndarray:
    """(gh, gw) map of ``fill`` with each (r0, r1, c0, c1, value) block (half-open, in cells) set to value."""
    a = np.full((gh, gw), fill, np.float64)
    for r0, r1, c0, c1, v in blocks:
        a[r0:r1, c0:c1] = v
    return a


def test_gaussian_smoothing_equals_brute_force_convolution():
    rng = np.random.default_rng(0)
    a = rng.random((7, 11))
    a[rng.random(a.shape) < 0.25] = np.nan  # unseen cells
    a[:, 0] = np.nan  # a cropped border
    got = smooth_cells(a)
    want = np.full(a.shape, np.nan)
    gh, gw = a.shape
    for y in range(gh):
        for x in range(gw):
            if not np.isfinite(a[y, x]):
                continue
            num = den = 0.0
            for dy in range(-4, 5):
                for dx in range(-4, 5):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < gh and 0 <= xx < gw and np.isfinite(a[yy, xx]):
                        g = math.exp(-(dy * dy + dx * dx) / 2.0)
                        num += g * a[yy, xx]
                        den += g
            want[y, x] = num / den
    np.testing.assert_array_equal(np.isnan(got), np.isnan(a))  # unseen cells stay unseen
    np.testing.assert_allclose(got[np.isfinite(a)], want[np.isfinite(a)], rtol=1e-12)


def test_unseen_cells_do_not_pull_values_down():
    a = np.full((10, 12), 0.7)
    a[:, :3] = np.nan
    s = smooth_cells(a)
    np.testing.assert_allclose(s[:, 3:], 0.7, rtol=1e-12)
    assert np.isnan(s[:, :3]).all()


def test_concentrated_mass_gives_a_hit():
    h, w, side = 320, 320, 10  # 32 × 32 cells
    region = np.zeros((h, w), bool)
    region[60:180, 100:200] = True
    rng = np.random.default_rng(2)
    heat = rng.random((32, 32)) * 0.05  # low background noise
    heat[6:18, 10:20] += 1.0  # the region's cells
    pixels = np.kron(heat, np.ones((side, side)))  # (H, W) as backproject gives it: constant per cell
    box = readout_box(cell_values(pixels, side), h, w, side)
    assert box is not None
    assert box_iou(box, mask_box(region)) >= 0.5
    assert phrase_iou(pixels, region, side) == box_iou(box, mask_box(region))


def test_uniform_and_unseen_maps_give_no_box():
    h, w, side = 200, 300, 10
    flat = np.full((20, 30), 0.37)
    assert readout_mask(flat) is None
    assert readout_box(flat, h, w, side) is None
    flat[:, :5] = np.nan  # uniform over what is seen
    assert readout_box(flat, h, w, side) is None
    assert readout_box(np.full((20, 30), np.nan), h, w, side) is None
    region = np.zeros((h, w), bool)
    region[50:150, 100:200] = True
    assert phrase_iou(np.full((h, w), 0.37, np.float32), region, side) == 0.0  # a miss
    assert phrase_iou(np.full((h, w), np.nan, np.float32), region, side) == 0.0


def test_region_next_to_a_cropped_border():
    # a wide image centre-cropped: columns < 10 and >= 30 (in cells) are unseen; the region touches the left crop
    h, w, side = 200, 400, 10
    a = _cells(20, 40, [(5, 11, 10, 16, 1.0)])
    a[:, :10] = np.nan
    a[:, 30:] = np.nan
    box = readout_box(a, h, w, side)
    assert box is not None
    assert box[0] == 100  # starts at the crop border, on the region's first seen column, never inside the crop
    comp = readout_mask(a)
    assert not (comp & np.isnan(a)).any()
    assert comp[5:11, 10].all()  # the region's border column is kept (not pulled down by the unseen cells)
    gt = (100, 50, 160, 110)
    assert box_iou(box, gt) >= 0.5


def test_two_blobs_give_one_box_around_both():
    """Every above-mean cell is boxed (the paper's code), not one connected part: attention split between two
    places is a wide box, a poor localisation."""
    h, w, side = 300, 300, 10
    box = readout_box(_cells(30, 30, [(3, 6, 3, 6, 1.0), (15, 24, 15, 24, 0.6)]), h, w, side)
    assert box is not None and box[0] <= 30 and box[1] <= 30 and box[2] >= 240 and box[3] >= 240, box
    assert box_iou(box, (150, 150, 240, 240)) < 0.5
    sel = readout_mask(_cells(30, 30, [(3, 6, 3, 6, 1.0), (15, 24, 15, 24, 0.6)]))
    assert sel[4, 4] and sel[20, 20] and not sel[0, 29]


def test_box_in_pixels_for_a_non_square_image_with_partial_cells():
    h, w, grid = 101, 250, 64
    side = cell_side(h, w, grid)
    assert side == 4  # ceil(250 / 64)
    gh, gw = -(-h // side), -(-w // side)
    assert (gh, gw) == (26, 63)  # last row spans [100, 101), last column [248, 250)
    from raysal.probes.backproject import cell_map

    cells, shape = cell_map(h, w, grid)
    assert shape == (gh, gw)
    a = _cells(gh, gw, [(20, 26, 55, 63, 1.0)])  # a block in the bottom-right corner, touching both partial cells
    # σ = 1: a cell 2 away from the block keeps ≈ 0.059 of its value, 3 away ≈ 0.005; the mean is ≈ 0.03, so the
    # selection reaches 2 cells past the block's top and left: rows 18..25, columns 53..62
    assert readout_box(a, h, w, side) == (53 * 4, 18 * 4, 250, 101)
    pixels = a.ravel()[cells]  # (H, W) as backproject lays it out
    np.testing.assert_array_equal(cell_values(pixels, side), a)
    with pytest.raises(ValueError, match="gh, gw"):
        readout_box(a[:, :-1], h, w, side)


def test_mask_box_and_box_iou_by_hand():
    m = np.zeros((10, 12), bool)
    m[3:6, 7:10] = True
    m[4, 2] = True
    assert mask_box(m) == (2, 3, 10, 6)
    assert mask_box(np.zeros((4, 4), bool)) is None
    assert box_iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (2, 2, 4, 4)) == pytest.approx(4 / 100)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # half-open: touching edges do not overlap
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou(None, (0, 0, 1, 1)) == 0.0
    assert box_iou((0, 0, 10, 20), (0, 10, 10, 30)) == pytest.approx(100 / 300)


def test_sums_merge_across_shards_equals_one_pass():
    rng = np.random.default_rng(3)
    ious = [*rng.random(37).tolist(), 0.5, 0.0, 1.0]
    one = LocalizationSums()
    for v in ious:
        one.add(v)
    a, b = LocalizationSums(), LocalizationSums()
    for v in ious[:15]:
        a.add(v)
    for v in ious[15:]:
        b.add(v)
    t = a.tensor() + b.tensor()  # what an all-reduce SUM does
    assert t.dtype == torch.float64 and t.shape == (3,)
    merged = LocalizationSums.from_tensor(t)
    assert merged.n == one.n == len(ious)
    for k, v in one.metrics().items():
        assert merged.metrics()[k] == pytest.approx(v)
        assert (a + b).metrics()[k] == pytest.approx(v)
    assert one.metrics()["rec_acc50"] == pytest.approx(sum(v >= 0.5 for v in ious) / len(ious))  # 0.5 is a hit
    assert one.metrics()["rec_miou"] == pytest.approx(float(np.mean(ious)))
    empty = LocalizationSums().metrics()
    assert math.isnan(empty["rec_acc50"]) and math.isnan(empty["rec_miou"])
    with pytest.raises(ValueError):
        one.add(float("nan"))
    with pytest.raises(ValueError):
        LocalizationSums.from_tensor(torch.zeros(4, dtype=torch.float64))


# The readout's inputs, encoded once where the set is chosen (`raysal.probes.readout_items`); the loop only runs
# the forwards on them (`raysal.loop.readout_eval`).


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def processor(request):
    from raysal.model.build import load_processor

    return load_processor(str(request.getfixturevalue("tiny_llava" if request.param == "llava" else "tiny_next")))


@pytest.mark.parametrize(("h", "w"), [(101, 250), (320, 200)])
def test_a_stored_backprojection_is_the_fresh_one_bit_for_bit(processor, h, w):
    from raysal.probes.backproject import Backprojection
    from raysal.probes.readout_items import SparseBackprojection

    fresh = Backprojection(h, w, processor)
    stored = SparseBackprojection.of(h, w, processor)
    assert stored.values.size * 20 < fresh.cov.size  # a few cells per token: kept sparse between evaluations
    back = stored.dense()
    for name in ("cells", "cov", "footprint", "seen"):
        np.testing.assert_array_equal(getattr(back, name), getattr(fresh, name), err_msg=name)
    a = np.random.default_rng(0).random(fresh.cov.shape[0])  # (I,) any attention
    np.testing.assert_array_equal(back(a), fresh(a))  # NaN (cropped away) at the same pixels too


def test_a_readout_item_holds_each_phrases_own_tokens(processor, small_shards):
    """One row with every phrase grounded; a phrase's rows are exactly the positions its own encoding grounds."""
    from raysal.data.decode import decode_image
    from raysal.data.mask import decode_mask_png
    from raysal.preprocess.encode import encode_sample
    from raysal.probes.probe_set import select_probes
    from raysal.probes.readout_items import readout_items

    probes = select_probes(str(small_shards), "train2017", images=3, phrases=10**6)
    items = readout_items(probes, processor)
    assert len(items) == len(probes) == 3
    for probe, item in zip(probes, items, strict=True):
        s = probe.sample
        image, segment_map = decode_image(s.image_bytes), decode_mask_png(s.mask_bytes)
        np.testing.assert_array_equal(item.segment_map, segment_map)
        assert item.image_id == s.image_id and item.batch["input_ids"].shape[0] == 1
        assert item.batch["pixel_values"].dtype == torch.uint8  # normalised on the device, at each evaluation
        union = item.batch["grounded_pos"][0]  # (T,)
        for phrase, got in zip(probe.phrases, item.phrases, strict=True):
            own = encode_sample(image, segment_map, s.caption, [(phrase.start, phrase.end, phrase.segment_ids)],
                                s.segment_ids, processor)["grounded_pos"]  # fmt: skip
            assert got.rows and union[list(got.rows)].tolist() == own.tolist()
            assert got.segment_ids == phrase.segment_ids


def test_the_readout_encodes_once_not_at_each_evaluation(tiny_llava, small_shards, monkeypatch):
    """`val_extras` encodes the readout set when it is chosen; its evaluations only run forwards, the same
    metrics each time, the prepared inputs untouched."""
    from types import SimpleNamespace

    import raysal.probes.readout_items as prepared
    from raysal.attention.capture import CAPTURE_IMPL, CapturePlan, enable_capture
    from raysal.model.build import load_model, load_processor
    from raysal.orchestration.train.val_extras import val_extras

    encoded = []
    real_encode = prepared.encode_sample
    monkeypatch.setattr(prepared, "encode_sample", lambda *a, **k: encoded.append(1) or real_encode(*a, **k))
    data = {"shards": str(small_shards), "train_split": "train2017", "val_split": "val2017",
            "prompt": "Describe the image in detail."}  # fmt: skip
    trainer = {"pope": {"images": 0}, "readout": {"images": 2}}
    spec = SimpleNamespace(data=data, config={"trainer": trainer}, run_dir="/nonexistent/r", model={},
                           objective={"metric": "val/amr"})  # fmt: skip
    proc = load_processor(str(tiny_llava))
    extra = val_extras(spec, proc, torch.device("cpu"), sharded=False, lockstep=False, write=False)
    assert extra is not None and len(encoded) >= 4  # 2 images: the union and each phrase alone
    n = len(encoded)
    model = load_model(str(tiny_llava), dtype="float32")
    enable_capture(model)
    model.set_attn_implementation({"text_config": CAPTURE_IMPL})
    tc = model.config.text_config
    protocol = CapturePlan(tuple(range(tc.num_hidden_layers)), tuple(range(tc.num_attention_heads)), 0)
    first = extra(model, protocol, contextlib.nullcontext(), ItemRecords())
    second = extra(model, protocol, contextlib.nullcontext(), ItemRecords())
    assert len(encoded) == n  # nothing encoded at the evaluations
    assert first["rec_phrases"] > 0 and first == second
