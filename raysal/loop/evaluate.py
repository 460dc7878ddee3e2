"""Validation: LM loss on caption tokens + grounding metrics on a fixed protocol.

The protocol (layers, heads, query offset) is the same for every trial of a search, independent of what a trial
trains on, so that trials are comparable (DESIGN §5).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from raysal.attention.capture import AttentionCapture
from raysal.batch import IGNORE, model_inputs
from raysal.criteria.inputs import renormalise
from raysal.criteria.lm import next_token_ce
from raysal.criteria.targets import grounding_targets
from raysal.loop.step import CapturePlan
from raysal.metrics.grounding import GroundingMeter


class EvaluationError(RuntimeError):
    """An evaluation with nothing to measure."""


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[dict],  # device batches (`raysal.batch.to_device`)
    protocol: CapturePlan,
    *,
    device: torch.device | str = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
    theta: float = 0.5,
) -> dict[str, float]:
    """→ {"lm_loss", "amr", "ap", "nss", "pointing", "images", "tokens"} (un-namespaced; the caller prefixes)."""
    was_training = model.training
    model.eval()
    meter = GroundingMeter(theta=theta)
    ce_sum, ce_n, images = 0.0, 0, 0
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            t = grounding_targets(batch, protocol.query_offset)
            # reduced on the fly: only the mean over the protocol's layers × heads is used, so only (B, T, I) is
            # held — not ℓ × h maps (≈ 9.5 GB for LLaVA-NeXT-7B at batch 8 with all 32 × 32)
            capture = AttentionCapture(protocol.layers, protocol.heads, t.query_pos, t.key_pos, reduce=True)
            with capture as cap, autocast or contextlib.nullcontext():
                out = model(**model_inputs(batch), use_cache=False)  # no KV cache: 2·n·B·L·d_kv held for nothing
            ce = next_token_ce(out.logits, batch["labels"])
            ce_sum += float(ce.sum())
            ce_n += int((batch["labels"][:, 1:] != IGNORE).sum())
            p = renormalise(cap.mean(), t.key_valid)  # (B, T, I) mean over protocol layers × heads
            B, T, I = p.shape
            image_ids = (torch.arange(B, device=p.device) + images)[:, None].expand(B, T)
            v = t.token_valid
            meter.update(p[v], t.region[v], t.key_valid[:, None, :].expand(B, T, I)[v], image_ids[v])
            images += B
    finally:
        model.train(was_training)
    if images == 0 or ce_n == 0 or meter.tokens == 0:
        # a 0.0 loss or a NaN objective would be reported, ranked and exported as if it were a result
        raise EvaluationError(
            f"evaluation saw {images} image(s), {ce_n} caption token(s) and {meter.tokens} grounded token(s): "
            "nothing to measure (an empty validation set, or every named region outside the model's view)"
        )
    scores = meter.compute()
    return {"lm_loss": ce_sum / ce_n, **scores, "images": float(images), "tokens": float(meter.tokens)}
