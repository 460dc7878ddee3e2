"""The localisation readout's inputs, encoded once when its set is chosen (`raysal.loop.readout_eval` only runs
the forward on them and scores, at every evaluation).

Per readout image (`ReadoutItem`): the collated batch of one row — the caption with every chosen phrase grounded
(the union), so one forward captures the attention of all their tokens — and, per phrase, the rows of the union's
grounded tokens that the phrase's *own* encoding grounds (the same token ids, so the same attention; the caption
is tokenised whole both ways, so positions agree), with its segment ids; the decoded segment map (the phrases'
regions) and the image's back-projection onto its pixels (`raysal.probes.backproject`), kept sparse between
evaluations. Plain numpy/PyTorch + the processor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from raysal.batch import Batch, Sample
from raysal.data.decode import decode_image
from raysal.data.mask import decode_mask_png
from raysal.preprocess.collate import collate
from raysal.preprocess.coverage import coverage
from raysal.preprocess.encode import DEFAULT_PROMPT, encode_sample
from raysal.probes.backproject import GRID, Backprojection, cell_map
from raysal.probes.probe_set import Probe


@dataclass(frozen=True)
class SparseBackprojection:
    """One image's `Backprojection` at rest: its (I, C) coverage holds a few cells per token (a NeXT image at
    GRID = 64: ~11 K of 7 M entries, 29 MB dense), so only the non-zeros are kept; `dense` rebuilds the very same
    float64 matrix (zeros are exact), so the maps are bit for bit those of a fresh `Backprojection`."""

    h: int
    w: int
    grid: int
    shape: tuple[int, int]  # (I, C)
    index: np.ndarray  # (2, nnz) int64: (token, cell) of each non-zero
    values: np.ndarray  # (nnz,) float64
    footprint: np.ndarray  # (I,) original pixels behind each token
    seen: np.ndarray  # (C,) Σ_t cov[t, c]

    @classmethod
    def of(cls, h: int, w: int, processor: Any, grid: int = GRID) -> SparseBackprojection:
        bp = Backprojection(h, w, processor, grid)
        index = np.stack(np.nonzero(bp.cov))  # (2, nnz)
        return cls(h, w, grid, bp.cov.shape, index, bp.cov[index[0], index[1]], bp.footprint, bp.seen)

    def dense(self) -> Backprojection:
        """The callable `Backprojection` ((I,) attention → (H, W) density), for the phrases of one evaluation."""
        cov = np.zeros(self.shape, np.float64)  # (I, C)
        cov[self.index[0], self.index[1]] = self.values
        return Backprojection.from_parts(cell_map(self.h, self.w, self.grid)[0], cov, self.footprint, self.seen)


@dataclass(frozen=True)
class ReadoutPhrase:
    rows: tuple[int, ...]  # rows of the union's grounded tokens (its T axis) this phrase's own encoding grounds
    segment_ids: tuple[int, ...]  # the phrase's region


@dataclass(frozen=True)
class ReadoutItem:
    image_id: int
    batch: Batch  # one row on the host, pixels uint8: the caption with every chosen phrase grounded
    segment_map: np.ndarray  # (H, W) segment ids of the original image
    pixels: SparseBackprojection
    phrases: tuple[ReadoutPhrase, ...]  # in the probe's phrase order


def readout_item(
    probe: Probe, processor: Any, *, prompt: str = DEFAULT_PROMPT, padding_side: str = "right"
) -> ReadoutItem:
    """Encode one readout image: the union of its phrases, and each phrase alone for the positions it grounds."""
    s = probe.sample
    image, segment_map = decode_image(s.image_bytes), decode_mask_png(s.mask_bytes)
    cov = coverage(segment_map, s.segment_ids, processor)  # (I, S): once for the image, not once per phrase
    spans = [(p.start, p.end, p.segment_ids) for p in probe.phrases]

    def encode(chosen: list[tuple[int, int, tuple[int, ...]]]) -> Sample:
        return encode_sample(image, segment_map, s.caption, chosen, s.segment_ids, processor, prompt, cov=cov)

    union = encode(spans)
    # a batch of one has no padding: the union's positions are numbered as a phrase's own encoding numbers them
    row_of = {int(pos): i for i, pos in enumerate(union["grounded_pos"].tolist())}
    phrases = []
    for phrase, span in zip(probe.phrases, spans, strict=True):
        own = encode([span])["grounded_pos"]  # (T_phrase,)
        phrases.append(ReadoutPhrase(tuple(row_of[int(q)] for q in own if int(q) in row_of), phrase.segment_ids))
    return ReadoutItem(
        image_id=int(s.image_id),
        batch=collate([union], processor.tokenizer.pad_token_id, padding_side),
        segment_map=segment_map,
        pixels=SparseBackprojection.of(*segment_map.shape, processor),
        phrases=tuple(phrases),
    )


def readout_items(
    probes: Sequence[Probe], processor: Any, *, prompt: str = DEFAULT_PROMPT, padding_side: str = "right"
) -> list[ReadoutItem]:
    """Every readout image encoded, in the set's order (the ranks split it by position)."""
    return [readout_item(p, processor, prompt=prompt, padding_side=padding_side) for p in probes]
