import hashlib
import json

import pyarrow.parquet as pq
import pytest

from raysal.data.check import InvalidDataError, scan
from raysal.data.shards import MANIFEST, main, read_manifest, row_to_sample, sample_to_row, shard_files, write_shards
from raysal.data.synthetic import BROKEN_KINDS


def read_rows(shard_dir, split):
    return [row for f in shard_files(shard_dir, split) for row in pq.read_table(f).to_pylist()]


def test_round_trip_bytes_equal(tmp_path, broken_root):
    out = tmp_path / "shards"
    manifest = write_shards(broken_root, out, rows_per_file=4)
    expected = []
    scan(broken_root, on_sample=expected.append)
    got = [row_to_sample(r) for split in ("train2017", "val2017") for r in read_rows(out, split)]
    assert [(s.split, s.image_id) for s in got] == [(s.split, s.image_id) for s in expected]
    for s_in, s_out in zip(expected, got, strict=True):
        assert s_out.image_bytes == s_in.image_bytes and s_out.mask_bytes == s_in.mask_bytes
        assert sample_to_row(s_out) == sample_to_row(s_in)
    # bytes are the files on disk, not re-encoded
    first = got[0]
    assert first.image_bytes == (broken_root / "images" / first.split / first.file_name).read_bytes()
    mask_file = broken_root / f"panoptic_{first.split}_masks" / f"{first.image_id:012d}.png"
    assert first.mask_bytes == mask_file.read_bytes()
    # manifest: counts and skipped by reason
    assert manifest["valid"] == len(expected) == 12
    assert manifest["skipped"] == len(BROKEN_KINDS)
    assert manifest["skipped_by_reason"] == {r.value: 1 for _, r in BROKEN_KINDS}
    assert sum(v["rows"] for v in manifest["splits"].values()) == 12
    assert all(len(pq.read_table(f)) <= 4 for f in shard_files(out, "train2017"))
    assert json.loads((out / MANIFEST).read_text()) == read_manifest(out)


def _digest(d):
    return {
        p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*") if p.is_file()
    }


def test_rerun_gives_identical_shards(tmp_path, clean_root):
    a, b = tmp_path / "a", tmp_path / "b"
    write_shards(clean_root, a, rows_per_file=7)
    write_shards(clean_root, b, rows_per_file=7, workers=2)
    first = _digest(a)
    write_shards(clean_root, a, rows_per_file=7)  # over an existing shard folder
    assert _digest(a) == first
    assert {k: v for k, v in _digest(b).items() if k != MANIFEST} == {k: v for k, v in first.items() if k != MANIFEST}


def test_strict_fails_and_writes_no_manifest(tmp_path, broken_root):
    out = tmp_path / "strict"
    with pytest.raises(InvalidDataError, match="invalid sample"):
        write_shards(broken_root, out, strict=True)
    assert not (out / MANIFEST).exists()


def test_refuses_to_overwrite_a_foreign_folder(tmp_path, clean_root):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="refusing"):
        write_shards(clean_root, out)
    assert main([str(clean_root), str(out)]) == 1
    assert (out / "thesis.tex").exists()


def test_cli_and_split_lookup(tmp_path, clean_root, capsys):
    out = tmp_path / "cli"
    assert main([str(clean_root), str(out), "--rows-per-file", "10", "--split", "val2017"]) == 0
    assert "val2017: 6 rows" in capsys.readouterr().out
    assert len(read_rows(out, "val2017")) == 6
    with pytest.raises(KeyError, match="no split 'train2017'"):
        shard_files(out, "train2017")
