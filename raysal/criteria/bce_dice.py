"""``bce_dice``: per-token segmentation loss on the saliency map (LISA / LaSagnA weights 2.0 / 0.5).

Logits z = log p_t + log|I| (0 where the map is uniform);
loss = w_bce · BCEWithLogits(z, m_t) + w_dice · (1 − Dice(σ(z), m_t)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from raysal.criteria.inputs import EPS, CriterionInputs, binary_region, per_image_mean


@dataclass
class BCEDiceCriterion:
    weight: float = 1.0
    layers: str | list[int] = "late"
    heads: str | list = "all"  # all | [h, ...] | [[layer, head], ...] | localization (resolved to pairs)
    top_k: int = 8  # heads: localization takes the top_k heads of python -m raysal.heads' table
    query_offset: int = 0
    per_layer: bool = False
    theta: float = 0.5
    w_bce: float = 2.0
    w_dice: float = 0.5
    name: str = "bce_dice"
    needs: ClassVar[frozenset[str]] = frozenset({"image_attention"})
    replaces_lm: ClassVar[bool] = False

    def __call__(self, x: CriterionInputs) -> torch.Tensor:
        assert x.targets is not None
        p = x.saliency(self.layers, self.heads, self.per_layer)  # (B, ℓ or 1, T, I)
        valid_keys = x.targets.key_valid[:, None, None, :].float()  # (B, 1, 1, I)
        n_keys = valid_keys.sum(-1, keepdim=True)  # (B, 1, 1, 1)
        z = torch.log(p + EPS) + torch.log(n_keys)  # (B, ℓ, T, I)
        m = binary_region(x.targets, self.theta)[:, None].expand_as(z)  # (B, ℓ, T, I)
        bce = F.binary_cross_entropy_with_logits(z, m, reduction="none")
        bce = (bce * valid_keys).sum(-1) / n_keys[..., 0]  # (B, ℓ, T) mean over valid image tokens
        s = torch.sigmoid(z) * valid_keys
        dice = (2 * (s * m).sum(-1) + EPS) / (s.sum(-1) + m.sum(-1) + EPS)  # (B, ℓ, T)
        loss = self.w_bce * bce + self.w_dice * (1 - dice)
        return per_image_mean(loss.mean(1), x.targets.token_valid)
