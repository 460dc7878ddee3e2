"""The capture equals eager attention probabilities (values and gradients), with padding, GQA and causality."""

import pytest
import torch

from raysal.attention.capture import AttentionCapture, enable_capture
from raysal.attention.targets import grounding_targets
from raysal.batch import PixelNorm, model_inputs
from raysal.model.build import load_model, load_processor, model_info
from raysal.preprocess.batches import batch_factory, load_encoded


def _batch(ckpt, shards, padding_side, n=3):
    proc = load_processor(str(ckpt))
    samples = load_encoded(shards, "val2017", proc, limit=n)
    pad, px = proc.tokenizer.pad_token_id, PixelNorm.from_processor(proc)
    return next(batch_factory(samples, n, pad, px, shuffle=False, padding_side=padding_side)(0))


def _eager_reference(att_layers, layers, heads, t):
    """(B, ℓ, h, T, I) gathered from full eager maps."""
    B = t.query_pos.shape[0]
    out = []
    for b in range(B):
        a = torch.stack([att_layers[i][b, list(heads)] for i in layers])  # (ℓ, h, L, L)
        out.append(a[:, :, t.query_pos[b]][:, :, :, t.key_pos[b]])
    return torch.stack(out)


@pytest.mark.parametrize("arch", ["llava", "llava_next", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("heads", [(0, 2, 3), "all"])
def test_capture_equals_eager_values_and_gradients(arch, padding_side, heads, request, small_shards):
    """Also Qwen2.5-VL and Qwen3-VL: M-RoPE positions, 4 query heads on 2 KV heads, Qwen3-VL's DeepStack layers
    (0 and 1 get vision features added after their attention)."""
    llava = {"llava": "tiny_llava", "llava_next": "tiny_next"}
    ckpt = request.getfixturevalue(llava[arch]) if arch in llava else request.getfixturevalue("tiny_qwen")[arch]
    batch = _batch(ckpt, small_shards, padding_side)
    model = load_model(str(ckpt), dtype="float32")
    assert batch["attention_mask"].eq(0).any(), "the batch must be padded"
    t = grounding_targets(batch, query_offset=-1)
    # a subset: on NeXT heads 0 and 2/3 read different KV heads (GQA, 2 groups); all heads: each key head is read
    # in place with its query heads stacked (no key copy)
    layers = (1, 3)
    heads = tuple(range(model_info(model).n_heads)) if heads == "all" else heads
    weights = torch.rand(len(layers), len(heads), *t.region.shape, generator=torch.Generator().manual_seed(0))
    weights = weights.permute(2, 0, 1, 3, 4) * t.token_valid[:, None, None, :, None] * t.key_valid[:, None, None, None]

    def grads_of(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if "language_model" in n and p.grad is not None}

    model.set_attn_implementation("eager")
    out_e = model(**model_inputs(batch), output_attentions=True)
    ref = _eager_reference(out_e.attentions, layers, heads, t)
    g_eager = grads_of((ref * weights).sum())

    enable_capture(model)
    with AttentionCapture(layers, heads, t.query_pos, t.key_pos) as cap:
        out_c = model(**model_inputs(batch))
        probs = cap.stacked()
        g_capture = grads_of((probs * weights).sum())

    valid = t.token_valid[:, None, None, :, None] & t.key_valid[:, None, None, None, :]
    assert probs.shape == ref.shape
    assert (probs - ref)[valid.expand_as(probs)].abs().max() <= 1e-5
    keep = batch["attention_mask"].bool()
    assert (out_c.logits - out_e.logits)[keep].abs().max() <= 1e-4  # the layer output is SDPA's
    assert g_eager.keys() == g_capture.keys() and g_eager
    for name in g_eager:
        assert torch.allclose(g_capture[name], g_eager[name], atol=1e-5, rtol=1e-4), name
    # gradients reach query and key projections of the captured layers
    assert any("layers.3.self_attn.k_proj" in n and g.abs().sum() > 0 for n, g in g_capture.items())


def test_capture_respects_causality(tiny_llava, small_shards):
    """A query row before the image sees none of it: all image probabilities are zero, no NaN."""
    batch = _batch(tiny_llava, small_shards, "left", n=2)
    model = load_model(str(tiny_llava), dtype="float32")
    enable_capture(model)
    t = grounding_targets(batch)
    early = torch.zeros_like(t.query_pos)  # position 0: BOS or left padding
    with torch.no_grad(), AttentionCapture([0], [0, 1], early, t.key_pos) as cap:
        model(**model_inputs(batch))
    probs = cap.stacked()
    assert torch.isfinite(probs).all() and probs.abs().max() == 0


def test_capture_names_missing_layers(tiny_llava, small_shards):
    batch = _batch(tiny_llava, small_shards, "right", n=1)
    model = load_model(str(tiny_llava), dtype="float32")  # capture not enabled: nothing is recorded
    t = grounding_targets(batch)
    with torch.no_grad(), AttentionCapture([1], [0], t.query_pos, t.key_pos) as cap:
        model(**model_inputs(batch))
    with pytest.raises(RuntimeError, match=r"layers \[1\] produced nothing"):
        cap.stacked()


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_reduced_capture_equals_the_mean_of_the_stored_maps(arch, tiny_llava, tiny_next, small_shards):
    """Evaluation's running mean over layers × heads is the mean of the per-layer maps (to float tolerance), and
    holds only (B, T, I)."""
    ckpt = tiny_llava if arch == "llava" else tiny_next
    batch = _batch(ckpt, small_shards, "right", n=2)
    model = load_model(str(ckpt), dtype="float32").eval()
    enable_capture(model)
    t = grounding_targets(batch)
    layers, heads = [0, 1, 3], [0, 1, 3]
    with torch.no_grad(), AttentionCapture(layers, heads, t.query_pos, t.key_pos) as full:
        model(**model_inputs(batch))
    with torch.no_grad(), AttentionCapture(layers, heads, t.query_pos, t.key_pos, reduce=True) as reduced:
        model(**model_inputs(batch))
    assert not reduced.request.out  # no per-layer maps kept
    expected = full.stacked().mean((1, 2))  # (B, T, I)
    assert reduced.mean().shape == expected.shape
    torch.testing.assert_close(reduced.mean(), expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match="no-grad"), AttentionCapture(layers, heads, t.query_pos, t.key_pos,
                                                                        reduce=True):  # fmt: skip
        pass
