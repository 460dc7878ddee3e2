"""Localisation readout: an attention map → one box, scored against the phrase's region (REC Acc@0.5, mIoU).

The readout follows the training-free grounding of the "Localization Heads" paper (Kang et al., CVPR 2025, "Your
Large Vision-Language Model Only Needs A Few Attention Heads For Visual Grounding"): smooth the attention map with a
Gaussian, binarise it at its mean, and box what is left. Here it runs on the cell grid of
`raysal.probes.backproject` (square cells of ``side`` original pixels, NaN where no image token sees a cell), so the
box lands on the user's pixels whatever the processor cropped or padded.

The rule, exactly (``A`` is the (gh, gw) cell map, ``V = isfinite(A)`` its seen cells):

1. Smoothing: normalised convolution with a Gaussian of σ = 1 cell, truncated at 4σ (a 9 × 9 separable kernel
   ``g(dy, dx) ∝ exp(-(dy² + dx²) / 2)``), ``S = (g * (A·V)) / (g * V)`` on the seen cells, zero outside the grid.
   Unseen cells (and the outside of the grid) neither pull the values down nor count in the weights; they stay
   unseen (never selected, not in the mean).
2. Threshold: ``B = V ∧ (S > mean(S over V))``, strictly above the mean.
3. Box: the bounding box of every cell of ``B`` (all of them, not one connected part: Kang et al.'s code boxes
   the whole binarised map), rows ``r0..r1`` and columns ``c0..c1`` inclusive, in original pixels (half-open
   ``(x0, y0, x1, y1)``, cell ``c`` spans ``[c·side, min((c + 1)·side, dim))``):
   ``(c0·side, r0·side, min((c1 + 1)·side, w), min((r1 + 1)·side, h))``.
4. No cell strictly above the mean (a uniform map, an all-NaN map) → no box: IoU 0, a miss.

Score per phrase: IoU of that box with the tight box of the phrase's region mask (`mask_box`); Acc@0.5 is the
fraction of phrases with IoU ≥ 0.5, mIoU the mean IoU (misses count 0). `LocalizationSums` accumulates
``[hits, Σ IoU, n]`` in float64 for an all-reduce SUM across ranks.

Pure numpy (plus torch for the all-reduce tensor); no scipy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SIGMA = 1.0  # cells
TRUNCATE = 4.0  # kernel radius in σ (scipy.ndimage's default)
IOU_HIT = 0.5

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) in pixels, half-open


def cell_side(h: int, w: int, grid: int) -> int:
    """Side in pixels of the square cells of `raysal.probes.backproject.cell_map` (``grid`` cells on the longer
    side)."""
    return max(1, -(-max(h, w) // grid))


def cell_values(heat: np.ndarray, side: int) -> np.ndarray:
    """(gh, gw) cell map from a backprojected (H, W) heat map (`PhraseMap.heat`), which is constant over each
    cell: the value at each cell's top-left pixel."""
    return np.asarray(heat, dtype=np.float64)[::side, ::side]


def _kernel_matrix(n: int, sigma: float, truncate: float) -> np.ndarray:
    """(n, n) banded matrix K[i, j] = g(i − j): 1-D Gaussian convolution with zero padding, as a product."""
    radius = int(truncate * sigma + 0.5)
    d = np.arange(n)[:, None] - np.arange(n)[None, :]  # (n, n)
    k = np.exp(-0.5 * (d / sigma) ** 2)
    k[np.abs(d) > radius] = 0.0
    return k


def smooth_cells(cells: np.ndarray, sigma: float = SIGMA, truncate: float = TRUNCATE) -> np.ndarray:
    """(gh, gw) normalised Gaussian convolution of a cell map; NaN cells contribute neither value nor weight and
    stay NaN. The kernel's normalisation cancels in the ratio."""
    a = np.asarray(cells, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"cells must be (gh, gw); got shape {a.shape}")
    valid = np.isfinite(a)  # (gh, gw)
    kr = _kernel_matrix(a.shape[0], sigma, truncate)  # (gh, gh)
    kc = _kernel_matrix(a.shape[1], sigma, truncate)  # (gw, gw)
    num = kr @ np.where(valid, a, 0.0) @ kc.T  # (gh, gw)
    den = kr @ valid.astype(np.float64) @ kc.T  # (gh, gw), > 0 on every valid cell (its own weight)
    return np.divide(num, den, out=np.full(a.shape, np.nan), where=valid)


