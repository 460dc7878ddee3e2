"""The POPE set: the validation images a search's hallucination probe asks about, with their questions.

A function of the validation data alone (the validation split, or the hold-out of the training split) and of the
manifest's categories, like the probe set: every trial of a search, every resume and every rank asks the same
questions. Only the ``image_id`` and ``category_ids`` columns are read to build the questions
(`raysal.metrics.pope.build_pope`); then only the chosen images' rows. Plain pyarrow + the shard format: no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.parquet as pq

from raysal.data.holdout import Holdout, as_holdout
from raysal.data.sample import Sample
from raysal.data.shards import read_manifest, row_to_sample, shard_paths
from raysal.metrics.pope import PopeBuild, Question, build_pope, questions_by_image


@dataclass(frozen=True)
class PopeImage:
    sample: Sample
    questions: tuple[Question, ...]  # setting by setting: each positive, then its negative


@dataclass(frozen=True)
class PopeSet:
    images: tuple[PopeImage, ...]  # ascending image id
    build: PopeBuild

    def only(self, settings: tuple[str, ...]) -> PopeSet:
        """The same images with the questions of ``settings`` alone (a confirmation that guards one setting asks
        that one: a third of the forwards)."""
        return PopeSet(tuple(PopeImage(i.sample, tuple(q for q in i.questions if q.setting in settings))
                             for i in self.images), self.build)  # fmt: skip

    def describe(self) -> dict:
        """What ``<run>/pope.json`` records: the questions asked, and how many images could be asked about."""
        return {
            "images": list(self.build.image_ids),
            "kept": self.build.n_kept,
            "missing_negatives": dict(self.build.missing),
            "questions": [
                {"image_id": q.image_id, "setting": q.setting, "text": q.text, "label": q.label}
                for q in self.build.questions
            ],
        }


def select_pope(
    shard_dir: str, split: str, *, holdout: float | Holdout = 0.0, images: int = 64, seed: int = 0
) -> PopeSet:
    """Up to ``images`` validation images with ≥ 3 distinct thing categories (the lowest ids) and their
    questions. ``holdout``: the ids it keeps (a `Holdout`; a bare fraction > 0: only ids inside the selection
    hold-out, the validation part of a training split)."""
    keep = as_holdout(holdout)
    categories = {int(c["id"]): c for c in read_manifest(shard_dir).get("categories", [])}
    if not categories:
        raise ValueError(f"{shard_dir}: the shard manifest lists no categories: POPE cannot name the things")
    fs, files = shard_paths(shard_dir, split)
    where: dict[int, str] = {}
    candidates: list[tuple[int, list[int]]] = []
    for f in files:
        table = pq.read_table(f, filesystem=fs, columns=["image_id", "category_ids"])
        for image_id, cats in zip(table.column("image_id").to_pylist(), table.column("category_ids").to_pylist(),
                                  strict=True):  # fmt: skip
            if keep.keeps(image_id):
                candidates.append((int(image_id), [int(c) for c in cats]))
                where[int(image_id)] = f
    build = build_pope(candidates, categories, seed=seed, max_images=images)
    asked = questions_by_image(build.questions)
    chosen = []
    for image_id in build.image_ids:
        table = pq.read_table(where[image_id], filesystem=fs, filters=[("image_id", "=", image_id)])
        chosen.append(PopeImage(row_to_sample(table.slice(0, 1).to_pylist()[0]), tuple(asked[image_id])))
    return PopeSet(tuple(chosen), build)
