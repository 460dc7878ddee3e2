import hashlib
import json

import numpy as np

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
