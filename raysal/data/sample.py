"""A validated COCONut sample: what the shards store and the Ray Dataset decodes."""

from __future__ import annotations

from dataclasses import dataclass

from raysal.data.tags import Span


@dataclass(frozen=True)
class Sample:
    split: str
    image_id: int
    file_name: str
    image_bytes: bytes  # the image file as stored (JPEG for COCO), never re-encoded
    mask_bytes: bytes  # the panoptic RGB PNG as stored: lossless
    height: int
    width: int
    caption: str  # clean caption, tags removed
    spans: tuple[Span, ...]  # character spans into `caption` with their segment ids
    segment_ids: tuple[int, ...]  # from segments_info, in file order
    category_ids: tuple[int, ...]  # aligned with segment_ids
    iscrowd: tuple[int, ...]  # aligned with segment_ids
