"""Tokenisation of prompt + caption: labels, per-token segment ids from spans, coverage rows, collation."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raysal.batch import IGNORE, PixelNorm, model_inputs, to_device
from raysal.data.decode import decode_row
from raysal.data.shards import shard_files
from raysal.model.build import load_processor
from raysal.preprocess.batches import encode_row
from raysal.preprocess.collate import collate


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


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_uint8_pixels_normalised_on_the_device_equal_the_processors(arch, tiny_llava, tiny_next, small_shards):
    """Samples ship the processor's resized pixels as uint8; `to_device` rescales and normalises them with the
    processor's own settings: the model sees the processor's numbers (float32 rounding apart)."""
    proc = load_processor(str(tiny_llava if arch == "llava" else tiny_next))
    samples = [encode_row(r, proc) for r in rows(small_shards, 3)]
    assert all(s["pixel_values"].dtype == np.uint8 for s in samples)
    batch = collate(samples, proc.tokenizer.pad_token_id)
    assert batch["pixel_values"].dtype == torch.uint8
    with pytest.raises(ValueError, match="uint8"):
        model_inputs(batch)  # a batch that skipped the device step never reaches the model
    moved = to_device(batch, "cpu", PixelNorm.from_processor(proc))
    assert moved["pixel_values"].dtype == torch.float32
    for i, row in enumerate(rows(small_shards, 3)):
        ref = proc.image_processor(row["image"], return_tensors="np", input_data_format="channels_last")
        ref = ref["pixel_values"][0]  # (3, H, W) | NeXT (P, 3, H, W), rescaled and normalised by the processor
        got = moved["pixel_values"][i, : ref.shape[0]].numpy() if arch == "llava_next" else moved["pixel_values"][i]
        assert np.abs(np.asarray(got) - ref).max() < 1e-5
    # a batch already on the device passes through: never normalised twice
    assert torch.equal(to_device(moved, "cpu", PixelNorm(None, None, None))["pixel_values"], moved["pixel_values"])


@pytest.mark.parametrize("side", ["left", "right"])
def test_positions_travel_with_the_batch(side, tiny_next, small_shards):
    """Image-token and grounded-token positions found at encode time index the padded batch: they equal a search of
    the collated input_ids / labels / token_segments, on either padding side."""
    proc = load_processor(str(tiny_next))
    image_token = proc.tokenizer.convert_tokens_to_ids(proc.image_token)
    samples = [encode_row(r, proc) for r in rows(small_shards, 4)]
    b = collate(samples, proc.tokenizer.pad_token_id, side)
    grounded = (b["token_segments"] >= 0).any(-1) & (b["labels"] != IGNORE)  # (B, L)
    for i in range(len(samples)):
        image_pos, grounded_pos = b["image_pos"][i], b["grounded_pos"][i]
        assert torch.equal(image_pos[image_pos >= 0], torch.nonzero(b["input_ids"][i] == image_token).squeeze(1))
        assert torch.equal(grounded_pos[grounded_pos >= 0], torch.nonzero(grounded[i]).squeeze(1))
        assert (grounded_pos >= 0).sum() > 0
    assert (b["image_pos"] < 0).any(), "NeXT images of different sizes: some rows are padded"


def test_collate_pads_every_axis(tiny_next, small_shards):
    proc = load_processor(str(tiny_next))
    samples = [encode_row(r, proc) for r in rows(small_shards, 3)]
    for side in ("left", "right"):
        b = collate(samples, 0, side)
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
    with pytest.raises(KeyError, match="image_pos"):
        collate([{k: v for k, v in s.items() if k != "image_pos"} for s in samples], 0)


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
    pixels = PixelNorm.from_processor(proc)(torch.from_numpy(enc["pixel_values"])).numpy()
    assert np.allclose(pixels, ref["pixel_values"][0], atol=1e-6)
    n_image = int((enc["input_ids"] == proc.tokenizer.convert_tokens_to_ids(proc.image_token)).sum())
    assert n_image == int((ref["input_ids"] == proc.tokenizer.convert_tokens_to_ids(proc.image_token)).sum())
    assert enc["coverage"].shape == (n_image, 2)
    if arch == "llava_next":
        assert enc["image_sizes"].tolist() == [height, 40]
