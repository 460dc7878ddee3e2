"""Convert the upstream COCONut releases (Hugging Face rows, PanCap caption tar) into the on-disk layout.

Offline and testable: the inputs are local files (`scripts/prepare_coconut.py` downloads them first).

* COCONut-S / relabeled val parquet rows (``xdeng77/coconut_s``): columns
  ``mask`` = HF Image struct {bytes: PNG, path}, ``image_info`` = {id, file_name, height, width, coco_url, ...},
  ``segments_info`` = {file_name, image_id, segments_info: [{id, category_id, isthing, iscrowd, area}, ...]}.
  → ``panoptic_<split>_masks/<file_name>.png`` (bytes as stored) + ``annotations/panoptic_<split>.json``.
* PanCap captions (``caption_train2017.tar``, webdataset members ``caption_train2017/<12-digit id>.txt``)
  → ``panoptic_<split>_captions/<12-digit id>.txt`` (bytes as stored; the validator judges the encoding).
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath

import pyarrow.parquet as pq

from raysal.data.layout import Layout, caption_file_name, image_id_from_stem

PANOPTIC_COLUMNS = ("mask", "image_info", "segments_info")


def coco_panoptic_categories() -> list[dict]:
    """The 133 COCO panoptic categories (panopticapi's list): the COCONut rows do not ship them."""
    text = resources.files("raysal.data").joinpath("coco_panoptic_categories.json").read_text()
    return json.loads(text)


@dataclass
class ConvertStats:
    written: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # reason → count; never a silent drop

    def summary(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.written} written, skipped: {skipped}"


def convert_panoptic_rows(
    parquet_files: list[Path],
    root: Path | str,
    split: str,
    categories: list[dict] | None = None,
    batch_size: int = 256,
) -> ConvertStats:
    """HF parquet rows → masks + panoptic JSON of ``split`` under ``root``. Streams record batches."""
    lay = Layout(Path(root), split)
    lay.masks_dir.mkdir(parents=True, exist_ok=True)
    lay.annotations_json.parent.mkdir(parents=True, exist_ok=True)
    stats = ConvertStats()
    images: dict[int, dict] = {}
    annotations: dict[int, dict] = {}
    for path in parquet_files:
        pf = pq.ParquetFile(path)
        missing = [c for c in PANOPTIC_COLUMNS if c not in pf.schema_arrow.names]
        if missing:
            raise ValueError(f"{path}: not a COCONut panoptic parquet file, missing columns {missing}")
        for batch in pf.iter_batches(batch_size=batch_size, columns=list(PANOPTIC_COLUMNS)):
            for row in batch.to_pylist():
                info, seg, mask = row["image_info"] or {}, row["segments_info"] or {}, row["mask"] or {}
                image_id = info.get("id", seg.get("image_id"))
                if image_id is None:
                    stats.skipped["row_without_image_id"] += 1
                    continue
                image_id = int(image_id)
                if not mask.get("bytes"):
                    stats.skipped["row_without_mask_bytes"] += 1
                    continue
                if image_id in annotations:
                    stats.skipped["duplicate_image_id"] += 1
                    continue
                stem = f"{image_id:012d}"
                mask_name = seg.get("file_name") or f"{stem}.png"
                (lay.masks_dir / mask_name).write_bytes(mask["bytes"])
                images[image_id] = {
                    "id": image_id,
                    "file_name": info.get("file_name") or f"{stem}.jpg",
                    "height": int(info["height"]),
                    "width": int(info["width"]),
                    **({"coco_url": info["coco_url"]} if info.get("coco_url") else {}),
                }
                annotations[image_id] = {
                    "image_id": image_id,
                    "file_name": mask_name,
                    "segments_info": [
                        {k: v for k, v in s.items() if v is not None} for s in seg.get("segments_info") or []
                    ],
                }
                stats.written += 1
    data = {
        "images": [images[k] for k in sorted(images)],
        "annotations": [annotations[k] for k in sorted(annotations)],
        "categories": categories if categories is not None else coco_panoptic_categories(),
    }
    lay.annotations_json.write_text(json.dumps(data))
    return stats


def convert_captions_tar(tar_path: Path | str, root: Path | str, split: str) -> ConvertStats:
    """PanCap webdataset tar → one caption file per image id. Members whose name is no image id are counted."""
    lay = Layout(Path(root), split)
    lay.captions_dir.mkdir(parents=True, exist_ok=True)
    stats = ConvertStats()
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = PurePosixPath(member.name)
            if name.suffix != ".txt":
                stats.skipped[f"not_txt:{name.suffix or 'none'}"] += 1
                continue
            image_id = image_id_from_stem(name.stem)
            if image_id is None:
                stats.skipped["name_not_an_image_id"] += 1
                continue
            f = tar.extractfile(member)
            assert f is not None
            (lay.captions_dir / caption_file_name(image_id)).write_bytes(f.read())
            stats.written += 1
    return stats
