"""Grounding metrics for saliency-aligned training (DESIGN.md §5): AMR, AP, NSS and pointing.

Per grounded caption token t, over the image tokens i of that token's image:

* ``p_t (I,)`` saliency: attention from the token's query row to the image tokens, already averaged over the
  *evaluation* layers/heads by the caller. Renormalised here over the valid image tokens (``p / p.sum()``), so any
  positive scale of the input gives the same scores.
* ``r_t (I,)`` region coverage in [0, 1]; ``m_t(i) = [r_t(i) >= theta]`` (theta = 0.5).
* AMR = ``(Σ p r / Σ p) / (Σ r / |I|)``: 1 is chance. NaN if ``Σ r = 0``.
* AP: average precision of ranking the image tokens by ``p`` against ``m``. NaN if ``m`` has no positive.
* NSS: mean over ``m = 1`` of the z-score ``(p - mean(p)) / std(p)`` (population std over the valid tokens).
  NaN if ``p`` is constant over the valid tokens (std = 0) or ``m`` has no positive.
* Pointing: 1.0 if ``argmax p`` lies in ``m`` else 0.0. NaN if ``m`` has no positive.

Ties (exact equality of saliency values) are handled the same way for AP and pointing, independent of token order:
tied tokens form one threshold, as in scikit-learn's ``average_precision_score``. Every positive of a tie group gets
the precision measured at the *end* of its group, i.e. ``AP = (1 / P) Σ_groups tp(group) · precision(≤ group)``;
pointing is the fraction of positives among the tokens tied at the maximum (0 or 1 when the maximum is unique). This
is the expectation over random tie-breaking for pointing, and gives a uniform map AP = prevalence (chance), rather
than a value that depends on where the region happens to sit in raster order.

A token whose saliency has no mass over its valid image tokens (or that has no valid image token) is NaN in every
metric. Aggregation: nanmean over an image's grounded tokens, then mean over images; images whose tokens are all NaN
for a metric are left out of that metric; with none left the metric is NaN.

Everything is computed in float64 on the device of the inputs, vectorised over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METRICS = ("amr", "ap", "nss", "pointing")


@dataclass(frozen=True)
class GroundingScores:
    """Per-token values (float64), NaN where undefined."""

    amr: torch.Tensor  # (N,)
    ap: torch.Tensor  # (N,)
    nss: torch.Tensor  # (N,)
    pointing: torch.Tensor  # (N,)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in METRICS}


def _check_2d(saliency: torch.Tensor, region: torch.Tensor, image_valid: torch.Tensor | None) -> None:
    if saliency.ndim != 2 or saliency.shape != region.shape:
        raise ValueError(f"saliency and region must both be (N, I); got {tuple(saliency.shape)}, {tuple(region.shape)}")
    if image_valid is not None:
        if image_valid.shape != saliency.shape:
            raise ValueError(f"image_valid must be (N, I) = {tuple(saliency.shape)}; got {tuple(image_valid.shape)}")
        if image_valid.dtype != torch.bool:
            raise ValueError(f"image_valid must be bool; got {image_valid.dtype}")


def _average_precision(score: torch.Tensor, positive: torch.Tensor, n_pos: torch.Tensor) -> torch.Tensor:
    """Tie-grouped AP per row. score (N, I) float64 with invalid tokens at -inf; positive (N, I) bool; n_pos (N,)."""
    n_tok = score.shape[1]
    # Order within a tie group does not matter (the group is scored as a whole); stable only for reproducibility.
    s_sorted, order = torch.sort(score, dim=1, descending=True, stable=True)  # (N, I)
    y_sorted = torch.gather(positive, 1, order).to(torch.float64)  # (N, I)
    tp = torch.cumsum(y_sorted, dim=1)  # (N, I) true positives ranked at or above each position
    rank = torch.arange(1, n_tok + 1, device=score.device, dtype=torch.float64)  # (I,) 1-based ranks
    # Last position of each tie group: the next sorted value differs (or the row ends).
    is_last = torch.ones_like(s_sorted, dtype=torch.bool)  # (N, I)
    is_last[:, :-1] = s_sorted[:, :-1] != s_sorted[:, 1:]
    pos_idx = torch.arange(n_tok, device=score.device).expand_as(s_sorted)  # (N, I)
    # End of the group containing each position = first group end at or after it: reverse cumulative minimum.
    end_cand = torch.where(is_last, pos_idx, torch.full_like(pos_idx, n_tok - 1))  # (N, I)
    group_end = torch.flip(torch.cummin(torch.flip(end_cand, [1]), dim=1).values, [1])  # (N, I)
    precision_at_end = torch.gather(tp, 1, group_end) / rank[group_end]  # (N, I)
    return (y_sorted * precision_at_end).sum(dim=1) / n_pos  # (N,); n_pos = 0 rows are masked by the caller


@torch.no_grad()
def token_scores(
    saliency: torch.Tensor,
    region: torch.Tensor,
    image_valid: torch.Tensor | None = None,
    theta: float = 0.5,
) -> GroundingScores:
    """Per-token AMR / AP / NSS / pointing.

    saliency, region: (N, I) float, one row per grounded token (N may be 0). image_valid: (N, I) bool, False for
    padded image tokens (and newline tokens if wanted); None means all valid. Invalid entries are ignored entirely:
    they count neither in |I| nor in the ranking nor in the z-score statistics.
    """
    _check_2d(saliency, region, image_valid)
    n, n_tok = saliency.shape
    device = saliency.device
    if n == 0 or n_tok == 0:
        nan = torch.full((n,), float("nan"), dtype=torch.float64, device=device)
        return GroundingScores(amr=nan, ap=nan.clone(), nss=nan.clone(), pointing=nan.clone())

    valid = torch.ones_like(saliency, dtype=torch.bool) if image_valid is None else image_valid.to(device)  # (N, I)
    sal = saliency.detach().to(torch.float64)  # (N, I)
    reg = region.detach().to(device=device, dtype=torch.float64)  # (N, I)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=device)

    n_valid = valid.sum(dim=1).to(torch.float64)  # (N,) |I| per token's image
    p_raw = torch.where(valid, sal, zero)  # (N, I)
    p_mass = p_raw.sum(dim=1)  # (N,)
    has_mass = (p_mass > 0) & (n_valid > 0)  # (N,) rows where p_t is a distribution at all
    p = p_raw / torch.where(has_mass, p_mass, torch.ones_like(p_mass)).unsqueeze(1)  # (N, I) sums to 1 on valid
    r = torch.where(valid, reg, zero)  # (N, I)
    m = valid & (r >= theta)  # (N, I)
    n_pos = m.sum(dim=1).to(torch.float64)  # (N,)
    has_pos = has_mass & (n_pos > 0)  # (N,)

    # AMR: p sums to 1, so Σ p r / Σ p = Σ p r; chance level Σ r / |I| is the mean coverage.
    r_sum = r.sum(dim=1)  # (N,)
    amr_ok = has_mass & (r_sum > 0)
    amr = (p * r).sum(dim=1) / torch.where(amr_ok, r_sum / n_valid.clamp_min(1), torch.ones_like(r_sum))
    amr = torch.where(amr_ok, amr, nan)

    # AP on the raw (masked) saliency: ranking is scale-free, and raw values avoid renormalisation rounding merging
    # neighbours. Invalid tokens go to -inf so they sort after every valid one and never share its tie group.
    score = torch.where(valid, sal, torch.tensor(float("-inf"), dtype=torch.float64, device=device))  # (N, I)
    ap = _average_precision(score, m, torch.where(has_pos, n_pos, torch.ones_like(n_pos)))
    ap = torch.where(has_pos, ap, nan)

    # NSS: a constant map over the valid tokens has std = 0; test that exactly via max == min rather than trusting a
    # floating-point std of (nearly) equal values.
    p_max = score.max(dim=1).values  # (N,)
    p_min = torch.where(valid, sal, torch.tensor(float("inf"), dtype=torch.float64, device=device)).min(dim=1).values
    non_constant = p_max > p_min  # (N,)
    mean = p.sum(dim=1, keepdim=True) / n_valid.clamp_min(1).unsqueeze(1)  # (N, 1)
    centred = torch.where(valid, p - mean, zero)  # (N, I)
    std = torch.sqrt((centred**2).sum(dim=1) / n_valid.clamp_min(1))  # (N,) population std
    nss_ok = has_pos & non_constant
    z = centred / torch.where(nss_ok, std, torch.ones_like(std)).unsqueeze(1)  # (N, I)
    nss = torch.where(m, z, zero).sum(dim=1) / torch.where(has_pos, n_pos, torch.ones_like(n_pos))
    nss = torch.where(nss_ok, nss, nan)

    # Pointing: fraction of positives among the tokens tied at the maximum (same tie rule as AP).
    at_max = valid & (score == p_max.unsqueeze(1))  # (N, I)
    pointing = (at_max & m).sum(dim=1).to(torch.float64) / at_max.sum(dim=1).clamp_min(1).to(torch.float64)
    pointing = torch.where(has_pos, pointing, nan)

    return GroundingScores(amr=amr, ap=ap, nss=nss, pointing=pointing)


def _per_image_sums(values: torch.Tensor, image_index: torch.Tensor) -> tuple[float, float]:
    """(Σ over images of the image's nanmean, images with at least one finite value) for values (N,): the two
    numbers a metric's aggregate is made of, and what ranks that scored disjoint images add up."""
    if values.numel() == 0:
        return 0.0, 0.0
    _, inverse = torch.unique(image_index, return_inverse=True)  # (N,) compact image index in [0, n_images)
    n_images = int(inverse.max().item()) + 1
    ok = ~torch.isnan(values)  # (N,)
    sums = torch.zeros(n_images, dtype=torch.float64, device=values.device)
    counts = torch.zeros(n_images, dtype=torch.float64, device=values.device)
    sums.index_add_(0, inverse, torch.where(ok, values, torch.zeros_like(values)))
    counts.index_add_(0, inverse, ok.to(torch.float64))
    has = counts > 0  # (n_images,) images with a defined value for this metric
    return float((sums[has] / counts[has]).sum().item()), float(has.sum().item())


def _per_image_mean(values: torch.Tensor, image_index: torch.Tensor) -> float:
    """nanmean of values (N,) within each image, then mean over images with at least one finite value."""
    total, images = _per_image_sums(values, image_index)
    return total / images if images else float("nan")


def scores_from_sums(sums: dict[str, tuple[float, float]]) -> dict[str, float]:
    """{"amr", ...} from `GroundingMeter.sums` (added over ranks): the mean over images, NaN where none counts."""
    return {name: (sums[name][0] / sums[name][1] if sums[name][1] else float("nan")) for name in METRICS}


def aggregate(scores: GroundingScores, image_index: torch.Tensor) -> dict[str, float]:
    """{"amr", "ap", "nss", "pointing"}: nanmean over each image's tokens, then mean over images.

    image_index: (N,) integer id of the image each token belongs to (any ids; only equality matters).
    """
    n = scores.amr.shape[0]
    if image_index.shape != (n,):
        raise ValueError(f"image_index must be (N,) = ({n},); got {tuple(image_index.shape)}")
    if n == 0:
        return {name: float("nan") for name in METRICS}
    image_index = image_index.to(scores.amr.device)
    return {name: _per_image_mean(values.to(torch.float64), image_index) for name, values in scores.as_dict().items()}


class GroundingMeter:
    """Accumulates per-token scores over evaluation batches; `compute()` aggregates them per image.

    Tokens of the same image id in different batches are pooled into that image. Scores stay on their device
    (4 floats per token) and are only synchronised in `compute()`.
    """

    def __init__(self, theta: float = 0.5) -> None:
        self.theta = theta
        self.reset()

    def reset(self) -> None:
        self._scores: list[GroundingScores] = []
        self._image_ids: list[torch.Tensor] = []

    def update(
        self,
        saliency: torch.Tensor,
        region: torch.Tensor,
        image_valid: torch.Tensor | None,
        image_ids: torch.Tensor,
    ) -> GroundingScores:
        """Score one batch of grounded tokens (shapes as `token_scores`; image_ids (N,) long). Returns its scores."""
        scores = token_scores(saliency, region, image_valid, theta=self.theta)
        if image_ids.shape != (saliency.shape[0],):
            raise ValueError(f"image_ids must be (N,) = ({saliency.shape[0]},); got {tuple(image_ids.shape)}")
        self._scores.append(scores)
        self._image_ids.append(image_ids.detach().to(device=scores.amr.device, dtype=torch.long))
        return scores

    @property
    def tokens(self) -> int:
        """Grounded tokens scored so far."""
        return sum(int(ids.numel()) for ids in self._image_ids)

    def compute(self) -> dict[str, float]:
        if not self._scores:
            return {name: float("nan") for name in METRICS}
        merged = GroundingScores(**{name: torch.cat([getattr(s, name) for s in self._scores]) for name in METRICS})
        image_ids = torch.cat(self._image_ids)  # (N_total,)
        return aggregate(merged, image_ids)

    def sums(self) -> dict[str, tuple[float, float]]:
        """Per metric (Σ per-image means, images counted): added over ranks that scored *disjoint* images (sharded
        evaluation), `scores_from_sums` gives exactly what one `compute()` over all their images gives."""
        if not self._scores:
            return {name: (0.0, 0.0) for name in METRICS}
        image_ids = torch.cat(self._image_ids)  # (N_total,)
        return {
            name: _per_image_sums(torch.cat([getattr(s, name) for s in self._scores]).to(torch.float64), image_ids)
            for name in METRICS
        }

    def per_image(self) -> dict[int, dict[str, float]]:
        """image id → {"tokens": its grounded tokens, "amr", "ap", "nss", "pointing": the nanmean over them, NaN
        where none defines it}: the per-image values every metric's mean over images is made of."""
        if not self._scores:
            return {}
        image_ids = torch.cat(self._image_ids)  # (N_total,)
        uniq, inverse = torch.unique(image_ids, return_inverse=True)  # (n_images,), (N_total,)
        counts = torch.bincount(inverse, minlength=len(uniq))  # (n_images,)
        out: dict[int, dict[str, float]] = {int(i): {"tokens": int(c)} for i, c in zip(uniq, counts, strict=True)}
        for name in METRICS:
            values = torch.cat([getattr(s, name) for s in self._scores]).to(torch.float64)  # (N_total,)
            ok = ~torch.isnan(values)
            sums = torch.zeros(len(uniq), dtype=torch.float64, device=values.device)
            n = torch.zeros(len(uniq), dtype=torch.float64, device=values.device)
            sums.index_add_(0, inverse, torch.where(ok, values, torch.zeros_like(values)))
            n.index_add_(0, inverse, ok.to(torch.float64))
            means = torch.where(n > 0, sums / n.clamp_min(1), torch.full_like(sums, float("nan")))  # (n_images,)
            for i, m in zip(uniq.tolist(), means.tolist(), strict=True):
                out[int(i)][name] = m
        return out
