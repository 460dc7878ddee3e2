"""``mse``: Σ_i (p_t(i) − g_t(i))² (seed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from raysal.criteria.inputs import CriterionInputs, per_image_mean, target_distribution


@dataclass
class MSECriterion:
    weight: float = 1.0
    layers: str | list[int] = "late"
    heads: str | list = "all"  # all | [h, ...] | [[layer, head], ...] | localization (resolved to pairs)
    top_k: int = 8  # heads: localization takes the top_k heads of python -m raysal.heads' table
    query_offset: int = 0
    per_layer: bool = False
    smoothing: float = 0.0
    name: str = "mse"
    needs: ClassVar[frozenset[str]] = frozenset({"image_attention"})
    replaces_lm: ClassVar[bool] = False

    def __call__(self, x: CriterionInputs) -> torch.Tensor:
        assert x.targets is not None
        p = x.saliency(self.layers, self.heads, self.per_layer)  # (B, ℓ or 1, T, I)
        g = target_distribution(x.targets, self.smoothing)[:, None]  # (B, 1, T, I)
        sq = ((p - g) ** 2).sum(-1)  # (B, ℓ, T)
        return per_image_mean(sq.mean(1), x.targets.token_valid)
