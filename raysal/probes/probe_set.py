"""The probe set: a few fixed validation images × grounded phrases whose attention every trial shows.

Chosen from the validation data alone (the validation split, or the hold-out of the training split), in an order
that depends only on the image ids (the hold-out's fixed hash), so every trial of a search, every resume and every
worker gets the same probes; written to ``<run folder>/probes/probes.json`` so a reader knows what was shown.
Plain pyarrow + the shard format: no Ray.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.parquet as pq

from raysal.data.holdout import Holdout, as_holdout, holdout_fraction_of
from raysal.data.sample import Sample
from raysal.data.shards import row_to_sample, shard_paths


@dataclass(frozen=True)
class Phrase:
    start: int  # character span into the caption
    end: int
    text: str
    segment_ids: tuple[int, ...]


@dataclass(frozen=True)
class Probe:
    sample: Sample
    phrases: tuple[Phrase, ...]

    def describe(self) -> dict:
        return {
            "image_id": self.sample.image_id,
            "file_name": self.sample.file_name,
            "caption": self.sample.caption,
            "phrases": [asdict(p) for p in self.phrases],
        }


def select_probes(
    shard_dir: str | Path,
    split: str,
    *,
    holdout: float | Holdout = 0.0,
    images: int = 4,
    phrases: int = 4,
) -> list[Probe]:
    """Up to ``images`` validation images with at least one grounded phrase, each with its first ``phrases``
    phrases (caption order, one per distinct region). ``holdout``: the ids it keeps (a `Holdout`; a bare fraction
    > 0: only ids inside the selection hold-out, the validation part of a training split)."""
    keep = as_holdout(holdout)
    fs, files = shard_paths(shard_dir, split)  # a local folder or a URI: read through its filesystem
    if not files:
        raise ValueError(f"{shard_dir}: split {split!r} has no shard files")
    ids: list[tuple[float, int, str]] = []
    for f in files:
        for image_id in pq.read_table(f, filesystem=fs, columns=["image_id"]).column("image_id").to_pylist():
            if keep.keeps(image_id):
                ids.append((holdout_fraction_of(image_id), int(image_id), f))
    ids.sort()  # by hash, then id: independent of file order and shard size
    out: list[Probe] = []
    for _, image_id, f in ids:
        if len(out) >= images:
            break
        table = pq.read_table(f, filesystem=fs, filters=[("image_id", "=", image_id)])
        sample = row_to_sample(table.slice(0, 1).to_pylist()[0])
        chosen: list[Phrase] = []
        seen: set[tuple[int, ...]] = set()
        for span in sorted(sample.spans, key=lambda s: s.start):
            key = tuple(sorted(span.segment_ids))
            if not key or key in seen:
                continue
            seen.add(key)
            chosen.append(Phrase(span.start, span.end, sample.caption[span.start : span.end], span.segment_ids))
            if len(chosen) >= phrases:
                break
        if chosen:
            out.append(Probe(sample, tuple(chosen)))
    return out
