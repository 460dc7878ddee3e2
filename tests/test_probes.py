"""The probe set and its phrase maps: deterministic probes, maps on the original pixels, pictures that show them."""

from __future__ import annotations

import numpy as np
import pytest

from raysal.attention.capture import CAPTURE_IMPL, CapturePlan, enable_capture
from raysal.attention.selection import resolve_heads, resolve_layers
from raysal.model.build import load_model, load_processor, model_info
from raysal.probes.phrase_maps import phrase_maps
from raysal.probes.probe_set import select_probes
from raysal.probes.render import png_bytes, render


def test_probe_set_is_deterministic_and_grounded(small_shards):
    a = select_probes(small_shards, "val2017", images=3, phrases=2)
    b = select_probes(small_shards, "val2017", images=3, phrases=2)
    assert [p.describe() for p in a] == [p.describe() for p in b]
    assert 1 <= len(a) <= 3
    for probe in a:
        assert 1 <= len(probe.phrases) <= 2
        for ph in probe.phrases:
            assert probe.sample.caption[ph.start : ph.end] == ph.text and ph.segment_ids
    # a hold-out of the training split: only held-out ids, never a training image
    from raysal.data.holdout import in_holdout

    held = select_probes(small_shards, "train2017", holdout=0.3, images=4)
    assert held and all(in_holdout(p.sample.image_id, 0.3) for p in held)


@pytest.mark.parametrize("arch", ["llava", "llava_next", "qwen2_5_vl", "qwen3_vl"])
def test_phrase_maps_render_on_the_original_image(arch, tiny_of, small_shards):
    path = tiny_of(arch)
    processor = load_processor(str(path))
    model = load_model(str(path), dtype="float32").eval()
    enable_capture(model)
    model.set_attn_implementation({"text_config": CAPTURE_IMPL})
    info = model_info(model)
    protocol = CapturePlan(resolve_layers("all", info.n_layers), resolve_heads("all", info.n_heads), 0)
    probes = select_probes(small_shards, "val2017", images=2, phrases=2)
    maps = phrase_maps(model, processor, probes, protocol)
    assert len(maps) == sum(len(p.phrases) for p in probes)
    assert len({m.key for m in maps}) == len(maps)
    for m in maps:
        h, w = m.image.shape[:2]
        assert m.heat.shape == (h, w) == m.region.shape and m.region.any()
        if np.isfinite(m.heat).any():
            assert np.nanmax(m.heat) == pytest.approx(1.0) and np.nanmin(m.heat) >= 0
            assert set(m.scores) == {"amr", "ap", "nss", "pointing"}
        pic = render(m)
        assert pic.ndim == 3 and pic.shape[2] == 3 and pic.std() > 5  # not blank
        assert png_bytes(pic)[:8] == b"\x89PNG\r\n\x1a\n"
