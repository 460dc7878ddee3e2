"""Synthetic COCONut-format data: ``python -m raysal.data.synthetic --out ROOT --images N --seed S [--broken K]``.

Writes the exact on-disk layout of DESIGN §2.1 so that every reader, validator, pipeline and training path runs on
real files. The task is learnable grounding: coloured shapes (things) on one or two background regions (stuff),
captions whose tags name every region (`<2: a red circle> left of <3,4: two blue squares> on <1: the grass>`),
several aspect ratios (crop/pad geometry), multi-id tags, untagged words, both tag syntaxes, void borders.
``--palette coded`` paints each shape category in one colour of its own and fills scenes with 3-5 shapes of distinct
categories: the demo's tiny vision tower sees colour but never learns shape, so that is what lets its base answer
POPE's "Is there a ring in the image?" from the image, and what gives POPE (≥ 3 distinct things) images to ask about.
``--broken K`` plants K broken samples, one fault each, in the order of `BROKEN_KINDS`; ``ROOT/synthetic.json``
records what was planted where. Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from raysal.data.layout import Layout
from raysal.data.mask import encode_mask_png
from raysal.data.reader import Reason
from raysal.data.tags import format_tag, parse_caption

THINGS = {1: "circle", 2: "square", 3: "triangle", 4: "diamond", 5: "ring", 6: "bar"}
MIXED_THINGS = (1, 2, 3, 4)  # the "any" palette's shapes: the first four, so its scenes are those of earlier versions
STUFF = {101: "sky", 102: "grass", 103: "wall", 104: "water", 105: "sand"}
TOP_STUFF, BOTTOM_STUFF = (101, 103), (102, 104, 105)
STUFF_RGB = {101: (135, 190, 235), 102: (70, 150, 60), 103: (150, 150, 150), 104: (30, 70, 140), 105: (220, 200, 150)}
COLOURS = {
    "red": (220, 40, 40),
    "blue": (40, 60, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 170),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
CODED = {1: "red", 2: "blue", 3: "yellow", 4: "white", 5: "orange", 6: "purple"}  # palette "coded": shape → colour
PALETTES = ("any", "coded")
# (w, h) aspect ratios: landscape, portrait, square and the extremes that select every LLaVA-NeXT pinpoint
ASPECTS = ((4, 3), (3, 4), (16, 9), (9, 16), (1, 1), (3, 2), (2, 3), (2, 1), (1, 2), (3, 1), (1, 3))
NUMBERS = {2: "two", 3: "three"}
OPENERS = ("In this picture", "This image shows", "We can see", "Here is a scene with", "The photo has")
_GLUE_WORDS = (
    "a an the and on in of at is are left right top bottom middle above below under near next to beside "
    "front behind this picture image shows we can see here scene with photo has there nothing hidden ball"
).split()
# Every word the generator can write: the tiny tokenizer (training-core issue) builds its vocabulary from this.
WORDS = sorted(
    {w for o in OPENERS for w in o.lower().split()}
    | set(THINGS.values())
    | {n + "s" for n in THINGS.values()}
    | set(STUFF.values())
    | set(COLOURS)
    | set(NUMBERS.values())
    | set(_GLUE_WORDS)
)

BROKEN_KINDS: tuple[tuple[str, Reason], ...] = (
    ("mask_truncated", Reason.MASK_UNREADABLE),
    ("tag_unknown_id", Reason.TAG_UNKNOWN_ID),
    ("size_mismatch", Reason.SIZE_MISMATCH),
    ("caption_not_utf8", Reason.CAPTION_NOT_UTF8),
    ("caption_empty", Reason.CAPTION_EMPTY),
    ("image_truncated", Reason.IMAGE_UNREADABLE),
    ("tag_void", Reason.TAG_VOID),
    ("caption_no_tags", Reason.CAPTION_NO_TAGS),
    ("caption_orphan", Reason.CAPTION_ORPHAN),
    ("image_missing", Reason.IMAGE_MISSING),
    ("caption_missing", Reason.CAPTION_MISSING),
    ("tag_malformed", Reason.TAG_MALFORMED),
    ("mask_stray_segment", Reason.MASK_SEGMENTS_MISMATCH),
)


@dataclass
class _Segment:
    id: int
    category_id: int
    colour: str | None = None  # things only


def categories() -> list[dict]:
    things = [{"id": k, "name": v, "supercategory": "shape", "isthing": 1} for k, v in THINGS.items()]
    stuff = [{"id": k, "name": v, "supercategory": "background", "isthing": 0} for k, v in STUFF.items()]
    return things + stuff


def _size(rng: np.random.Generator, max_side: int) -> tuple[int, int]:
    aw, ah = ASPECTS[rng.integers(len(ASPECTS))]
    if aw >= ah:
        return max_side, max(16, round(max_side * ah / aw))
    return max(16, round(max_side * aw / ah)), max_side


def _shape_mask(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if kind == "circle":
        return dy**2 + dx**2 <= r**2
    if kind == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if kind == "diamond":
        return np.abs(dy) + np.abs(dx) <= r
    if kind == "ring":
        return (dy**2 + dx**2 <= r**2) & (dy**2 + dx**2 >= (0.55 * r) ** 2)
    if kind == "bar":
        return (np.abs(dy) <= r * 0.35) & (np.abs(dx) <= r)
    # upward triangle: inside the band below the apex and within the widening sides
    return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)


def _position(cy: float, cx: float, h: int, w: int) -> str:
    if cx < w / 3:
        return "on the left"
    if cx > 2 * w / 3:
        return "on the right"
    if cy < h / 3:
        return "at the top"
    if cy > 2 * h / 3:
        return "at the bottom"
    return "in the middle"


def _pick(rng: np.random.Generator, palette: str, used: set[int]) -> tuple[int, str]:
    """A new shape's (category, colour): "any": any of the first four shapes in any colour (draws as in earlier
    versions); "coded": a category not yet in the scene, in its own colour."""
    if palette == "any":
        return int(rng.choice(MIXED_THINGS)), str(rng.choice(list(COLOURS)))
    cat = int(rng.choice([c for c in THINGS if c not in used]))
    return cat, CODED[cat]


def _render(rng: np.random.Generator, max_side: int, palette: str = "any"):
    """One scene: (image (H,W,3) uint8, ids (H,W) int32, segments, caption pieces)."""
    w, h = _size(rng, max_side)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ids = np.zeros((h, w), np.int32)
    segments: list[_Segment] = []

    # stuff: one region, or a top and a bottom region split at a random height
    if rng.random() < 0.6:
        top, bottom = int(rng.choice(TOP_STUFF)), int(rng.choice(BOTTOM_STUFF))
        cut = int(h * rng.uniform(0.3, 0.7))
        segments += [_Segment(1, top), _Segment(2, bottom)]
        ids[:cut], ids[cut:] = 1, 2
    else:
        segments.append(_Segment(1, int(rng.choice(list(STUFF)))))
        ids[:] = 1

    # things: 1–4 shapes placed without overlap; sometimes a twin of the first (→ a multi-id tag)
    n_things = int(rng.integers(1, 5)) if palette == "any" else int(rng.integers(3, 6))
    occupied = np.zeros((h, w), bool)
    first: tuple[int, str] | None = None
    for k in range(n_things):
        if k == 1 and first is not None and rng.random() < 0.4:
            cat, colour = first
        else:
            cat, colour = _pick(rng, palette, {s.category_id for s in segments})
        for _ in range(30):
            r = rng.uniform(0.08, 0.18) * min(h, w)
            cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
            m = _shape_mask(THINGS[cat], yy, xx, cy, cx, r)
            if m.sum() > 16 and not (m & occupied).any():
                break
        else:
            continue  # no free spot: skip this shape rather than overlap
        occupied |= m
        seg = _Segment(len(segments) + 1, cat, colour)
        segments.append(seg)
        ids[m] = seg.id
        if first is None:
            first = (cat, colour)

    # void: a border band at one edge, sometimes (real masks have unlabelled pixels)
    if rng.random() < 0.25:
        band = int(rng.integers(2, 9))
        edge = int(rng.integers(4))
        sl = [
            (slice(0, band), slice(None)),
            (slice(h - band, h), slice(None)),
            (slice(None), slice(0, band)),
            (slice(None), slice(w - band, w)),
        ][edge]
        ids[sl] = 0
    segments = [s for s in segments if (ids == s.id).any()]

    img = np.zeros((h, w, 3), np.float32)
    for s in segments:
        rgb = COLOURS[s.colour] if s.colour else STUFF_RGB[s.category_id]
        img[ids == s.id] = rgb
    img += rng.normal(0, 6, img.shape)  # texture, so JPEG has something real to compress
    image = np.clip(img, 0, 255).astype(np.uint8)
    return image, ids, segments


def _caption(rng: np.random.Generator, ids: np.ndarray, segments: list[_Segment], nocolon_p: float) -> str:
    h, w = ids.shape

    def tag(seg_ids: list[int], phrase: str) -> str:
        # no-colon tags are written 0-based, the convention the reader's default nocolon_offset=1 undoes
        if rng.random() < nocolon_p:
            return format_tag([i - 1 for i in seg_ids], phrase, syntax="nocolon")
        return format_tag(seg_ids, phrase, syntax="colon")

    # group identical things (same shape and colour) into one multi-id tag
    groups: dict[tuple[int, str], list[_Segment]] = {}
    for s in segments:
        if s.colour is not None:
            groups.setdefault((s.category_id, s.colour), []).append(s)
    parts = []
    for (cat, colour), segs in groups.items():
        if len(segs) == 1:
            phrase = f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {THINGS[cat]}"
        else:
            phrase = f"{NUMBERS.get(len(segs), 'three')} {colour} {THINGS[cat]}s"
        ys, xs = np.nonzero(np.isin(ids, [s.id for s in segs]))
        parts.append(f"{tag([s.id for s in segs], phrase)} {_position(ys.mean(), xs.mean(), h, w)}")
    stuff = [s for s in segments if s.colour is None]
    where = " and ".join(tag([s.id], f"the {STUFF[s.category_id]}") for s in stuff)
    opener = str(rng.choice(OPENERS))
    things = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + (parts[-1] if parts else "")
    if things:
        return f"{opener} {things}, in front of {where}."
    return f"{opener} {where}."


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def generate(
    out: Path | str,
    images: int,
    seed: int = 0,
    broken: int = 0,
    max_side: int = 640,
    val_fraction: float = 0.2,
    nocolon_p: float = 0.1,
    palette: str = "any",
) -> dict:
    """Write ``images`` samples under ``out`` (train2017 + val2017) and return the planted-fault record.
    ``palette``: "any" (any shape in any colour) or "coded" (one colour per shape category; module docstring)."""
    if palette not in PALETTES:
        raise ValueError(f"palette {palette!r}: expected one of {PALETTES}")
    if broken > images:
        raise ValueError(f"--broken {broken} exceeds --images {images}")
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)  # deterministic output means no leftovers from an earlier run
    rng = np.random.default_rng(seed)
    image_ids = sorted(int(1000 * i + rng.integers(1, 1000)) for i in range(images))  # sparse, like COCO
    n_val = round(images * val_fraction)
    split_of = {iid: ("val2017" if k >= images - n_val else "train2017") for k, iid in enumerate(image_ids)}
    planted_ids = [int(i) for i in rng.choice(image_ids, size=broken, replace=False)] if broken else []
    plant = {iid: BROKEN_KINDS[k % len(BROKEN_KINDS)] for k, iid in enumerate(planted_ids)}

    jsons: dict[str, dict] = {}
    planted = []
    for iid in image_ids:
        split = split_of[iid]
        lay = Layout(out, split)
        for d in (lay.images_dir, lay.masks_dir, lay.captions_dir, lay.annotations_json.parent):
            d.mkdir(parents=True, exist_ok=True)
        js = jsons.setdefault(split, {"images": [], "annotations": [], "categories": categories()})
        image, ids, segments = _render(rng, max_side, palette)
        caption = _caption(rng, ids, segments, nocolon_p)
        h, w = ids.shape
        name = f"{iid:012d}"
        image_bytes, mask_bytes = _jpeg(image), encode_mask_png(ids)
        caption_bytes = caption.encode("utf-8")
        annotation = {
            "image_id": iid,
            "file_name": f"{name}.png",
            "segments_info": [
                {
                    "id": s.id,
                    "category_id": s.category_id,
                    "iscrowd": 0,
                    "isthing": int(s.colour is not None),
                    "area": int((ids == s.id).sum()),
                }
                for s in segments
            ],
        }
        keep_annotation, write_image, write_caption = True, True, True

        if iid in plant:
            kind, reason = plant[iid]
            planted.append({"split": split, "image_id": iid, "kind": kind, "reason": reason.value})
            if kind == "mask_truncated":
                mask_bytes = mask_bytes[: len(mask_bytes) // 2]
            elif kind == "tag_unknown_id":
                caption_bytes = caption.replace(
                    ".", f" near {format_tag([len(segments) + 7], 'a hidden ball')}.", 1
                ).encode()
            elif kind == "size_mismatch":
                mask_bytes = encode_mask_png(np.pad(ids, ((0, 0), (0, 8))))
            elif kind == "caption_not_utf8":
                caption_bytes = caption_bytes[:10] + b"\xff\xfe" + caption_bytes[10:]
            elif kind == "caption_empty":
                caption_bytes = b"\n"
            elif kind == "image_truncated":
                image_bytes = image_bytes[: len(image_bytes) * 2 // 5]
            elif kind == "tag_void":
                caption_bytes = caption.replace(".", f" beside {format_tag([0], 'nothing')}.", 1).encode()
            elif kind == "caption_no_tags":
                caption_bytes = parse_caption(caption).text.encode()
            elif kind == "caption_orphan":
                keep_annotation = False
            elif kind == "image_missing":
                write_image = False
            elif kind == "caption_missing":
                write_caption = False
            elif kind == "tag_malformed":
                caption_bytes = caption[: caption.rindex(">")].encode() + b"."  # drop the last tag's closing '>'
            elif kind == "mask_stray_segment":
                stray = ids.copy()
                stray[: max(1, h // 10), : max(1, w // 10)] = len(segments) + 50
                mask_bytes = encode_mask_png(stray)

        if write_image:
            (lay.images_dir / f"{name}.jpg").write_bytes(image_bytes)
        (lay.masks_dir / f"{name}.png").write_bytes(mask_bytes)
        if write_caption:
            lay.caption_path(iid).write_bytes(caption_bytes)
        js["images"].append({"id": iid, "file_name": f"{name}.jpg", "height": h, "width": w})
        if keep_annotation:
            js["annotations"].append(annotation)

    for split, js in jsons.items():
        Layout(out, split).annotations_json.write_text(json.dumps(js))
    record = {
        "seed": seed,
        "images": images,
        "broken": broken,
        "max_side": max_side,
        "palette": palette,
        "splits": {s: sum(v == s for v in split_of.values()) for s in sorted(set(split_of.values()))},
        "planted": sorted(planted, key=lambda p: p["image_id"]),
    }
    (out / "synthetic.json").write_text(json.dumps(record, indent=2))
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raysal.data.synthetic", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="root folder to write (replaced if it exists)")
    ap.add_argument("--images", type=int, required=True, help="number of samples (train + val)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--broken", type=int, default=0, help=f"plant K broken samples: {[k for k, _ in BROKEN_KINDS]}")
    ap.add_argument("--max-side", type=int, default=640, help="longest image side in pixels (COCO: 640)")
    ap.add_argument("--val-fraction", type=float, default=0.2, help="share of samples written to val2017")
    ap.add_argument("--palette", choices=PALETTES, default="any", help="coded: one colour per shape category")
    args = ap.parse_args(argv)
    if args.images < 1 or args.broken < 0 or args.max_side < 32 or not 0 <= args.val_fraction < 1:
        ap.error("need --images >= 1, --broken >= 0, --max-side >= 32, 0 <= --val-fraction < 1")
    if args.broken > args.images:
        ap.error(f"--broken {args.broken} exceeds --images {args.images}")
    rec = generate(args.out, args.images, args.seed, args.broken, args.max_side, args.val_fraction,
                   palette=args.palette)  # fmt: skip
    print(f"wrote {args.images} samples ({rec['splits']}) with {len(rec['planted'])} planted faults to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
