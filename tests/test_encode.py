"""Tokenisation of prompt + caption: labels, per-token segment ids from spans, coverage rows, collation."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysal.data.decode import decode_row
from raysal.data.shards import shard_files
from raysal.model.build import load_processor
from raysal.preprocess.batches import encode_row
from raysal.preprocess.collate import collate
from raysal.preprocess.encode import IGNORE


def rows(shards, n=8):
    return [decode_row(r) for r in pq.read_table(shard_files(shards, "train2017")[0]).to_pylist()[:n]]


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_labels_segments_and_coverage(arch, tiny_llava, tiny_next, small_shards):
    proc = load_processor(str(tiny_llava if arch == "llava" else tiny_next))
    tok = proc.tokenizer
    image_id = tok.convert_tokens_to_ids(proc.image_token)
    multi = 0
    for row in rows(small_shards):
        enc = encode_row(row, proc)
        ids, labels, segs = enc["input_ids"], enc["labels"], enc["token_segments"]
        # labels: exactly the caption and the end-of-turn token
        text = tok.decode(ids[labels != IGNORE])
        assert text.replace(" ", "") == (row["caption"] + tok.eos_token).replace(" ", "")
        assert (labels[ids == image_id] == IGNORE).all()
        # every span's tokens carry its ids, and decode to its phrase; untagged words carry none
        for a, b, span_ids in zip(row["span_start"], row["span_end"], row["span_segment_ids"], strict=True):
            phrase = row["caption"][a:b]
            mask = np.array([sorted(s[s >= 0].tolist()) == sorted(span_ids) for s in segs])
            assert tok.decode(ids[mask]).strip().rstrip(".,") == phrase
            multi += len(span_ids) > 1
        named = (segs >= 0).any(-1)
        assert named.sum() < (labels != IGNORE).sum(), "untagged caption words exist"
        assert not named[labels == IGNORE].any(), "only caption tokens name segments"
        # one coverage row per image token; NeXT newline rows are zero
        n_image = int((ids == image_id).sum())
        assert enc["coverage"].shape == (n_image, len(row["segment_ids"]))
        assert (enc["coverage"] >= 0).all() and (enc["coverage"].sum(1) <= 1 + 1e-6).all()
    assert multi > 0, "multi-id tags were exercised"


def test_collate_pads_every_axis(tiny_next, small_shards):
    proc = load_processor(str(tiny_next))
    samples = [encode_row(r, proc) for r in rows(small_shards, 3)]
    for side in ("left", "right"):
        b = collate([{k: v for k, v in s.items() if k != "image_id"} for s in samples], 0, side)
        L = max(len(s["input_ids"]) for s in samples)
        assert b["input_ids"].shape == (3, L) and b["labels"].shape == (3, L)
        assert b["coverage"].shape[1] == max(s["coverage"].shape[0] for s in samples)
        assert b["pixel_values"].shape[1] == max(s["pixel_values"].shape[0] for s in samples)
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            got = b["input_ids"][i, -n:] if side == "left" else b["input_ids"][i, :n]
            assert np.array_equal(got.numpy(), s["input_ids"])
            assert int(b["attention_mask"][i].sum()) == n
    with pytest.raises(ValueError, match="padding_side"):
        collate(samples, 0, "middle")


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
@pytest.mark.parametrize("height", [1, 3, 4])
def test_thin_images_keep_their_channel_order(arch, height, tiny_llava, tiny_next):
    """An (H, W, 3) array with H in {1, 3, 4} looks channels-first to the processor: the encoder must say
    channels_last, so the pixels equal those of the same image given as PIL, and coverage fits the tokens."""
    from PIL import Image

    from raysal.preprocess.encode import encode_sample

    proc = load_processor(str(tiny_llava if arch == "llava" else tiny_next))
    rng = np.random.default_rng(height)
    image = rng.integers(0, 256, (height, 40, 3), dtype=np.uint8)
    segment_map = np.where(np.arange(40)[None, :] < 20, 1, 2).repeat(height, 0).astype(np.int32)
    enc = encode_sample(image, segment_map, "a red box", [(2, 5, [1])], [1, 2], proc)
    ref = proc(text=proc.image_token, images=Image.fromarray(image), return_tensors="np")
    assert np.allclose(enc["pixel_values"], ref["pixel_values"][0], atol=1e-6)
    n_image = int((enc["input_ids"] == proc.tokenizer.convert_tokens_to_ids(proc.image_token)).sum())
    assert n_image == int((ref["input_ids"] == proc.tokenizer.convert_tokens_to_ids(proc.image_token)).sum())
    assert enc["coverage"].shape == (n_image, 2)
    if arch == "llava_next":
        assert enc["image_sizes"].tolist() == [height, 40]
