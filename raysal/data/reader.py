"""Read one split of the COCONut layout and check every sample on the way (DESIGN §2.1–2.2).

`index_split` reads the panoptic JSON and lists caption files once; `read_record` opens one sample's files,
runs every check, and returns either a `Sample` or the list of `Problem`s that make it unusable. The validator
(`raysal.data.check`) and the shard writer both go through `read_record`, so training never sees a sample the
validator would reject.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from raysal.data.layout import Layout, image_id_from_stem
from raysal.data.mask import decode_mask_png
from raysal.data.sample import Sample
from raysal.data.tags import parse_caption


class Reason(str, Enum):
    """Why a sample is unusable. The value is what reports and manifests print."""

    IMAGE_MISSING = "image_missing"  # annotation without image file
    IMAGE_UNREADABLE = "image_unreadable"  # truncated / not an image
    MASK_UNREADABLE = "mask_unreadable"  # missing, truncated or not a PNG
    SIZE_MISMATCH = "size_mismatch"  # mask size ≠ image size (or image ≠ size declared in the JSON)
    MASK_SEGMENTS_MISMATCH = "mask_segments_mismatch"  # mask pixels of ids absent from segments_info
    SEGMENTS_INFO_INVALID = "segments_info_invalid"  # duplicate segment ids, unknown category
    TAG_UNKNOWN_ID = "tag_unknown_id"  # tag id (after offset) absent from segments_info
    TAG_VOID = "tag_void"  # tag id (after offset) is 0 = void
    TAG_MALFORMED = "tag_malformed"  # '<' / '>' left over that no tag syntax explains
    CAPTION_MISSING = "caption_missing"  # annotation without caption file
    CAPTION_NOT_UTF8 = "caption_not_utf8"
    CAPTION_EMPTY = "caption_empty"
    CAPTION_NO_TAGS = "caption_no_tags"
    CAPTION_ORPHAN = "caption_orphan"  # caption file without annotation


@dataclass(frozen=True)
class Problem:
    reason: Reason
    file: str  # the file at fault, relative to ROOT
    message: str  # one line


@dataclass(frozen=True)
class TagConfig:
    """Id offsets per tag syntax (DESIGN §2.2): segment id = parsed id + offset."""

    colon_offset: int = 0
    nocolon_offset: int = 1


@dataclass(frozen=True)
class Record:
    """One sample's files and metadata, before anything is opened. Picklable, so workers can read it."""

    root: Path
    split: str
    image_id: int
    image_file: str | None  # relative to ROOT; None when the JSON has no images[] entry
    mask_file: str | None  # relative to ROOT; None for a caption without annotation
    caption_file: str | None  # relative to ROOT; None when there is no caption file
    height: int | None
    width: int | None
    segments: tuple[dict, ...] = ()
    annotated: bool = True


@dataclass
class SplitIndex:
    split: str
    records: list[Record]
    categories: dict[int, dict] = field(default_factory=dict)