def readout_mask(cells: np.ndarray) -> np.ndarray | None:
    """(gh, gw) bool: the cells rules 1–2 select (module docstring), or None when no cell is strictly above the
    mean."""
    a = np.asarray(cells, dtype=np.float64)
    valid = np.isfinite(a)  # (gh, gw)
    if not valid.any():
        return None
    # Shift by a seen value first: smoothing is affine-equivariant (the weights are normalised), so the threshold is
    # unchanged, and a uniform map becomes exactly 0, with no cell above its mean by rounding.
    s = smooth_cells(a - a[valid].min())  # (gh, gw)
    above = valid & (s > s[valid].mean())  # (gh, gw)
    return above if above.any() else None


def readout_box(cells: np.ndarray, h: int, w: int, side: int) -> Box | None:
    """The readout box (rules 1–4, module docstring) of a (gh, gw) cell map of an (h, w) image with cells of
    ``side`` pixels, in original pixels, half-open; None when no cell is strictly above the mean."""
    a = np.asarray(cells)
    gh, gw = -(-h // side), -(-w // side)
    if a.shape != (gh, gw):
        raise ValueError(f"cells must be (gh, gw) = {(gh, gw)} for an ({h}, {w}) image with side {side}; got {a.shape}")
    sel = readout_mask(a)
    if sel is None:
        return None
    rows, cols = np.flatnonzero(sel.any(1)), np.flatnonzero(sel.any(0))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    return c0 * side, r0 * side, min((c1 + 1) * side, w), min((r1 + 1) * side, h)


def mask_box(mask: np.ndarray) -> Box | None:
    """Tight half-open box (x0, y0, x1, y1) of an (H, W) bool mask; None when the mask is empty."""
    m = np.asarray(mask, dtype=bool)
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def box_iou(a: Box | None, b: Box | None) -> float:
    """IoU of two half-open boxes; 0 when either is None or the union is empty."""
    if a is None or b is None:
        return 0.0
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def phrase_iou(heat: np.ndarray, region: np.ndarray, side: int) -> float:
    """IoU of the readout of a backprojected (H, W) heat map (`PhraseMap.heat`) with the tight box of the phrase's
    (H, W) region (`PhraseMap.region`); cells of ``side`` pixels (`cell_side`). An empty region is an error."""
    h, w = region.shape
    if heat.shape != (h, w):
        raise ValueError(f"heat {heat.shape} and region {region.shape} must have one shape")
    gt = mask_box(region)
    if gt is None:
        raise ValueError("the phrase's region is empty: nothing to localise")
    return box_iou(readout_box(cell_values(heat, side), h, w, side), gt)


_HITS, _IOU, _N = range(3)


@dataclass
class LocalizationSums:
    """Sums over phrases ``[hits (IoU ≥ 0.5), Σ IoU, n]``, mergeable by summation (all-reduce SUM of `tensor`)."""

    hits: float = 0.0
    iou_sum: float = 0.0
    n: float = 0.0

    def add(self, iou: float) -> None:
        """One phrase's IoU (0 for a miss: no box)."""
        iou = float(iou)
        if not 0.0 <= iou <= 1.0:  # also rejects NaN
            raise ValueError(f"iou must be in [0, 1]; got {iou}")
        self.hits += float(iou >= IOU_HIT)
        self.iou_sum += iou
        self.n += 1.0

    def tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(3,) float64 ``[hits, Σ IoU, n]`` to all-reduce with SUM."""
        return torch.tensor([self.hits, self.iou_sum, self.n], dtype=torch.float64, device=device)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> LocalizationSums:
        if t.shape != (3,):
            raise ValueError(f"not a LocalizationSums tensor: shape {tuple(t.shape)}")
        v = t.detach().to("cpu", torch.float64).tolist()
        return cls(hits=v[_HITS], iou_sum=v[_IOU], n=v[_N])

    def __add__(self, other: LocalizationSums) -> LocalizationSums:
        return LocalizationSums(self.hits + other.hits, self.iou_sum + other.iou_sum, self.n + other.n)

    def metrics(self) -> dict[str, float]:
        """``{"rec_acc50": hits / n, "rec_miou": Σ IoU / n}``; NaN when n = 0."""
        if self.n <= 0:
            return {"rec_acc50": math.nan, "rec_miou": math.nan}
        return {"rec_acc50": self.hits / self.n, "rec_miou": self.iou_sum / self.n}
