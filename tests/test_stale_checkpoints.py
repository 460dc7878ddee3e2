"""Checkpoint folders written after Ray's last snapshot (a kill in between) are removed before a resume."""

from __future__ import annotations

import json

from raysal.orchestration.train.stale_checkpoints import SNAPSHOT, remove_stale_checkpoints


def _snapshot(names: list[str], latest: str | None) -> dict:
    # the shape of Ray 2.60's checkpoint_manager_snapshot.json (only the keys read)
    results = [{"version": 0, "checkpoint_dir_name": n, "metrics": {"train/step": 2.0}} for n in names]
    return {
        "ray_version": "2.60.0",
        "checkpoint_results": results,
        "latest_checkpoint_result": {"version": 0, "checkpoint_dir_name": latest, "metrics": {}} if latest else None,
    }


def test_unlisted_checkpoint_folders_are_removed(tmp_path):
    for name in ("checkpoint_a", "checkpoint_b", "checkpoint_c", "best_adapter"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.pt").write_bytes(b"x")
    (tmp_path / SNAPSHOT).write_text(json.dumps(_snapshot(["checkpoint_a"], "checkpoint_b")))
    assert remove_stale_checkpoints(str(tmp_path)) == ["checkpoint_c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_adapter", "checkpoint_a", "checkpoint_b", SNAPSHOT]
    assert remove_stale_checkpoints(str(tmp_path)) == []


def test_without_a_snapshot_every_checkpoint_folder_is_stale(tmp_path):
    (tmp_path / "checkpoint_x").mkdir()
    assert remove_stale_checkpoints(str(tmp_path)) == ["checkpoint_x"]
    assert remove_stale_checkpoints(str(tmp_path / "not_there")) == []


def test_uri_storage(tmp_path):
    (tmp_path / "checkpoint_x").mkdir()
    (tmp_path / SNAPSHOT).write_text(json.dumps(_snapshot([], None)))
    assert remove_stale_checkpoints(f"file://{tmp_path}") == ["checkpoint_x"]
