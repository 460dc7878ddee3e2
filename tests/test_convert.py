"""The HF-row → layout conversion, on rows written here in the upstream row format."""

import io
import json
import runpy
import shutil
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysal.data.check import scan
from raysal.data.convert import coco_panoptic_categories, convert_captions_tar, convert_panoptic_rows
from raysal.data.shards import read_manifest

ROW_SCHEMA = pa.schema(
    [
        ("mask", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        (
            "image_info",
            pa.struct(
                [
                    ("coco_url", pa.string()),
                    ("date_captured", pa.string()),
                    ("file_name", pa.string()),
                    ("height", pa.int64()),
                    ("id", pa.int64()),
                    ("license", pa.int64()),
                    ("width", pa.int64()),
                ]
            ),
        ),
        (
            "segments_info",
            pa.struct(
                [
                    ("file_name", pa.string()),
                    ("image_id", pa.int64()),
                    (
                        "segments_info",
                        pa.list_(
                            pa.struct(
                                [
                                    ("area", pa.int64()),
                                    ("category_id", pa.int64()),
                                    ("id", pa.int64()),
                                    ("iscrowd", pa.int64()),
                                    ("isthing", pa.int64()),
                                ]
                            )
                        ),
                    ),
                ]
            ),
        ),
    ]
)


def hf_rows_from(root, split="train2017"):
    """Rows shaped like xdeng77/coconut_s, made from a synthetic root."""
    data = json.loads((root / "annotations" / f"panoptic_{split}.json").read_text())
    images = {im["id"]: im for im in data["images"]}
    rows = []
    for ann in data["annotations"]:
        im = images[ann["image_id"]]
        rows.append(
            {
                "mask": {"bytes": (root / f"panoptic_{split}_masks" / ann["file_name"]).read_bytes(), "path": None},
                "image_info": {
                    "coco_url": None,
                    "date_captured": "2013-11-14 16:28:13",
                    "file_name": im["file_name"],
                    "height": im["height"],
                    "id": im["id"],
                    "license": 1,
                    "width": im["width"],
                },
                "segments_info": {
                    "file_name": ann["file_name"],
                    "image_id": ann["image_id"],
                    "segments_info": ann["segments_info"],
                },
            }
        )
    return rows


def write_caption_tar(root, path, split="train2017"):
    with tarfile.open(path, "w") as tar:
        for p in sorted((root / f"panoptic_{split}_captions").glob("*.txt")):
            data = p.read_bytes()
            info = tarfile.TarInfo(f"caption_train2017/{p.name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        junk = tarfile.TarInfo("caption_train2017/README.md")
        junk.size = 2
        tar.addfile(junk, io.BytesIO(b"hi"))


def test_categories_are_coco_panoptic():
    cats = coco_panoptic_categories()
    assert len(cats) == 133 and sum(c["isthing"] for c in cats) == 80
    assert cats[0] == {"id": 1, "name": "person", "supercategory": "person", "isthing": 1}


def test_rows_and_tar_convert_to_the_same_samples(tmp_path, clean_root):
    rows = hf_rows_from(clean_root)
    half = len(rows) // 2
    files = [tmp_path / "train-00000-of-00002.parquet", tmp_path / "train-00001-of-00002.parquet"]
    pq.write_table(pa.Table.from_pylist(rows[:half], schema=ROW_SCHEMA), files[0])
    bad = dict(rows[0], mask={"bytes": None, "path": None})
    pq.write_table(pa.Table.from_pylist([*rows[half:], bad], schema=ROW_SCHEMA), files[1])
    tar = tmp_path / "caption_train2017.tar"
    write_caption_tar(clean_root, tar)

    out = tmp_path / "converted"
    cats = json.loads((clean_root / "annotations" / "panoptic_train2017.json").read_text())["categories"]
    stats = convert_panoptic_rows(files, out, "train2017", categories=cats, batch_size=5)
    assert stats.written == len(rows) and dict(stats.skipped) == {"row_without_mask_bytes": 1}
    cstats = convert_captions_tar(tar, out, "train2017")
    assert cstats.written == len(rows) and dict(cstats.skipped) == {"not_txt:.md": 1}
    shutil.copytree(clean_root / "images" / "train2017", out / "images" / "train2017")

    want, got = [], []
    scan(clean_root, ["train2017"], on_sample=want.append)
    report = scan(out, ["train2017"], on_sample=got.append)
    assert report.invalid == 0
    assert got == want


def test_missing_columns_name_the_file(tmp_path):
    f = tmp_path / "other.parquet"
    pq.write_table(pa.table({"image": [b"x"]}), f)
    with pytest.raises(ValueError, match=r"other\.parquet.*missing columns"):
        convert_panoptic_rows([f], tmp_path / "out", "train2017")


def test_prepare_script_offline(tmp_path, clean_root, monkeypatch):
    pq_dir = tmp_path / "hf" / "data"
    pq_dir.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(hf_rows_from(clean_root), schema=ROW_SCHEMA), pq_dir / "train-0.parquet")
    tar = tmp_path / "caption_train2017.tar"
    write_caption_tar(clean_root, tar)
    out, shards = tmp_path / "root", tmp_path / "shards"
    shutil.copytree(clean_root / "images" / "train2017", out / "images" / "train2017")
    argv = [
        "prepare_coconut.py",
        "--out",
        str(out),
        "--shards",
        str(shards),
        "--coconut-parquet",
        str(tmp_path / "hf"),
        "--captions-tar",
        str(tar),
        "--skip-images",
    ]
    cats = tmp_path / "categories.json"
    cats.write_text(
        json.dumps(json.loads((clean_root / "annotations" / "panoptic_train2017.json").read_text())["categories"])
    )

    def run(*extra):
        monkeypatch.setattr(sys, "argv", [*argv, *extra])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path("scripts/prepare_coconut.py", run_name="__main__")
        return exit_info.value.code, read_manifest(shards)

    code, manifest = run("--categories", str(cats))
    assert code == 0 and manifest["splits"]["train2017"]["rows"] == 24 and manifest["skipped"] == 0
    # default: the real 133 COCO categories, where the synthetic stuff ids (101..105) do not exist → all flagged
    code, manifest = run()
    assert code == 0 and len(manifest["categories"]) == 133
    assert manifest["skipped_by_reason"] == {"segments_info_invalid": 24}
