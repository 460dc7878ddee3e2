from __future__ import annotations

import os
from pathlib import Path

import pytest

from raysal.data.synthetic import BROKEN_KINDS, generate


@pytest.fixture(scope="session")
def clean_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 valid synthetic samples (train + val), small images to keep tests fast."""
    root = tmp_path_factory.mktemp("clean") / "coconut"
    generate(root, images=30, seed=11, broken=0, max_side=192)
    return root


@pytest.fixture(scope="session")
def broken_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One planted fault of every kind the generator knows, plus valid samples."""
    root = tmp_path_factory.mktemp("broken") / "coconut"
    generate(root, images=len(BROKEN_KINDS) + 12, seed=5, broken=len(BROKEN_KINDS), max_side=160)
    return root


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray for integration tests: 2 CPUs, no dashboard, shut down at the end of the session."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()
