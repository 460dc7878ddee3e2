"""``cal``: contrastive-attention-weighted LM loss; replaces the base cross-entropy.

One extra no-grad forward with the attention mask zeroed at the image positions (same positions, same
embeddings, no dropout: the contrast is a function of the weights, not of a dropout draw):
Δ_t = z_t[y_t] − z̃_t[y_t] (raw gold-token logits with and without the image). Tokens that depend on the image get
more weight: w = clamp(Δ, lo, hi), smoothed by a width-3 moving average (per sequence, or across the flattened
batch as the official code does), detached. L = Σ CE_t w_t / (Σ w_t + 1e-6) over caption tokens.
Expect ~+30 % step time (the extra forward).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from raysal.attention.capture import no_capture
from raysal.batch import IGNORE, model_inputs
from raysal.criteria.inputs import CriterionInputs
from raysal.criteria.lm import next_token_ce


def smooth3(w: torch.Tensor, valid: torch.Tensor, per_sequence: bool) -> torch.Tensor:
    """Width-3 moving average over valid positions: (B, N) → (B, N). Edges average over the neighbours present."""
    if not per_sequence:
        flat_w, flat_v = w[valid][None], torch.ones_like(w[valid][None], dtype=torch.bool)
        out = torch.zeros_like(w)
        out[valid] = smooth3(flat_w, flat_v, per_sequence=True)[0]
        return out
    # compact the valid positions of each row to the left so neighbours are neighbouring caption tokens
    out = torch.zeros_like(w)
    for b in range(w.shape[0]):
        v = w[b][valid[b]]  # (n,)
        if v.numel() == 0:
            continue
        padded = F.pad(v[None, None], (1, 1))  # (1, 1, n + 2)
        ones = F.pad(torch.ones_like(v)[None, None], (1, 1))
        kernel = torch.ones(1, 1, 3, dtype=v.dtype, device=v.device)
        out[b][valid[b]] = (F.conv1d(padded, kernel) / F.conv1d(ones, kernel))[0, 0]
    return out


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off for one forward; every module's own train/eval flag is restored afterwards (a frozen vision
    tower may be in eval mode while the rest trains)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def blind_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """(B, L, V) fp32 logits with the image positions masked out of attention, deterministically (no dropout)."""
    inputs = model_inputs(batch)
    image_id = getattr(model, "module", model).config.image_token_id  # DDP hides .config
    inputs["attention_mask"] = inputs["attention_mask"] * (batch["input_ids"] != image_id)
    with torch.no_grad(), eval_mode(model), no_capture():
        return model(**inputs, use_cache=False).logits.float()


@dataclass
class CALCriterion:
    weight: float = 1.0
    clamp_lo: float = 1.0
    clamp_hi: float = 5.0
    per_sequence: bool = True  # False = smooth across the flattened batch, like the official implementation
    name: str = "cal"
    needs: ClassVar[frozenset[str]] = frozenset({"logits", "model"})
    replaces_lm: ClassVar[bool] = True

    def __call__(self, x: CriterionInputs) -> torch.Tensor:
        assert x.model is not None
        batch = x.batch
        labels = batch["labels"][:, 1:]  # (B, L − 1) gold tokens predicted from positions :-1
        valid = labels != IGNORE
        blind = blind_logits(x.model, batch)[:, :-1]  # (B, L − 1, V)
        with torch.no_grad():
            gold = labels.clamp_min(0)[..., None]
            delta = x.logits[:, :-1].detach().float().gather(-1, gold)[..., 0] - blind.gather(-1, gold)[..., 0]
            w = smooth3(delta.clamp(self.clamp_lo, self.clamp_hi), valid, self.per_sequence) * valid
        ce = next_token_ce(x.logits, batch["labels"])  # (B, L − 1)
        return (ce * w).sum() / (w.sum() + 1e-6)
