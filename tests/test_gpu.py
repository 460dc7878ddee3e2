"""On a CUDA GPU (skipped elsewhere; `scripts/gpu_check.sh` runs them): the capture equals eager attention in bf16
under each of SDPA's kernels, and the 7B shapes fit. No Ray: a lent GPU machine has none."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from raysal.attention.capture import AttentionCapture, enable_capture, image_attention_from_maps
from raysal.attention.targets import grounding_targets
from raysal.batch import PixelNorm, model_inputs
from raysal.model.build import load_model, load_processor, model_info
from raysal.preprocess.batches import batch_factory, load_encoded

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _batch(ckpt: Path, shards: Path, n: int) -> dict:
    proc = load_processor(str(ckpt))
    samples = load_encoded(shards, "val2017", proc, limit=n)
    pad, px = proc.tokenizer.pad_token_id, PixelNorm.from_processor(proc)
    return next(batch_factory(samples, n, pad, px, shuffle=False, device="cuda")(0))


@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"])
@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_capture_equals_eager_in_bf16_under_each_sdpa_kernel(arch, backend, tiny_llava, tiny_next, small_shards):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ckpt = tiny_llava if arch == "llava" else tiny_next
    # flash attention takes no explicit mask: one sample (no padding) gives SDPA a pure causal call
    batch = _batch(ckpt, small_shards, 1 if backend == "FLASH_ATTENTION" else 3)
    model = load_model(str(ckpt), dtype="bfloat16", device="cuda").eval()
    info = model_info(model)
    t = grounding_targets(batch)
    layers, heads = list(range(info.n_layers)), list(range(info.n_heads))
    with torch.no_grad():
        model.set_attn_implementation({"text_config": "eager"})
        ref_out = model(**model_inputs(batch), output_attentions=True)
        ref = image_attention_from_maps(ref_out.attentions, layers, heads, t.query_pos, t.key_pos)
        enable_capture(model)
        with sdpa_kernel(getattr(SDPBackend, backend)), AttentionCapture(layers, heads, t.query_pos, t.key_pos) as c:
            out = model(**model_inputs(batch))
        probs = c.stacked()
    valid = t.token_valid[:, None, None, :, None] & t.key_valid[:, None, None, None, :]
    # bf16 q/k: the eager softmax rounds its inputs to bf16, the capture computes in fp32 from the same q and k
    assert (probs - ref.float())[valid.expand_as(probs)].abs().max() <= 2e-2
    keep = batch["attention_mask"].bool()
    assert (out.logits.float() - ref_out.logits.float())[keep].abs().max() <= 0.25


@pytest.mark.parametrize("method", ["capture_kl_2layers", "evaluation"])
def test_llava_next_7b_at_batch_2_fits(method):
    """LLaVA-NeXT-7B shapes (random init, 640×480 → 2340 image tokens, batch 2, bf16, gradient checkpointing): a
    training step with the capture and an all-layer evaluation both fit on the lent GPU."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    from bench_attention import run_one

    r = run_one("llava-next-7b", method, reps=1, warmup=1, device_name="cuda", checkpointing=True)
    assert r["status"] == "ok", r
