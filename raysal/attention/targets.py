"""What the attention criteria and the grounding metrics compare against, derived once per batch.

For each grounded caption token t (a label token that names ≥ 1 segment): its query row (t, or t − 1 = the position
that predicts it), the image-token positions of its sequence, and its region coverage
``r_t(i) = min(1, Σ_{s ∈ A_t} C[i, s])`` over image tokens i (DESIGN §4). Tokens whose region is invisible
(cropped away: Σ_i r_t(i) = 0) are not grounded; they are counted in ``n_invisible``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-8  # floor of a normalising sum


@dataclass
class GroundingTargets:
    token_pos: torch.Tensor  # (B, T) long: the grounded token's own position
    query_pos: torch.Tensor  # (B, T) long: the row whose attention is judged (token_pos + offset)
    token_valid: torch.Tensor  # (B, T) bool: False for padding slots
    key_pos: torch.Tensor  # (B, I) long: positions of the image tokens, in coverage-row order
    key_valid: torch.Tensor  # (B, I) bool: False for padding (NeXT images with fewer tokens)
    region: torch.Tensor  # (B, T, I) float in [0, 1]
    n_invisible: int  # grounded tokens dropped because their region is outside the model's view


def grounding_targets(batch: dict, query_offset: int = 0) -> GroundingTargets:
    """From the positions the batch carries (`raysal.batch`: ``image_pos``, ``grounded_pos``, found once when the
    sample was encoded), so no step searches ``input_ids`` row by row again."""
    if query_offset not in (0, -1):
        raise ValueError(
            f"query_offset must be 0 (the token's own row) or -1 (the row that predicts it), got {query_offset}"
        )
    segs = batch["token_segments"]  # (B, L, K)
    key_valid = batch["image_pos"] >= 0  # (B, I)
    key_pos = batch["image_pos"].clamp(min=0).long()
    token_valid = batch["grounded_pos"] >= 0  # (B, T)
    token_pos = batch["grounded_pos"].clamp(min=0).long()

    # region: which of the image's segments each token names, times coverage
    tok_segs = segs.gather(1, token_pos[:, :, None].expand(-1, -1, segs.shape[-1]))  # (B, T, K)
    seg_ids = batch["segment_ids"]  # (B, S), −1 pad
    names = ((tok_segs[..., None] == seg_ids[:, None, None, :]) & (tok_segs[..., None] >= 0)).any(2)  # (B, T, S)
    cov = batch["coverage"]  # (B, I, S), rows in image-token order
    region = torch.bmm(names.float(), cov.float().transpose(1, 2)).clamp(max=1.0)  # (B, T, I)
    region = region * token_valid[:, :, None] * key_valid[:, None, :]
    visible = region.sum(-1) > 0
    invisible = token_valid & ~visible
    token_valid = token_valid & visible
    return GroundingTargets(
        token_pos=token_pos,
        query_pos=(token_pos + query_offset).clamp(min=0),
        token_valid=token_valid,
        key_pos=key_pos,
        key_valid=key_valid,
        region=region,
        n_invisible=int(invisible.sum()),
    )


def renormalise(att: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """(B, ..., T, I) → same, zero at padded image tokens and summing to 1 over the valid ones."""
    mask = key_valid.view(key_valid.shape[0], *([1] * (att.dim() - 2)), key_valid.shape[1])
    att = att * mask
    return att / att.sum(-1, keepdim=True).clamp_min(EPS)
