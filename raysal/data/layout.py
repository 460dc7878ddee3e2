"""Paths of the COCONut on-disk layout (DESIGN §2.1)::

ROOT/images/<split>/<file_name>.jpg
ROOT/annotations/panoptic_<split>.json
ROOT/panoptic_<split>_masks/<annotation file_name>.png
ROOT/panoptic_<split>_captions/<12-digit image id>.txt
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_ANNOTATION = re.compile(r"^panoptic_(?P<split>.+)\.json$")


@dataclass(frozen=True)
class Layout:
    root: Path
    split: str

    @property
    def images_dir(self) -> Path:
        return self.root / "images" / self.split

    @property
    def annotations_json(self) -> Path:
        return self.root / "annotations" / f"panoptic_{self.split}.json"

    @property
    def masks_dir(self) -> Path:
        return self.root / f"panoptic_{self.split}_masks"

    @property
    def captions_dir(self) -> Path:
        return self.root / f"panoptic_{self.split}_captions"

    def caption_path(self, image_id: int) -> Path:
        return self.captions_dir / caption_file_name(image_id)


def caption_file_name(image_id: int) -> str:
    return f"{image_id:012d}.txt"


def image_id_from_stem(stem: str) -> int | None:
    """'000000000009' → 9; None for names that are not COCO-style ids."""
    return int(stem) if stem.isdigit() else None


def find_splits(root: Path) -> list[str]:
    """Splits that have an annotation JSON under ROOT/annotations, sorted."""
    ann = Path(root) / "annotations"
    if not ann.is_dir():
        return []
    found = (_ANNOTATION.match(p.name) for p in ann.iterdir())
    return sorted(m.group("split") for m in found if m)
