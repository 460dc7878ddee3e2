"""raysal/orchestration/ray_fixes.py: each workaround does its job, and a test shows Ray still needs it."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from raysal.orchestration.ray_fixes import ray_address


def _record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    """What `ray start` leaves on a host: $RAY_TMPDIR/ray/ray_current_cluster naming the head's GCS."""
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(address)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _closed_port() -> int:
    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_itself_still_joins_a_recorded_cluster_that_is_gone(tmp_path, monkeypatch):
    """Ray 2.60's own resolution of a plain ``ray.init()``: the record of a dead head is its address. When this
    fails, Ray checks liveness itself and `ray_address` can go."""
    from ray._private.services import canonicalize_bootstrap_address

    _record(tmp_path, monkeypatch, f"127.0.0.1:{_closed_port()}")
    assert canonicalize_bootstrap_address(None) is not None


def test_a_stale_record_starts_a_local_ray_and_says_why(tmp_path, monkeypatch, caplog):
    dead = f"127.0.0.1:{_closed_port()}"
    _record(tmp_path, monkeypatch, dead)
    with caplog.at_level(logging.WARNING, logger="raysal.orchestration.ray_fixes"):
        assert ray_address() == "local"
    assert dead in caplog.text and "ray stop" in caplog.text


def test_a_live_recorded_cluster_is_joined(tmp_path, monkeypatch):
    with socket.socket() as server:  # a GCS port that answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        live = f"127.0.0.1:{server.getsockname()[1]}"
        _record(tmp_path, monkeypatch, live)
        assert ray_address() == live


def test_ray_address_wins_and_no_record_means_local(tmp_path, monkeypatch):
    _record(tmp_path, monkeypatch, f"127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_address() == "10.0.0.1:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    (tmp_path / "ray" / "ray_current_cluster").unlink()
    assert ray_address() == "local"
