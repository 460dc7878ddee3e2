"""Parquet shards: ``python -m raysal.data.shards ROOT OUT [--rows-per-file R] [--strict]``.

Reads ROOT (a local folder) through the validator (`raysal.data.check.scan`), writes the valid samples as zstd
parquet files ``OUT/<split>/part-00000.parquet`` (DESIGN §2.4) and ``OUT/manifest.json`` (counts, skipped by reason,
tag offsets, categories). OUT is a storage location (a local folder or a URI such as ``s3://bucket/shards``: every
read and write goes through `raysal.storage`). Image and mask bytes are stored exactly as read — masks
stay lossless PNG. Rows are in image-id order and the manifest holds no timestamps, so re-running over the same ROOT
gives identical shards.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq

from raysal import storage
from raysal.data.check import InvalidDataError, SplitReport, enforce, scan
from raysal.data.reader import LayoutError, TagConfig
from raysal.data.sample import Sample
from raysal.data.tags import Span

MANIFEST = "manifest.json"

SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("image", pa.binary()),  # image file bytes as stored (JPEG)
        ("mask", pa.binary()),  # panoptic RGB PNG bytes as stored
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("caption", pa.string()),  # clean caption
        ("span_start", pa.list_(pa.int32())),  # (n_spans,) char offsets into caption
        ("span_end", pa.list_(pa.int32())),  # (n_spans,)
        ("span_segment_ids", pa.list_(pa.list_(pa.int32()))),  # (n_spans, ids per span)
        ("segment_ids", pa.list_(pa.int32())),  # (S,) from segments_info
        ("category_ids", pa.list_(pa.int32())),  # (S,)
        ("iscrowd", pa.list_(pa.int8())),  # (S,)
    ]
)


def sample_to_row(s: Sample) -> dict:
    return {
        "split": s.split,
        "image_id": s.image_id,
        "file_name": s.file_name,
        "image": s.image_bytes,
        "mask": s.mask_bytes,
        "height": s.height,
        "width": s.width,
        "caption": s.caption,
        "span_start": [sp.start for sp in s.spans],
        "span_end": [sp.end for sp in s.spans],
        "span_segment_ids": [list(sp.segment_ids) for sp in s.spans],
        "segment_ids": list(s.segment_ids),
        "category_ids": list(s.category_ids),
        "iscrowd": list(s.iscrowd),
    }


def row_to_sample(row: dict) -> Sample:
    """Inverse of `sample_to_row` (the tag syntax is not stored: spans come back as 'colon')."""
    spans = tuple(
        Span(int(a), int(b), tuple(int(i) for i in ids), "colon")
        for a, b, ids in zip(row["span_start"], row["span_end"], row["span_segment_ids"], strict=True)
    )
    return Sample(
        split=row["split"],
        image_id=int(row["image_id"]),
        file_name=row["file_name"],
        image_bytes=bytes(row["image"]),
        mask_bytes=bytes(row["mask"]),
        height=int(row["height"]),
        width=int(row["width"]),
        caption=row["caption"],
        spans=spans,
        segment_ids=tuple(int(i) for i in row["segment_ids"]),
        category_ids=tuple(int(i) for i in row["category_ids"]),
        iscrowd=tuple(int(i) for i in row["iscrowd"]),
    )


class _SplitWriter:
    """Buffers rows of one split and writes a parquet file every ``rows_per_file`` rows."""

    def __init__(self, out: Path, split: str, rows_per_file: int) -> None:
        self.dir = out / split
        self.rows_per_file = rows_per_file
        self.rows: list[dict] = []
        self.files: list[str] = []
        self.count = 0

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= self.rows_per_file:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"part-{len(self.files):05d}.parquet"
        table = pa.Table.from_pylist(self.rows, schema=SCHEMA)
        pq.write_table(table, path, compression="zstd", row_group_size=self.rows_per_file)
        self.files.append(path.relative_to(self.dir.parent).as_posix())
        self.rows = []


def _split_entry(writer: _SplitWriter | None, report: SplitReport) -> dict:
    return {
        "rows": writer.count if writer else 0,
        "files": writer.files if writer else [],
        "skipped": report.invalid,
        "skipped_by_reason": report.by_reason,
    }


def write_shards(
    root: Path | str,
    out: str | Path,
    *,
    rows_per_file: int = 256,
    splits: list[str] | None = None,
    tags: TagConfig | None = None,
    strict: bool = False,
    workers: int = 1,
) -> dict:
    """Validate the local folder ROOT and write shards of its valid samples to the location OUT; returns the manifest.

    OUT must be missing, empty or earlier shards (a manifest.json): earlier shards are replaced whole, so no stale
    part file survives. A remote OUT is written to a local temporary folder first, then published (`publish_shards`).
    """
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be >= 1, got {rows_per_file}")
    out = str(out)
    if storage.list_names(out) and not storage.is_file(storage.join(out, MANIFEST)):
        raise FileExistsError(f"{out}: exists, is not empty and holds no {MANIFEST}; refusing to overwrite it")
    kwargs = {"rows_per_file": rows_per_file, "splits": splits, "tags": tags, "strict": strict, "workers": workers}
    local = storage.local_path(out)
    if local is not None:  # written in place: no copy of a large dataset
        if local.exists():
            shutil.rmtree(local)
        return _write_local(Path(root), local, **kwargs)
    with tempfile.TemporaryDirectory(prefix="raysal-shards-") as tmp:
        manifest = _write_local(Path(root), Path(tmp) / "shards", **kwargs)
        publish_shards(Path(tmp) / "shards", out)
    return manifest


def _write_local(
    root: Path,
    out: Path,
    *,
    rows_per_file: int,
    splits: list[str] | None,
    tags: TagConfig | None,
    strict: bool,
    workers: int,
) -> dict:
    """`write_shards` into a fresh local folder ``out``; the manifest is written last, after every part file."""
    tags = tags or TagConfig()
    out.mkdir(parents=True)
    writers: dict[str, _SplitWriter] = {}

    def on_sample(s: Sample) -> None:
        if s.split not in writers:
            writers[s.split] = _SplitWriter(out, s.split, rows_per_file)
        writers[s.split].add(sample_to_row(s))

    report = scan(root, splits, tags, workers=workers, on_sample=on_sample)
    enforce(report, strict, what="shards")  # raises in strict mode before a manifest claims success
    for w in writers.values():
        w.flush()
    manifest = {
        "root": str(root),
        "rows_per_file": rows_per_file,
        "tags": report.tags,
        "valid": report.valid,
        "skipped": report.invalid,
        "skipped_by_reason": report.by_reason,
        "splits": {split: _split_entry(writers.get(split), r) for split, r in report.splits.items()},
        "categories": [report.categories[k] for k in sorted(report.categories)],
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def publish_shards(local: Path, out: str, *, replace: bool = True) -> None:
    """Copy the local shard folder ``local`` to the location ``out``, the manifest last: a reader that finds the
    manifest finds every part file it lists (an upload of a folder has no order). ``replace``: remove what ``out``
    held first (earlier shards, replaced whole); False for writers of identical shards that may race (first-use
    synthetic data made on several nodes at once), which then only overwrite objects with the same bytes."""
    if replace:
        storage.delete_file(storage.join(out, MANIFEST))  # first: no reader takes the old manifest for the new parts
        storage.delete_dir(out)
    for split in sorted(p.name for p in local.iterdir() if p.is_dir()):
        storage.upload(local / split, storage.join(out, split))
    storage.write_bytes(storage.join(out, MANIFEST), (local / MANIFEST).read_bytes())


def read_manifest(shard_dir: str | Path) -> dict:
    path = storage.join(str(shard_dir), MANIFEST)
    try:
        return storage.read_json(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no shard manifest (write shards with `python -m raysal.data.shards`)") from e


def _split_names(shard_dir: str, split: str) -> list[str]:
    manifest = read_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise KeyError(f"{storage.join(shard_dir, MANIFEST)}: no split {split!r} (has {sorted(manifest['splits'])})")
    return manifest["splits"][split]["files"]


def shard_files(shard_dir: str | Path, split: str) -> list[str]:
    """The locations of the parquet files of one split, in order, as the manifest lists them (read one with
    ``storage.filesystem(location)``; many with `shard_paths`)."""
    return [storage.join(str(shard_dir), f) for f in _split_names(str(shard_dir), split)]


def shard_paths(shard_dir: str | Path, split: str) -> tuple[pyarrow.fs.FileSystem, list[str]]:
    """(filesystem, the paths in it of one split's parquet files, in order), for readers of many files: one
    filesystem (one object-store client) for all of them, not one per file; ``pq.read_table(path, filesystem=fs)``."""
    names = _split_names(str(shard_dir), split)
    fs, base = storage.filesystem(str(shard_dir))
    return fs, [f"{base.rstrip('/')}/{n}" for n in names]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raysal.data.shards", description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="COCONut root folder (local)")
    ap.add_argument("out", help="shard folder or URI (s3://b/prefix) to write (replaced if it holds earlier shards)")
    ap.add_argument("--rows-per-file", type=int, default=256)
    ap.add_argument("--split", action="append", help="split to shard (repeatable); default: every split found")
    ap.add_argument("--strict", action="store_true", help="fail if any sample is invalid instead of skipping it")
    ap.add_argument("--workers", type=int, default=1, help="processes reading samples")
    ap.add_argument("--colon-offset", type=int, default=TagConfig.colon_offset)
    ap.add_argument("--nocolon-offset", type=int, default=TagConfig.nocolon_offset)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        m = write_shards(
            args.root,
            args.out,
            rows_per_file=args.rows_per_file,
            splits=args.split,
            tags=TagConfig(args.colon_offset, args.nocolon_offset),
            strict=args.strict,
            workers=args.workers,
        )
    except (LayoutError, InvalidDataError, FileExistsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rows = ", ".join(f"{k}: {v['rows']} rows in {len(v['files'])} file(s)" for k, v in m["splits"].items())
    print(f"wrote {args.out}: {rows}; skipped {m['skipped']} {m['skipped_by_reason'] or ''}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
