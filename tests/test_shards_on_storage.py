"""Shards on storage: a local folder, a file:// URI and S3 (moto on 127.0.0.1) are written, checked and read alike —
the shard writer, the preflight, the probe set, the head finder's samples, Ray Data and first-use synthetic data."""

from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysal import storage
from raysal.data.shards import MANIFEST, main, read_manifest, shard_files, shard_paths, write_shards
from raysal.orchestration.train.errors import ConfigError
from raysal.orchestration.train.preflight import check_data

SPLITS = {"train_split": "train2017", "val_split": "val2017"}


def _data(shards: str, **kw) -> dict:
    return {"shards": shards, **SPLITS, "val_holdout": 0.0, "val_max_images": None, "val_min_images": 1, **kw}


@pytest.fixture(scope="module")
def local_shards(clean_root, tmp_path_factory) -> str:
    """The same shards in a plain local folder: what every storage kind must match."""
    out = str(tmp_path_factory.mktemp("local_shards") / "shards")
    write_shards(clean_root, out, rows_per_file=7)
    return out


def _rows(shards: str, split: str) -> list[dict]:
    fs, files = shard_paths(shards, split)
    return [r for f in files for r in pq.read_table(f, filesystem=fs).to_pylist()]


def test_shards_are_written_and_read_on_every_storage(storage_root, clean_root, local_shards):
    loc = storage.join(storage_root, "shards")
    manifest = write_shards(clean_root, loc, rows_per_file=7)
    assert read_manifest(loc) == manifest == read_manifest(local_shards)
    files = shard_files(loc, "train2017")
    assert files == [storage.join(loc, f) for f in manifest["splits"]["train2017"]["files"]] and len(files) > 1
    assert all(storage.is_file(f) for f in files)  # locations, the URI's ?options last
    for split in ("train2017", "val2017"):
        assert _rows(loc, split) == _rows(local_shards, split)
    # earlier shards are replaced whole: no part file of the first run survives
    write_shards(clean_root, loc, rows_per_file=100)
    assert storage.list_names(storage.join(loc, "train2017")) == ["part-00000.parquet"]
    assert _rows(loc, "train2017") == _rows(local_shards, "train2017")


def test_a_foreign_location_is_never_overwritten(storage_root, clean_root, capsys):
    theirs = storage.join(storage_root, "thesis")
    storage.write_text(storage.join(theirs, "thesis.tex"), "precious")
    with pytest.raises(FileExistsError, match=r"is not empty and holds no manifest\.json; refusing"):
        write_shards(clean_root, theirs)
    assert main([str(clean_root), theirs]) == 1 and "refusing to overwrite" in capsys.readouterr().err
    assert storage.list_names(theirs) == ["thesis.tex"]


def test_the_cli_writes_to_a_uri(s3_server, clean_root, capsys):
    loc = s3_server.new_prefix()
    assert main([str(clean_root), loc, "--rows-per-file", "10", "--split", "val2017"]) == 0
    assert "val2017: 6 rows" in capsys.readouterr().out
    assert len(_rows(loc, "val2017")) == 6


def test_preflight_counts_the_same_images_on_every_storage(storage_root, clean_root, local_shards):
    loc = storage.join(storage_root, "shards")
    write_shards(clean_root, loc, rows_per_file=7)
    assert check_data(_data(loc), 2) == check_data(_data(local_shards), 2)
    held = {"val_split": "train2017", "val_holdout": 0.3}
    assert check_data(_data(loc, **held), 1) == check_data(_data(local_shards, **held), 1)
    with pytest.raises(ConfigError, match=r"data.val_split='nope': no such split in .*manifest.json"):
        check_data(_data(loc, val_split="nope"), 1)


def test_a_broken_shard_is_the_same_clear_error_on_every_storage(storage_root, clean_root):
    loc = storage.join(storage_root, "shards")
    with pytest.raises(ConfigError, match=r"data.shards=.*: no manifest.json\. Write shards"):
        check_data(_data(loc), 1)
    write_shards(clean_root, loc, rows_per_file=7)
    part = storage.join(loc, "train2017", "part-00001.parquet")
    whole = storage.read_bytes(part)
    storage.write_bytes(part, whole[:3000])
    with pytest.raises(ConfigError, match=r"train2017/part-00001\.parquet(\?.*)?: not a readable parquet file"):
        check_data(_data(loc), 1)
    storage.delete_file(part)
    with pytest.raises(ConfigError, match=r"train2017/part-00001\.parquet(\?.*)?: listed in manifest.json but missing"):
        check_data(_data(loc), 1)


