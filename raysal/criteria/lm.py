"""``lm``: next-token cross-entropy on the caption tokens (the control every search compares against)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from raysal.batch import IGNORE
from raysal.criteria.inputs import CriterionInputs


def next_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position CE of predicting labels[:, t + 1] from logits[:, t]: (B, L − 1), 0 where ignored."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    ce = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels.clamp_min(0), reduction="none")  # (B, L − 1)
    return ce * (shift_labels != IGNORE)


@dataclass
class LMCriterion:
    weight: float = 1.0
    name: str = "lm"
    needs: ClassVar[frozenset[str]] = frozenset({"logits"})
    replaces_lm: ClassVar[bool] = False

    def __call__(self, x: CriterionInputs) -> torch.Tensor:
        labels = x.batch["labels"]
        n = (labels[:, 1:] != IGNORE).sum().clamp_min(1)
        return next_token_ce(x.logits, labels).sum() / n  # mean over caption tokens in the batch
