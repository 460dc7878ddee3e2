import numpy as np
import pytest

from raysal.data.mask import decode_mask_png, encode_mask_png, ids_to_rgb, rgb_to_ids


def test_known_value_follows_coco_panoptic_convention():
    rgb = np.array([[[1, 2, 3]]], np.uint8)
    assert rgb_to_ids(rgb)[0, 0] == 1 + 256 * 2 + 256 * 256 * 3


def test_ids_round_trip_through_rgb_and_png():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256**3, size=(17, 23)).astype(np.int32)
    ids[0, :4] = [0, 255, 256, 65536]  # channel boundaries
    assert np.array_equal(rgb_to_ids(ids_to_rgb(ids)), ids)
    decoded = decode_mask_png(encode_mask_png(ids))
    assert decoded.dtype == np.int32 and np.array_equal(decoded, ids)


def test_out_of_range_and_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="256"):
        ids_to_rgb(np.array([[256**3]]))
    with pytest.raises(ValueError, match="RGB"):
        rgb_to_ids(np.zeros((2, 2), np.uint8))


def test_truncated_png_raises():
    data = encode_mask_png(np.arange(64 * 64).reshape(64, 64))
    with pytest.raises(OSError):
        decode_mask_png(data[: len(data) // 2])