class LayoutError(RuntimeError):
    """The split itself cannot be read (missing or broken annotation JSON): no sample-level skip helps."""


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def index_split(root: Path, split: str) -> SplitIndex:
    """Read ROOT/annotations/panoptic_<split>.json and the caption folder; one Record per sample.

    A sample is an annotation or a caption file: the union of both, so orphans on either side are reported.
    """
    root = Path(root)
    lay = Layout(root, split)
    path = lay.annotations_json
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise LayoutError(f"{path}: annotation JSON not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LayoutError(f"{path}: not valid JSON ({e})") from e
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise LayoutError(f"{path}: key {key!r} missing or not a list")
    categories = {int(c["id"]): c for c in data.get("categories", [])}
    images = {int(im["id"]): im for im in data["images"]}
    annotations = {int(a["image_id"]): a for a in data["annotations"]}
    captions: dict[int, Path] = {}
    if lay.captions_dir.is_dir():
        for p in lay.captions_dir.iterdir():
            image_id = image_id_from_stem(p.stem)
            if p.suffix == ".txt" and image_id is not None:
                captions[image_id] = p

    records = []
    for image_id in sorted(set(annotations) | set(captions)):
        ann = annotations.get(image_id)
        im = images.get(image_id)
        cap = captions.get(image_id)
        records.append(
            Record(
                root=root,
                split=split,
                image_id=image_id,
                image_file=_rel(root, lay.images_dir / im["file_name"]) if im else None,
                mask_file=_rel(root, lay.masks_dir / ann["file_name"]) if ann else None,
                caption_file=_rel(root, cap) if cap else None,
                height=int(im["height"]) if im and "height" in im else None,
                width=int(im["width"]) if im and "width" in im else None,
                segments=tuple(ann.get("segments_info", ())) if ann else (),
                annotated=ann is not None,
            )
        )
    return SplitIndex(split=split, records=records, categories=categories)


def _read_caption(rec: Record, tags: TagConfig, segment_ids: set[int], problems: list[Problem]):
    default = Layout(rec.root, rec.split).caption_path(rec.image_id)
    file = rec.caption_file or _rel(rec.root, default)
    if rec.caption_file is None:
        problems.append(Problem(Reason.CAPTION_MISSING, file, "annotation has no caption file"))
        return None
    raw_bytes = (rec.root / rec.caption_file).read_bytes()
    try:
        raw = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        problems.append(Problem(Reason.CAPTION_NOT_UTF8, file, f"not UTF-8: byte {e.start} is {raw_bytes[e.start]:#x}"))
        return None
    raw = raw.strip()
    if not raw:
        problems.append(Problem(Reason.CAPTION_EMPTY, file, "caption is empty"))
        return None
    parsed = parse_caption(raw, colon_offset=tags.colon_offset, nocolon_offset=tags.nocolon_offset)
    if not parsed.spans:
        problems.append(Problem(Reason.CAPTION_NO_TAGS, file, "caption has no <ids: phrase> tag"))
        return None
    if parsed.malformed:
        problems.append(Problem(Reason.TAG_MALFORMED, file, f"unparsed tag fragment(s) {list(parsed.malformed)[:3]}"))
    for span in parsed.spans:
        phrase = parsed.text[span.start : span.end]
        if 0 in span.segment_ids:
            problems.append(Problem(Reason.TAG_VOID, file, f"tag {phrase!r} points at void (segment 0)"))
        unknown = sorted(i for i in span.segment_ids if i != 0 and i not in segment_ids)
        if unknown:
            problems.append(
                Problem(
                    Reason.TAG_UNKNOWN_ID,
                    file,
                    f"tag {phrase!r} ({span.syntax} syntax) names segment(s) {unknown} absent from segments_info",
                )
            )
    return parsed


def _read_image(rec: Record, problems: list[Problem]) -> tuple[bytes, tuple[int, int]] | None:
    if rec.image_file is None:
        problems.append(Problem(Reason.IMAGE_MISSING, rec.mask_file or "", "annotation has no images[] entry"))
        return None
    path = rec.root / rec.image_file
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        problems.append(Problem(Reason.IMAGE_MISSING, rec.image_file, "image file not found"))
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # full decode so a truncated JPEG is caught here
            size = img.size  # (W, H)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        problems.append(Problem(Reason.IMAGE_UNREADABLE, rec.image_file, f"cannot decode image: {e}"))
        return None
    return data, size


def _read_mask(rec: Record, problems: list[Problem]) -> tuple[bytes, np.ndarray] | None:
    assert rec.mask_file is not None
    try:
        data = (rec.root / rec.mask_file).read_bytes()
    except FileNotFoundError:
        problems.append(Problem(Reason.MASK_UNREADABLE, rec.mask_file, "mask PNG not found"))
        return None
    try:
        ids = decode_mask_png(data)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        problems.append(Problem(Reason.MASK_UNREADABLE, rec.mask_file, f"cannot decode mask PNG: {e}"))
        return None
    return data, ids


def _check_segments(rec: Record, categories: dict[int, dict], problems: list[Problem]) -> None:
    ann_file = f"annotations/panoptic_{rec.split}.json"
    ids = [int(s["id"]) for s in rec.segments]
    if len(ids) != len(set(ids)):
        problems.append(
            Problem(Reason.SEGMENTS_INFO_INVALID, ann_file, f"image {rec.image_id}: duplicate segment ids {ids}")
        )
    if categories:
        unknown = sorted({int(s["category_id"]) for s in rec.segments} - set(categories))
        if unknown:
            problems.append(
                Problem(Reason.SEGMENTS_INFO_INVALID, ann_file, f"image {rec.image_id}: unknown category ids {unknown}")
            )


def read_record(rec: Record, tags: TagConfig, categories: dict[int, dict]) -> tuple[Sample | None, list[Problem]]:
    """Open and check one sample. Returns (sample, []) when usable, else (None, problems)."""
    problems: list[Problem] = []
    if not rec.annotated:
        assert rec.caption_file is not None
        problems.append(Problem(Reason.CAPTION_ORPHAN, rec.caption_file, "caption file has no annotation"))
        return None, problems

    _check_segments(rec, categories, problems)
    segment_ids = {int(s["id"]) for s in rec.segments}
    parsed = _read_caption(rec, tags, segment_ids, problems)
    image = _read_image(rec, problems)
    mask = _read_mask(rec, problems)

    if image is not None and mask is not None:
        (img_w, img_h), (mh, mw) = image[1], mask[1].shape
        if (mh, mw) != (img_h, img_w):
            problems.append(
                Problem(Reason.SIZE_MISMATCH, rec.mask_file or "", f"mask is {mw}x{mh} but image is {img_w}x{img_h}")
            )
        elif rec.height is not None and (rec.height, rec.width) != (img_h, img_w):
            problems.append(
                Problem(
                    Reason.SIZE_MISMATCH,
                    rec.image_file or "",
                    f"image is {img_w}x{img_h} but the JSON says {rec.width}x{rec.height}",
                )
            )
        else:
            in_mask = set(np.unique(mask[1]).tolist()) - {0}
            stray = sorted(in_mask - segment_ids)
            if stray:
                problems.append(
                    Problem(
                        Reason.MASK_SEGMENTS_MISMATCH,
                        rec.mask_file or "",
                        f"mask has pixels of segment ids {stray[:5]} absent from segments_info",
                    )
                )

    if problems:
        return None, problems
    assert parsed is not None and image is not None and mask is not None
    img_w, img_h = image[1]
    return (
        Sample(
            split=rec.split,
            image_id=rec.image_id,
            file_name=Path(rec.image_file or "").name,
            image_bytes=image[0],
            mask_bytes=mask[0],
            height=img_h,
            width=img_w,
            caption=parsed.text,
            spans=parsed.spans,
            segment_ids=tuple(int(s["id"]) for s in rec.segments),
            category_ids=tuple(int(s["category_id"]) for s in rec.segments),
            iscrowd=tuple(int(s.get("iscrowd", 0)) for s in rec.segments),
        ),
        [],
    )
