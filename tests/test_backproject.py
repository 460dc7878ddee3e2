"""Attention mapped back onto the original pixels (the inverse of the coverage geometry) lands where it should."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoProcessor

from raysal.preprocess.coverage import coverage
from raysal.probes.backproject import backproject


def _region(h: int, w: int, top: int, bottom: int, left: int, right: int) -> np.ndarray:
    m = np.zeros((h, w), np.int32)
    m[top:bottom, left:right] = 1
    return m


def _concentrated(region: np.ndarray, processor) -> np.ndarray:
    """A synthetic attention on the tokens mostly inside the region (uniform over them), nothing elsewhere."""
    share = coverage(region, [1], processor)[:, 0]  # (I,)
    a = (share > 0.5).astype(np.float64)
    assert a.sum() > 0
    return a / a.sum()


@pytest.mark.parametrize(
    ("arch", "h", "w", "box"),
    [
        # llava-1.5 centre-crops a wide image: only x in [w/4, 3w/4) is seen; the region sits right of centre, top
        ("llava", 320, 640, (20, 120, 360, 460)),
        # LLaVA-NeXT anyres: base view + tiles + unpadding; region bottom-left in a tall image
        ("llava_next", 500, 300, (330, 470, 20, 140)),
    ],
)
def test_attention_on_a_region_peaks_inside_it_on_the_original_pixels(arch, h, w, box, tiny_llava, tiny_next):
    processor = AutoProcessor.from_pretrained(tiny_llava if arch == "llava" else tiny_next)
    region = _region(h, w, *box)
    heat = backproject(_concentrated(region, processor), h, w, processor)
    assert heat.shape == (h, w)
    inside = region.astype(bool)
    seen = np.isfinite(heat)
    y, x = np.unravel_index(np.nanargmax(heat), heat.shape)
    assert inside[y, x], (y, x, box)
    assert np.nanmean(heat[inside]) > 5 * np.nanmean(heat[seen & ~inside])
    # a flipped or shifted mapping would put the mass in the mirrored box: nothing there
    mirror = inside[::-1, ::-1]
    assert np.nanmean(heat[mirror & seen & ~inside]) < 0.1
    if arch == "llava":  # what the centre crop cut away is marked unseen, what it kept is not
        assert np.isnan(heat[:, : w // 4 - 10]).all() and np.isnan(heat[:, 3 * w // 4 + 10 :]).all()
        assert np.isfinite(heat[:, w // 4 + 10 : 3 * w // 4 - 10]).all()
    else:  # anyres sees every pixel
        assert seen.all()


def test_token_count_is_checked(tiny_llava):
    processor = AutoProcessor.from_pretrained(tiny_llava)
    with pytest.raises(ValueError, match="image tokens"):
        backproject(np.ones(10), 100, 100, processor)
