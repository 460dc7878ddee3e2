"""``mass``: −log(ε + Σ_i m_t(i) p_t(i)), the attention mass a token puts inside its region."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from raysal.criteria.inputs import CriterionInputs, binary_region, per_image_mean


@dataclass
class MassCriterion:
    weight: float = 1.0
    layers: str | list[int] = "late"
    heads: str | list = "all"  # all | [h, ...] | [[layer, head], ...] | localization (resolved to pairs)
    top_k: int = 8  # heads: localization takes the top_k heads of python -m raysal.heads' table
    query_offset: int = 0
    per_layer: bool = False
    theta: float = 0.5
    eps: float = 1e-6
    name: str = "mass"
    needs: ClassVar[frozenset[str]] = frozenset({"image_attention"})
    replaces_lm: ClassVar[bool] = False

    def __call__(self, x: CriterionInputs) -> torch.Tensor:
        assert x.targets is not None
        p = x.saliency(self.layers, self.heads, self.per_layer)  # (B, ℓ or 1, T, I)
        m = binary_region(x.targets, self.theta)[:, None]  # (B, 1, T, I)
        loss = -torch.log(self.eps + (m * p).sum(-1))  # (B, ℓ, T)
        # a token whose region has no cell ≥ θ has no mass target: leave it out
        valid = x.targets.token_valid & (m[:, 0].sum(-1) > 0)
        return per_image_mean(loss.mean(1), valid)
