"""Qwen2.5-VL and Qwen3-VL through the batch contract and the capture (tiny checkpoints of both families).

What the family adds: patch rows instead of an image (`raysal.batch.patchify`), ``image_grid_thw``,
``mm_token_type_ids`` (Qwen3-VL refuses a forward without them; Qwen2.5-VL silently falls back to 1-D positions),
M-RoPE positions through padding, the ChatML template. The capture on both families: tests/test_capture.py.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raysal.batch import IGNORE, PixelNorm, model_inputs, patchify, to_device, unpatchify
from raysal.data.decode import decode_row
from raysal.data.shards import shard_files
from raysal.model.build import load_model, load_processor
from raysal.preprocess.batches import encode_row
from raysal.preprocess.collate import collate

ARCHS = ["qwen2_5_vl", "qwen3_vl"]


def rows(shards, n):
    return [decode_row(r) for r in pq.read_table(shard_files(shards, "train2017")[0]).to_pylist()[:n]]


@pytest.mark.parametrize("arch", ARCHS)
def test_labels_segments_coverage_and_token_types(arch, tiny_qwen, small_shards):
    proc = load_processor(str(tiny_qwen[arch]))
    tok = proc.tokenizer
    for row in rows(small_shards, 4):
        enc = encode_row(row, proc)
        ids, labels, segs = enc["input_ids"], enc["labels"], enc["token_segments"]
        # labels: the caption and the end of its turn (ChatML: <|im_end|> and the newline after it)
        assert tok.decode(ids[labels != IGNORE]) == row["caption"] + "<|im_end|>\n"
        for a, b, span_ids in zip(row["span_start"], row["span_end"], row["span_segment_ids"], strict=True):
            mask = np.array([sorted(s[s >= 0].tolist()) == sorted(span_ids) for s in segs])
            assert tok.decode(ids[mask]).strip().rstrip(".,") == row["caption"][a:b]
        image = ids == proc.image_token_id
        assert np.array_equal(enc["mm_token_type_ids"], image.astype(np.int64))
        assert np.array_equal(enc["image_pos"], np.nonzero(image)[0])
        _, gh, gw = enc["image_grid_thw"]
        m = proc.image_processor.merge_size
        assert enc["coverage"].shape == (image.sum(), len(row["segment_ids"])) and gh * gw // m**2 == image.sum()
        np.testing.assert_allclose(enc["coverage"].sum(1), 1.0, atol=1e-6)  # Qwen never pads an image
        assert enc["pixel_values"].shape == (3, gh * proc.image_processor.patch_size,
                                              gw * proc.image_processor.patch_size)  # fmt: skip


@pytest.mark.parametrize("arch", ARCHS)
def test_pixels_made_on_the_device_equal_the_processors_rows(arch, tiny_qwen, small_shards):
    """Samples ship the resized image (uint8, one temporal copy); `to_device` normalises it and cuts it into the
    processor's patch rows: the model sees the processor's numbers, rows in the processor's order."""
    proc = load_processor(str(tiny_qwen[arch]))
    ip = proc.image_processor
    samples = [encode_row(r, proc) for r in rows(small_shards, 3)]
    assert all(s["pixel_values"].dtype == np.uint8 for s in samples)
    assert len({s["pixel_values"].shape for s in samples}) > 1, "images of different sizes: the batch is padded"
    moved = to_device(collate(samples, proc.tokenizer.pad_token_id), "cpu", PixelNorm.from_processor(proc))
    ref = [ip(r["image"], return_tensors="np", input_data_format="channels_last") for r in rows(small_shards, 3)]
    expected = np.concatenate([r["pixel_values"] for r in ref])  # (Σ patches, 3·2·p·p)
    assert moved["pixel_values"].shape == expected.shape
    assert np.abs(moved["pixel_values"].numpy() - expected).max() < 1e-5
    assert torch.equal(moved["image_grid_thw"], torch.from_numpy(np.concatenate([r["image_grid_thw"] for r in ref])))
    # the two layouts are inverse: rows → image → rows
    p, m, t = int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size)
    one = ref[0]["pixel_values"]
    _, gh, gw = ref[0]["image_grid_thw"][0]
    image = unpatchify(one, (int(gh), int(gw)), p, m, t)
    assert torch.equal(patchify(torch.from_numpy(image), p, m, t), torch.from_numpy(one))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_a_padded_batch_gives_each_sample_its_own_positions(arch, padding_side, tiny_qwen, small_shards):
    """M-RoPE positions come from mm_token_type_ids, image_grid_thw and the attention mask: a sample's logits in a
    padded batch equal its logits alone; without the token types Qwen2.5-VL would use 1-D positions (different
    logits), which is why the batch carries them."""
    proc = load_processor(str(tiny_qwen[arch]))
    pixels = PixelNorm.from_processor(proc)
    samples = [encode_row(r, proc) for r in rows(small_shards, 3)]
    model = load_model(str(tiny_qwen[arch]), dtype="float32").eval()
    pad = proc.tokenizer.pad_token_id
    with torch.no_grad():
        batched = model(**model_inputs(to_device(collate(samples, pad, padding_side), "cpu", pixels))).logits
        for i, s in enumerate(samples):
            alone = model(**model_inputs(to_device(collate([s], pad), "cpu", pixels))).logits[0]
            n = len(s["input_ids"])
            got = batched[i, -n:] if padding_side == "left" else batched[i, :n]
            assert (got - alone).abs().max() <= 1e-4
        if arch == "qwen2_5_vl":
            inputs = model_inputs(to_device(collate(samples[:1], pad), "cpu", pixels))
            with_types = model(**inputs).logits
            inputs.pop("mm_token_type_ids")
            model.model.rope_deltas = None  # the model caches positions between calls
            assert (model(**inputs).logits - with_types).abs().max() > 1e-6


@pytest.mark.parametrize("arch", ARCHS)
def test_pope_on_the_shared_prefix_cache_equals_one_forward_per_question(arch, tiny_qwen, small_shards):
    """POPE's questions about one image: the shared prefix (system turn, image tokens) runs once into a KV cache and
    each question continues from it with the prefix's M-RoPE offset; the first answer token's logits equal a full
    forward per question, and the batched full forward (right padded) equals each question asked alone."""
    from raysal.loop import pope_eval

    proc = load_processor(str(tiny_qwen[arch]))
    model = load_model(str(tiny_qwen[arch]), dtype="float32").eval()
    image = rows(small_shards, 1)[0]["image"]
    texts = ["Is there a red circle in the image?", "Is there a dog?", "Is there a blue triangle in the picture?"]
    calls: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        shared = pope_eval.answer_logits(model, proc, image, texts, device="cpu")
    finally:
        hook.remove()
    full = pope_eval.answer_logits(model, proc, image, texts, device="cpu", share_prefix=False)
    alone = torch.cat([pope_eval.answer_logits(model, proc, image, [t], device="cpu", share_prefix=False)
                       for t in texts])  # fmt: skip
    assert (shared - full).abs().max() < 1e-5 and (full - alone).abs().max() < 1e-5
    assert (full[0] - full[1]).abs().max() > 1e-4, "the questions differ: the comparison can fail"
    n_image = int(proc.image_processor.get_number_of_image_patches(*image.shape[:2], {})) // 4
    prefix, *questions = calls
    assert len(questions) == len(texts) and prefix > n_image > max(questions), calls  # the image runs once
