"""The storage layer on a local folder, a file:// URI and S3 (moto on 127.0.0.1): the same calls, the same results."""

from __future__ import annotations

import json
import pickle
import threading
from pathlib import Path

import pytest

from raysal import storage


def test_join_keeps_a_uri_whole_and_its_options_last():
    assert storage.join("s3://b/p", "x", "y.json") == "s3://b/p/x/y.json"  # Path() would make it s3:/b/p/...
    uri = "s3://b/p?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join(uri, "trials", "t1") == "s3://b/p/trials/t1?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.name(storage.join(uri, "trials", "t1")) == "t1"
    assert storage.join("/a/b/", "c") == "/a/b/c"


def test_files_folders_and_copies_behave_alike(storage_root, tmp_path):
    root = storage_root
    assert not storage.exists(root) or storage.list_names(root) == []
    storage.write_json(storage.join(root, "s", "summary.json"), {"a": 1})
    assert storage.read_json(storage.join(root, "s", "summary.json")) == {"a": 1}
    assert storage.is_dir(storage.join(root, "s")) and storage.is_file(storage.join(root, "s", "summary.json"))
    assert storage.list_names(storage.join(root, "s")) == ["summary.json"]
    assert storage.list_names(storage.join(root, "nothing")) == []
    storage.append_line(storage.join(root, "log.jsonl"), json.dumps({"n": 1}))
    storage.append_line(storage.join(root, "log.jsonl"), json.dumps({"n": 2}))
    assert [json.loads(x)["n"] for x in storage.read_text(storage.join(root, "log.jsonl")).splitlines()] == [1, 2]

    local = tmp_path / "folder"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "a.bin").write_bytes(b"\0\1" * 1000)
    (local / "b.txt").write_text("b")
    storage.upload(local, storage.join(root, "copy"))
    assert storage.list_names(storage.join(root, "copy")) == ["b.txt", "sub"]
    assert storage.list_names(storage.join(root, "copy"), dirs=True) == ["sub"]
    back = storage.download(storage.join(root, "copy"), tmp_path / "back")
    assert (back / "sub" / "a.bin").read_bytes() == b"\0\1" * 1000 and (back / "b.txt").read_text() == "b"
    with storage.local_copy(storage.join(root, "copy", "b.txt")) as p:
        assert p.read_text() == "b"
    storage.replace_dir(local / "sub", storage.join(root, "copy"))  # what was there before is gone
    assert storage.list_names(storage.join(root, "copy")) == ["a.bin"]
    storage.delete_dir(storage.join(root, "copy"))
    assert not storage.exists(storage.join(root, "copy"))
    storage.delete_file(storage.join(root, "log.jsonl"))
    assert not storage.is_file(storage.join(root, "log.jsonl"))


def test_a_relative_location_is_made_absolute_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("runs/criteria") == str(tmp_path / "runs" / "criteria")
    assert storage.absolute("file:///a/b") == "file:///a/b"
    uri = "s3://bucket/x?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.absolute(uri) == uri
    assert storage.absolute("~/runs") == str(Path.home() / "runs")


def test_a_reader_never_sees_half_a_file(storage_root):
    """Rewritten while read: every read is one whole version."""
    path = storage.join(storage_root, "state.json")
    versions = [json.dumps({"v": i, "pad": "x" * 200_000}) for i in range(8)]
    storage.write_text(path, versions[0])
    seen, stop = [], threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(storage.read_text(path))

    t = threading.Thread(target=read)
    t.start()
    for v in versions[1:]:
        storage.write_text(path, v)
    stop.set()
    t.join()
    assert seen and all(s in versions for s in seen)


def test_local_paths_are_told_from_remote_ones(tmp_path, s3_server):
    assert storage.local_path(str(tmp_path)) == tmp_path
    assert storage.local_path(tmp_path.as_uri()) == tmp_path
    assert storage.local_path(s3_server.uri("x")) is None
    assert storage.same_place(tmp_path, tmp_path.as_uri())


def test_an_unreachable_store_is_an_error_not_a_silent_empty_folder(s3_server):
    path = storage.join(s3_server.new_prefix(), "a.json")
    storage.write_json(path, {"a": 1})
    with s3_server.outage(), pytest.raises(OSError):
        storage.read_json(path)
    assert storage.read_json(path) == {"a": 1}  # back after the outage


def test_locations_pickle_as_plain_strings(storage_root):
    assert pickle.loads(pickle.dumps(storage.join(storage_root, "x"))) == storage.join(storage_root, "x")


def test_no_feature_is_switched_off_for_uris():
    """Only the storage layer tells a URI from a local path (and Ray's absolute-path normalisation in spec.py);
    nothing else may branch on it, nor build a ``Path`` from a storage location by string surgery."""
    from pathlib import Path

    import raysal

    root = Path(raysal.__file__).parent
    allowed = {root / "storage.py"}
    offenders = [
        f"{p.relative_to(root)}:{i}"
        for p in root.rglob("*.py")
        if p not in allowed
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "is_uri(" in line or '"://" in' in line
    ]
    assert offenders == [], offenders


def test_the_test_proxy_frees_its_connections(s3_server):
    """The S3 proxy of the cluster fixture runs in the test process for the whole session: every request through
    it must give its descriptors back (a leak ended the slow suite with 'Too many open files')."""
    import os
    import time

    path = storage.join(s3_server.new_prefix(), "a.json")
    storage.write_json(path, {"a": 1})
    storage.read_json(path)
    time.sleep(1)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(200):
        # a fresh filesystem each time: a new connection
        storage.read_json(path)
    time.sleep(2)
    assert len(os.listdir("/proc/self/fd")) < before + 20
