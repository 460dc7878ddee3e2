import hashlib
import io
import json

import numpy as np
from PIL import Image

from raysal.data.check import scan
from raysal.data.mask import decode_mask_png
from raysal.data.synthetic import THINGS, WORDS, generate


def tree_digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic_per_seed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(a, images=8, seed=7, broken=3, max_side=96)
    generate(b, images=8, seed=7, broken=3, max_side=96)
    generate(c, images=8, seed=8, broken=3, max_side=96)
    assert tree_digest(a) == tree_digest(b)
    assert tree_digest(a) != tree_digest(c)


def test_dataset_has_the_variety_the_pipeline_needs(clean_root):
    samples = []
    scan(clean_root, on_sample=samples.append)
    assert len(samples) == 30
    raw = "".join(p.read_text() for p in clean_root.glob("panoptic_*_captions/*.txt"))
    assert ">" in raw and ": " in raw
    assert any(c.isdigit() and raw[i + 1] == ">" for i, c in enumerate(raw[:-1])), "no-colon tags present"
    assert len({s.width / s.height for s in samples}) >= 4, "several aspect ratios"
    assert any(len(sp.segment_ids) > 1 for s in samples for sp in s.spans), "multi-id tags"
    splits = json.loads((clean_root / "synthetic.json").read_text())["splits"]
    assert splits == {"train2017": 24, "val2017": 6}
    assert sum(any(c in THINGS for c in s.category_ids) for s in samples) >= 25, "things in nearly every scene"
    vocab = set(WORDS)
    for s in samples:
        ids = decode_mask_png(s.mask_bytes)
        tagged = set()
        for sp in s.spans:
            tagged.update(sp.segment_ids)
            assert np.isin(ids, sp.segment_ids).any(), "every tag names visible pixels"
        # every region is named, things and stuff alike; untagged words surround the tags
        assert tagged == set(s.segment_ids)
        assert any(c not in THINGS for c in s.category_ids), "every scene has a stuff background"
        words = s.caption.lower().replace(",", " ").replace(".", " ").split()
        assert set(words) <= vocab, set(words) - vocab
        assert len(words) > sum(len(s.caption[sp.start : sp.end].split()) for sp in s.spans)


def test_the_coded_palette_paints_each_shape_its_colour_and_gives_pope_images(tmp_path):
    """palette="coded" (the demo's): every thing is in its category's colour (its caption says so and its pixels are
    that colour), scenes hold 3-5 shapes, and the demo-sized validation half yields ≥ 60 POPE questions per setting
    with about as many "No" as "Yes" (6 categories: an image with 3 things has 3 absent ones to ask about); "any"
    keeps the four shapes of earlier versions, its scenes unchanged."""
    from raysal.data.synthetic import CODED, COLOURS, MIXED_THINGS, categories
    from raysal.metrics.pope import build_pope

    generate(tmp_path / "coded", images=192, seed=0, max_side=320, palette="coded")
    samples = []
    scan(tmp_path / "coded", on_sample=samples.append)
    assert len(samples) == 192
    for s in samples:
        image = np.asarray(Image.open(io.BytesIO(s.image_bytes)).convert("RGB"))
        ids = decode_mask_png(s.mask_bytes)
        things = [(i, c) for i, c in zip(s.segment_ids, s.category_ids, strict=True) if c in THINGS]
        assert 2 <= len(things) <= 5, s.image_id  # 3-5 placed; a shape with no free spot is skipped
        for seg, cat in things:
            seen = np.median(image[ids == seg], 0)  # JPEG blurs thin shapes' edges: the median, the nearest colour
            nearest = min(CODED.values(), key=lambda c, seen=seen: np.abs(np.asarray(COLOURS[c]) - seen).sum())
            assert nearest == CODED[cat], (s.image_id, cat, seen)
            assert f"{CODED[cat]} {THINGS[cat]}" in s.caption
    val = json.loads((tmp_path / "coded" / "annotations" / "panoptic_val2017.json").read_text())["annotations"]
    half = sorted((a["image_id"], [x["category_id"] for x in a["segments_info"]]) for a in val)[: len(val) // 2]
    built = build_pope(half, {c["id"]: c for c in categories()}, seed=0, max_images=64)
    asked = [q for q in built.questions if q.setting == "adversarial"]
    assert len(asked) >= 60 and 0.4 <= sum(q.label for q in asked) / len(asked) <= 0.7, len(asked)

    generate(tmp_path / "any", images=30, seed=0, max_side=96)
    mixed = []
    scan(tmp_path / "any", on_sample=mixed.append)
    assert {c for s in mixed for c in s.category_ids if c in THINGS} <= set(MIXED_THINGS)
