"""``seed_kl``: the seed project's way — KL from full eager ``output_attentions`` maps of every chosen layer.

Kept so seed-style custom losses still work and as the baseline of the attention benchmark. It asks for
``attentions``, which forces eager attention and keeps every layer's (B, H, L, L) matrix: use ``kl`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from raysal.attention.selection import resolve_layers
from raysal.criteria.inputs import EPS, CriterionInputs, per_image_mean, renormalise, target_distribution


@dataclass
class SeedKLCriterion:
    weight: float = 0.5
    layers: str | list[int] = "all"
    query_offset: int = 0
    name: str = "seed_kl"
    needs: ClassVar[frozenset[str]] = frozenset({"attentions"})
    replaces_lm: ClassVar[bool] = False

    def __call__(self, x: CriterionInputs) -> torch.Tensor:
        assert x.attentions is not None and x.targets is not None
        t = x.targets
        B, T, I = t.region.shape
        maps = []
        for layer in resolve_layers(self.layers, x.n_layers):
            att = x.attentions[layer].float().mean(1)  # (B, L, L) mean over all heads
            rows = att.gather(1, t.query_pos[:, :, None].expand(B, T, att.shape[-1]))  # (B, T, L)
            maps.append(rows.gather(2, t.key_pos[:, None, :].expand(B, T, I)))  # (B, T, I)
        p = renormalise(torch.stack(maps, 1), t.key_valid).mean(1)  # (B, T, I): per-layer maps, then their mean
        g = target_distribution(t)
        kl = (g * (torch.log(g + EPS) - torch.log(p + EPS))).sum(-1)  # (B, T)
        return per_image_mean(kl, t.token_valid)