def test_probes_and_head_finder_samples_read_a_uri(s3_server, clean_root, local_shards, tiny_llava):
    from raysal.model.build import load_processor
    from raysal.orchestration.train.head_finder import validation_samples
    from raysal.probes.probe_set import select_probes

    loc = s3_server.new_prefix()
    write_shards(clean_root, loc, rows_per_file=7)
    for split, holdout in (("val2017", 0.0), ("train2017", 0.3)):
        got = select_probes(loc, split, holdout=holdout, images=3, phrases=2)
        assert got and got == select_probes(local_shards, split, holdout=holdout, images=3, phrases=2)
    processor = load_processor(str(tiny_llava))
    prompt = {"prompt": "Describe the image."}
    remote = validation_samples(_data(loc, **prompt), processor, 3)
    local = validation_samples(_data(local_shards, **prompt), processor, 3)
    assert len(remote) == len(local) == 3
    for a, b in zip(remote, local, strict=True):
        assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def _synthetic(shards: str, root) -> dict:
    return {"shards": shards, **SPLITS, "synthetic": {"root": str(root), "images": 10, "seed": 3, "max_side": 64}}


def test_first_use_synthetic_shards_are_written_to_a_uri(s3_server, tmp_path, monkeypatch):
    from raysal.data import synthetic
    from raysal.orchestration.train.assets import ensure_data

    data = _synthetic(s3_server.new_prefix(), tmp_path / "root")
    ensure_data(data)
    manifest = read_manifest(data["shards"])
    assert manifest["valid"] == 10 and all(storage.is_file(f) for f in shard_files(data["shards"], "train2017"))
    assert check_data(data | {"val_holdout": 0.0, "val_max_images": None, "val_min_images": 1}, 1).val_images == 2

    def boom(*a, **k):
        raise AssertionError("generated again")

    monkeypatch.setattr(synthetic, "generate", boom)
    ensure_data(data)  # present: one existence check, nothing made

    theirs = s3_server.new_prefix()
    storage.write_text(storage.join(theirs, "keep.txt"), "someone's data")
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        ensure_data(_synthetic(theirs, tmp_path / "root2"))
    assert storage.list_names(theirs) == ["keep.txt"]


def test_first_use_tiny_model_is_written_whole(tmp_path, s3_server):
    from raysal.orchestration.train.assets import ensure_model

    out = tmp_path / "tiny" / "llava"
    (out).mkdir(parents=True)
    (out / "half.bin").write_bytes(b"left by an interrupted writer")
    ensure_model({"tiny": "llava", "name_or_path": str(out)})
    assert (out / "config.json").is_file() and not (out / "half.bin").exists()
    assert [p.name for p in out.parent.iterdir() if ".tmp-" in p.name] == []
    # a checkpoint an older raysal wrote (no answer tokens, no stamp) is written again, not loaded
    from raysal.model.tiny import STAMP

    (out / STAMP).unlink()
    ensure_model({"tiny": "llava", "name_or_path": str(out)})
    tokens = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    assert (out / STAMP).is_file() and {"Yes", "No"} <= {t["content"] for t in tokens}
    with pytest.raises(ConfigError, match=r"model\.name_or_path=s3://.*: a tiny model .* local folder, not a URI"):
        ensure_model({"tiny": "llava", "name_or_path": s3_server.uri("tiny")})


@pytest.mark.integration
def test_ray_data_reads_a_uri_and_makes_first_use_data_in_its_read_tasks(s3_server, ray_local, tmp_path, clean_root):
    from raysal.data.ray_dataset import coconut_dataset
    from raysal.orchestration.train.assets import ensure_data

    loc = s3_server.new_prefix()
    write_shards(clean_root, loc, rows_per_file=7)
    rows = coconut_dataset(loc, "train2017", decode=False).take_all()
    assert sorted(r["image_id"] for r in rows) == sorted(r["image_id"] for r in _rows(loc, "train2017"))

    # the read tasks make the synthetic data: build the dataset (the driver makes the data to plan it), empty
    # the cache, then read — as on a node that has never seen it
    data = _synthetic(str(tmp_path / "cache" / "shards"), tmp_path / "cache" / "root")
    ds = coconut_dataset(data["shards"], "val2017", decode=False, prepare=functools.partial(ensure_data, data))
    expected = sorted(r["image_id"] for r in _rows(data["shards"], "val2017"))
    shutil.rmtree(tmp_path / "cache")
    assert sorted(r["image_id"] for r in ds.take_all()) == expected
    assert storage.is_file(storage.join(data["shards"], MANIFEST))
