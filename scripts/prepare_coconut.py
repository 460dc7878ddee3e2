"""Fetch COCONut into raysal's on-disk layout, then shard it.

    python scripts/prepare_coconut.py --out /data/coconut --shards /data/coconut_shards

Steps (each resumable: finished files are kept and skipped on a re-run):
1. COCONut-S masks + segments_info: Hugging Face dataset ``xdeng77/coconut_s`` (parquet, ~820 MB).
2. PanCap captions: ``xdeng77/coconut_pancap`` (``caption_train2017.tar``) or, with ``--captions pancap_50k``,
   ``xdeng77/coconut_pancap_50k`` (``coconut_pancap_50k.tar``).
3. Conversion into ``ROOT/annotations``, ``ROOT/panoptic_train2017_masks``, ``ROOT/panoptic_train2017_captions``.
4. COCO 2017 images, one file per image from images.cocodataset.org, only for captioned images, in parallel,
   with HTTP range resume and a progress bar.
5. Validation + parquet shards (``--shards OUT``), exactly as ``python -m raysal.data.shards``.

Offline use: ``--coconut-parquet DIR`` and ``--captions-tar FILE`` take local copies and skip steps 1–2;
``--skip-images`` skips step 4 (images already under ROOT/images/train2017).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from raysal.data.convert import convert_captions_tar, convert_panoptic_rows
from raysal.data.layout import Layout
from raysal.data.shards import write_shards

log = logging.getLogger("prepare_coconut")

COCONUT_S = "xdeng77/coconut_s"
CAPTIONS = {
    "pancap": ("xdeng77/coconut_pancap", "caption_train2017.tar"),
    "pancap_50k": ("xdeng77/coconut_pancap_50k", "coconut_pancap_50k.tar"),
}
COCO_IMAGES = "http://images.cocodataset.org/{split}/{file_name}"
SPLIT = "train2017"  # PanCap captions exist for COCO train2017 only


def download_hf(out: Path, captions: str) -> tuple[list[Path], Path]:
    """Steps 1–2: huggingface_hub resumes partial files and shows progress bars."""
    from huggingface_hub import hf_hub_download, snapshot_download

    cache = out / "_downloads"
    local = Path(
        snapshot_download(
            COCONUT_S, repo_type="dataset", allow_patterns=["data/*.parquet"], local_dir=cache / "coconut_s"
        )
    )
    repo, filename = CAPTIONS[captions]
    tar = Path(hf_hub_download(repo, filename, repo_type="dataset", local_dir=cache / captions))
    return sorted(local.glob("data/*.parquet")), tar


def fetch(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming a partial file with an HTTP Range request."""
    if dest.exists():
        return
    part = dest.with_suffix(dest.suffix + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        mode = "ab" if have and resp.status == 206 else "wb"  # 200 = server ignored the range: start over
        with open(part, mode) as f:
            while chunk := resp.read(1 << 16):
                f.write(chunk)
    part.rename(dest)


def download_images(root: Path, workers: int) -> int:
    """Step 4: every image named in the panoptic JSON that has a caption; returns how many failed."""
    lay = Layout(root, SPLIT)
    data = json.loads(lay.annotations_json.read_text())
    todo = [
        im
        for im in data["images"]
        if lay.caption_path(int(im["id"])).exists() and not (lay.images_dir / im["file_name"]).exists()
    ]
    lay.images_dir.mkdir(parents=True, exist_ok=True)
    failed = 0

    def one(im: dict) -> str | None:
        url = im.get("coco_url") or COCO_IMAGES.format(split=SPLIT, file_name=im["file_name"])
        try:
            fetch(url, lay.images_dir / im["file_name"])
        except OSError as e:
            return f"{url}: {e}"
        return None

    with ThreadPoolExecutor(workers) as pool:
        for err in tqdm(pool.map(one, todo), total=len(todo), desc="COCO images", unit="img"):
            if err:
                failed += 1
                log.warning("download failed (re-run to retry): %s", err)
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="COCONut root to write")
    ap.add_argument("--shards", type=Path, help="also write parquet shards here")
    ap.add_argument("--captions", choices=sorted(CAPTIONS), default="pancap")
    ap.add_argument("--coconut-parquet", type=Path, help="local folder of COCONut-S parquet files (skip download)")
    ap.add_argument("--captions-tar", type=Path, help="local PanCap caption tar (skip download)")
    ap.add_argument("--categories", type=Path, help="JSON list of categories (default: the 133 COCO panoptic ones)")
    ap.add_argument("--skip-images", action="store_true", help="do not download COCO images")
    ap.add_argument("--workers", type=int, default=16, help="parallel image downloads")
    ap.add_argument("--rows-per-file", type=int, default=256)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    if (args.coconut_parquet is None) != (args.captions_tar is None):
        ap.error("give both --coconut-parquet and --captions-tar (offline), or neither (download)")
    if args.coconut_parquet is not None:
        parquet = sorted(args.coconut_parquet.glob("**/*.parquet"))
        if not parquet:
            ap.error(f"--coconut-parquet {args.coconut_parquet}: no .parquet files")
        tar = args.captions_tar
    else:
        parquet, tar = download_hf(args.out, args.captions)

    categories = json.loads(args.categories.read_text()) if args.categories else None
    stats = convert_panoptic_rows(parquet, args.out, SPLIT, categories=categories)
    log.info("panoptic rows: %s", stats.summary())
    stats = convert_captions_tar(tar, args.out, SPLIT)
    log.info("captions: %s", stats.summary())
    if not args.skip_images:
        failed = download_images(args.out, args.workers)
        if failed:
            log.error("%d image(s) failed to download; re-run the same command to resume", failed)
            return 1
    if args.shards:
        m = write_shards(args.out, args.shards, rows_per_file=args.rows_per_file, splits=[SPLIT])
        log.info("shards: %d rows, skipped %d %s", m["valid"], m["skipped"], m["skipped_by_reason"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
