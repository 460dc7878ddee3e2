"""Attention over image tokens → attention on the user's pixels: the inverse of the coverage map.

`raysal.preprocess.coverage` says which fraction of each image token's 14×14 cell comes from each segment of the
original image, through the processor's exact geometry (pad-to-square / resize / centre crop for LLaVA-1.5; base
view + anyres tiles + unpadding + newline tokens for LLaVA-NeXT). Labelling the original image with a grid of small
cells instead of segments gives (I, C): how much of token t's cell comes from original cell c. A cell's attention is
then the coverage-weighted mean of the attention of the tokens that see it,

    A[c] = Σ_t a[t] · cov[t, c] / Σ_t cov[t, c]          (NaN where no token sees the cell: cropped away)

so an overlay sits on the original image whatever the processor did (LLaVA-NeXT's base view and tiles both see a
cell; the mean mixes them). Token attention is a distribution over tokens of very different footprints (a base
token covers a 14-px cell of a squashed image, a tile token much less), so it is first divided by each token's
footprint in original pixels: the map is an attention *density*, comparable across the image.
"""

from __future__ import annotations

import numpy as np

from raysal.preprocess.coverage import coverage

GRID = 64  # cells along the longer side: fine enough for a figure, (I, 64·64) coverage stays small


def cell_map(h: int, w: int, grid: int = GRID) -> tuple[np.ndarray, tuple[int, int]]:
    """(H, W) int64 cell index of every original pixel, row-major from 0 (square cells, ``grid`` of them along
    the longer side), and the grid's (rows, cols)."""
    side = max(1, -(-max(h, w) // grid))  # ceil: square cells of this many pixels
    gh, gw = -(-h // side), -(-w // side)
    rows = np.arange(h) // side
    cols = np.arange(w) // side
    return rows[:, None] * gw + cols[None, :], (gh, gw)


def token_footprint(cov: np.ndarray, cell_pixels: np.ndarray) -> np.ndarray:
    """(I,) original pixels each token's cell is made of (0 for newline / CLS / padding-only tokens)."""
    return cov @ cell_pixels


class Backprojection:
    """The inverse geometry of one image size under one processor (the coverage is computed once, here); call it
    with (I,) attention over image tokens (any non-negative weights) → (H, W) float32 density on the original
    pixels, max-normalised to [0, 1], NaN where the processor cropped the image away."""

    def __init__(self, h: int, w: int, processor, grid: int = GRID) -> None:
        self.cells, (gh, gw) = cell_map(h, w, grid)
        # segment ids start at 1: id 0 is void for `coverage`
        self.cov = coverage(self.cells + 1, np.arange(1, gh * gw + 1), processor)  # (I, C): token t's share of c
        cell_pixels = np.bincount(self.cells.ravel(), minlength=gh * gw).astype(np.float64)  # (C,)
        self.footprint = token_footprint(self.cov, cell_pixels)  # (I,) original pixels behind each token
        self.seen = self.cov.sum(0)  # (C,)

    @classmethod
    def from_parts(cls, cells: np.ndarray, cov: np.ndarray, footprint: np.ndarray, seen: np.ndarray) -> Backprojection:
        """The same geometry from parts computed earlier (`raysal.probes.readout_items` keeps them sparse between
        evaluations): no coverage computed again."""
        out = cls.__new__(cls)
        out.cells, out.cov, out.footprint, out.seen = cells, cov, footprint, seen  # (H, W), (I, C), (I,), (C,)
        return out

    def __call__(self, token_attention: np.ndarray) -> np.ndarray:
        a = np.asarray(token_attention, dtype=np.float64)
        if a.shape != (self.cov.shape[0],):
            raise ValueError(
                f"token_attention has shape {a.shape}; the processor gives {self.cov.shape[0]} image tokens"
            )
        density = np.divide(a, self.footprint, out=np.zeros_like(a), where=self.footprint > 0)  # (I,) per pixel
        per_cell = np.divide(
            density @ self.cov, self.seen, out=np.full(len(self.seen), np.nan), where=self.seen > 0
        )  # (C,)
        top = np.nanmax(per_cell) if np.isfinite(per_cell).any() else 0.0
        if top > 0:
            per_cell = per_cell / top
        return per_cell[self.cells].astype(np.float32)  # (H, W)


def backproject(token_attention: np.ndarray, h: int, w: int, processor, grid: int = GRID) -> np.ndarray:
    """One-off `Backprojection` (an image's phrases share one: build it once)."""
    return Backprojection(h, w, processor, grid)(token_attention)
