import json
import shutil

import pytest

from raysal.data.check import InvalidDataError, enforce, main, scan
from raysal.data.reader import LayoutError, Reason, TagConfig
from raysal.data.synthetic import BROKEN_KINDS, generate


def test_acceptance_50_samples_5_planted(tmp_path, capsys):
    root = tmp_path / "s"
    generate(root, images=50, seed=3, broken=5)
    assert main([str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] == 45 and report["invalid"] == 5
    planted = json.loads((root / "synthetic.json").read_text())["planted"]
    got = sorted((p["image_id"], p["reason"]) for p in report["problems"])
    assert got == sorted((p["image_id"], p["reason"]) for p in planted)
    assert report["by_reason"] == {r.value: 1 for _, r in BROKEN_KINDS[:5]}
    assert all(p["file"] and p["message"] and "\n" not in p["message"] for p in report["problems"])


def test_every_reason_is_found_exactly_where_planted(broken_root):
    report = scan(broken_root)
    planted = json.loads((broken_root / "synthetic.json").read_text())["planted"]
    assert len(planted) == len(BROKEN_KINDS)
    got = sorted((p["image_id"], p["reason"]) for p in report.problems)
    assert got == sorted((p["image_id"], p["reason"]) for p in planted)
    assert report.invalid == len(BROKEN_KINDS) and report.valid == 12
    # the file named is the one at fault
    by_reason = {p["reason"]: p for p in report.problems}
    assert by_reason["mask_unreadable"]["file"].startswith("panoptic_")
    assert by_reason["mask_unreadable"]["file"].endswith(".png")
    assert by_reason["image_unreadable"]["file"].startswith("images/")
    assert by_reason["image_missing"]["file"].startswith("images/")
    assert by_reason["caption_not_utf8"]["file"].endswith(".txt")
    assert by_reason["caption_orphan"]["file"].endswith(".txt")
    assert set(by_reason) == {r.value for _, r in BROKEN_KINDS}


def test_segments_info_problems(tmp_path, clean_root):
    root = tmp_path / "c"
    shutil.copytree(clean_root, root)
    ann_path = root / "annotations" / "panoptic_train2017.json"
    data = json.loads(ann_path.read_text())
    a0, a1 = data["annotations"][0], data["annotations"][1]
    a0["segments_info"].append(dict(a0["segments_info"][0]))  # duplicate id
    a1["segments_info"][0]["category_id"] = 9999  # unknown category
    ann_path.write_text(json.dumps(data))
    report = scan(root, ["train2017"])
    got = {p["image_id"]: p["reason"] for p in report.problems}
    assert got == {a0["image_id"]: Reason.SEGMENTS_INFO_INVALID.value, a1["image_id"]: "segments_info_invalid"}
    assert "duplicate" in report.problems[0]["message"] or "duplicate" in report.problems[1]["message"]


def test_tag_offsets_change_the_verdict(clean_root):
    assert scan(clean_root).invalid == 0
    # the reference repo's convention (+1 on every id) sends the last tag of each caption past segments_info
    shifted = scan(clean_root, tags=TagConfig(colon_offset=1, nocolon_offset=1))
    assert shifted.invalid > 0 and set(shifted.by_reason) <= {"tag_unknown_id"}


def test_strict_exit_code_and_enforce(broken_root, clean_root, capsys):
    assert main([str(broken_root)]) == 0
    out = capsys.readouterr().out
    assert "tag_void" in out and f"{len(BROKEN_KINDS)} invalid" in out
    assert main([str(broken_root), "--strict"]) == 1
    assert main([str(clean_root), "--strict"]) == 0
    with pytest.raises(InvalidDataError, match="invalid sample"):
        enforce(scan(broken_root), strict=True)


def test_parallel_scan_matches_serial(broken_root):
    serial, parallel = scan(broken_root), scan(broken_root, workers=2)
    assert parallel.to_json() == serial.to_json()


def test_layout_errors_name_the_file(tmp_path, capsys):
    with pytest.raises(LayoutError, match="no annotations"):
        scan(tmp_path)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "panoptic_train2017.json").write_text("{not json")
    with pytest.raises(LayoutError, match=r"panoptic_train2017\.json: not valid JSON"):
        scan(tmp_path)
    assert main([str(tmp_path)]) == 2
    assert "panoptic_train2017.json" in capsys.readouterr().err
