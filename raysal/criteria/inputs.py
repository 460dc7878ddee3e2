"""What the train step hands every criterion, and the helpers the attention criteria share.

A criterion (`raysal.criteria.protocol`) states what it needs in ``needs`` (a subset of NEEDS); the step supplies it:
``logits`` (B, L, V) and the batch always; ``image_attention`` (B, ℓ, h, T, I) from the capture (the union of every
criterion's layers × heads; `CriterionInputs.saliency` picks a criterion's own); ``attentions`` = full per-layer
(B, H, L, L) maps, which force eager attention (seed-style criteria only); ``model`` for criteria that run an extra
forward (``cal``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from raysal.attention.selection import is_pairs, resolve_heads, resolve_layers, resolve_pairs
from raysal.attention.targets import EPS, GroundingTargets, renormalise

NEEDS = frozenset({"logits", "image_attention", "attentions", "model"})


@dataclass
class CriterionInputs:
    batch: dict  # collated batch: input_ids, attention_mask, labels, token_segments, pixel_values, coverage, ...
    logits: torch.Tensor  # (B, L, V)
    targets: GroundingTargets | None
    n_layers: int  # language-model layers
    n_heads: int  # query heads per layer
    image_attention: torch.Tensor | None = None  # (B, ℓ_cap, h_cap, T, I)
    captured_layers: tuple[int, ...] = ()
    captured_heads: tuple[int, ...] = ()
    attentions: tuple[torch.Tensor, ...] | None = None  # per layer (B, H, L, L), eager only
    model: torch.nn.Module | None = None

    def saliency(self, layers: str | Sequence[int], heads: str | Sequence, per_layer: bool = True) -> torch.Tensor:
        """p_t: (B, ℓ, T, I) attention of each grounded token's query row over image tokens, mean over the chosen
        heads, renormalised over the valid image tokens, per chosen layer; ``per_layer=False``: their mean,
        (B, 1, T, I)."""
        if self.image_attention is None or self.targets is None:
            raise RuntimeError("criterion needs image_attention, but the step captured none")
        if is_pairs(heads):  # (layer, head) pairs: their mean, one map (``per_layer`` does not apply)
            pairs = resolve_pairs(heads, self.n_layers, self.n_heads)  # type: ignore[arg-type]
            li = [self.captured_layers.index(ly) for ly, _ in pairs]
            hi = [self.captured_heads.index(hd) for _, hd in pairs]
            att = self.image_attention[:, li, hi]  # (B, k, T, I)
            return renormalise(att.mean(1, keepdim=True), self.targets.key_valid)  # (B, 1, T, I)
        li = [self.captured_layers.index(i) for i in resolve_layers(layers, self.n_layers)]
        hi = [self.captured_heads.index(i) for i in resolve_heads(heads, self.n_heads)]
        att = self.image_attention  # (B, ℓ_cap, h_cap, T, I)
        # index only for a strict subset: an index copies the maps, and autograd keeps the copy until backward
        if li != list(range(att.shape[1])):
            att = att[:, li]
        if hi != list(range(att.shape[2])):
            att = att[:, :, hi]  # (B, ℓ, h, T, I)
        p = renormalise(att.mean(2), self.targets.key_valid)  # (B, ℓ, T, I)
        return p if per_layer else p.mean(1, keepdim=True)


def target_distribution(targets: GroundingTargets, smoothing: float = 0.0) -> torch.Tensor:
    """g_t = r_t / Σ r_t, optionally (1 − ε) g + ε / |I| over valid image tokens: (B, T, I)."""
    r = targets.region
    g = r / r.sum(-1, keepdim=True).clamp_min(EPS)
    if smoothing:
        valid = targets.key_valid[:, None, :].float()  # (B, 1, I)
        g = (1 - smoothing) * g + smoothing * valid / valid.sum(-1, keepdim=True).clamp_min(1)
    return g


def binary_region(targets: GroundingTargets, theta: float = 0.5) -> torch.Tensor:
    """m_t(i) = [r_t(i) ≥ θ]: (B, T, I) float."""
    return (targets.region >= theta).float()


def per_image_mean(per_token: torch.Tensor, token_valid: torch.Tensor) -> torch.Tensor:
    """(B, T) → scalar: mean over an image's grounded tokens, then over images that have any."""
    valid = token_valid.float()
    n = valid.sum(-1)  # (B,)
    per_image = (per_token * valid).sum(-1) / n.clamp_min(1)
    has = n > 0
    if not has.any():
        return per_token.sum() * 0.0  # keeps the graph; an image-free batch contributes nothing
    return per_image[has].mean()
