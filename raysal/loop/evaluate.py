"""Validation: LM loss on caption tokens + grounding metrics on a fixed protocol.

The protocol (layers, heads, query offset) is the same for every trial of a search, independent of what a trial
trains on, so that trials are comparable (DESIGN §5).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch

from raysal.attention.capture import AttentionCapture, CapturePlan
from raysal.attention.targets import GroundingTargets, grounding_targets, renormalise
from raysal.batch import IGNORE, model_inputs
from raysal.criteria.lm import next_token_ce
from raysal.distributed import all_gather_objects, all_reduce_sum, rank
from raysal.metrics.grounding import METRICS, GroundingMeter
from raysal.metrics.records import ItemRecords, grounding_metrics


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
    sharded: bool = False,
    lockstep: bool = False,
    filler: dict | None = None,
    records: ItemRecords | None = None,
) -> dict[str, float]:
    """→ {"lm_loss", "amr", "ap", "nss", "pointing", "images", "tokens"} (un-namespaced; the caller prefixes).

    ``sharded``: this rank's ``batches`` are its disjoint part of the validation set; the sums behind every metric
    (LM-loss sum and token count, per-image metric sums and image counts) are added over the ranks, so every rank
    returns what one process evaluating the whole set returns. ``lockstep``: the model's forward runs collectives
    (FSDP): a rank whose part is used up runs its last batch again, uncounted, until every rank is done; a rank
    whose part is empty (Ray hands validation blocks to whichever rank asks first) runs ``filler`` (any device
    batch: the loop passes its last training batch), uncounted.
    """
    was_training = model.training
    model.eval()
    meter = GroundingMeter(theta=theta)
    lm: dict[int, list[float]] = {}  # image id → [Σ CE over its caption tokens, caption tokens]
    offset = rank() * 1_000_000_000 if sharded else 0  # ids for batches that carry none (tests): disjoint ranks
    seen = 0
    try:
        it, last = iter(batches), filler
        while True:
            batch = next(it, None)
            if lockstep:
                # one collective per batch: how many ranks still have one, and whether one has nothing to run
                active, starved = all_reduce_sum([batch is not None, batch is None and last is None], device)
                if starved and active:
                    raise EvaluationError(
                        "a worker's part of the validation set is empty while others are not: fewer validation "
                        "batches than workers (use fewer workers or more validation images)"
                    )
                if not active:
                    break
                if batch is None:
                    _forward(model, last, protocol, device, autocast)  # uncounted: keeps the collectives paired
                    continue
            elif batch is None:
                break
            last = batch
            batch, t, out, mean = _forward(model, batch, protocol, device, autocast)
            B = batch["input_ids"].shape[0]
            ids = batch["image_id"] if "image_id" in batch else torch.arange(B) + seen + offset  # (B,)
            ids = ids.to(mean.device, torch.long)
            seen += B
            ce = next_token_ce(out.logits, batch["labels"])  # (B, L − 1), 0 where ignored
            n = (batch["labels"][:, 1:] != IGNORE).sum(1)  # (B,)
            for i, s, k in zip(ids.tolist(), ce.double().sum(1).tolist(), n.tolist(), strict=True):
                lm.setdefault(i, [0.0, 0])
                lm[i][0] += s
                lm[i][1] += k
            p = renormalise(mean, t.key_valid)  # (B, T, I) mean over protocol layers × heads
            _, T, I = p.shape
            v = t.token_valid
            meter.update(p[v], t.region[v], t.key_valid[:, None, :].expand(B, T, I)[v], ids[:, None].expand(B, T)[v])
    finally:
        model.train(was_training)
    grounded = meter.per_image()  # image id → {"tokens", "amr", ...}
    rows = [{"image_id": i, "lm_sum": s, "lm_n": k, **grounded.get(i, _UNGROUNDED)} for i, (s, k) in lm.items()]
    if sharded:
        rows = [r for part in all_gather_objects(rows) for r in part]
    into = records if records is not None else ItemRecords()
    into.replace("images", rows)
    metrics = grounding_metrics(into.images)
    if metrics["images"] == 0 or not metrics["lm_loss"] == metrics["lm_loss"] or metrics["tokens"] == 0:
        # a 0.0 loss or a NaN objective would be reported, ranked and exported as if it were a result
        raise EvaluationError(
            f"evaluation saw {metrics['images']:.0f} image(s), {sum(into.images['lm_n']):.0f} caption token(s) and "
            f"{metrics['tokens']:.0f} grounded token(s): nothing to measure (an empty validation set, or every "
            "named region outside the model's view)"
        )
    return metrics


_UNGROUNDED = {"tokens": 0, **{name: float("nan") for name in METRICS}}


def _forward(
    model: torch.nn.Module,
    batch: dict,
    protocol: CapturePlan,
    device: torch.device | str,
    autocast: contextlib.AbstractContextManager | None,
) -> tuple[dict, GroundingTargets, Any, torch.Tensor]:
    """One evaluation forward → (device batch, targets, model output, (B, T, I) attention mean over the protocol)."""
    batch = {k: v.to(device) for k, v in batch.items()}
    t = grounding_targets(batch, protocol.query_offset)
    # reduced on the fly: only the mean over the protocol's layers × heads is used, so only (B, T, I) is
    # held — not ℓ × h maps (≈ 9.5 GB for LLaVA-NeXT-7B at batch 8 with all 32 × 32)
    capture = AttentionCapture(protocol.layers, protocol.heads, t.query_pos, t.key_pos, reduce=True)
    with capture as cap, autocast or contextlib.nullcontext():
        out = model(**model_inputs(batch), use_cache=False)  # no KV cache: 2·n·B·L·d_kv held for nothing
    return batch, t, out, cap.mean()
