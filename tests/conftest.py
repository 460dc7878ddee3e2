from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from raysal.data.synthetic import BROKEN_KINDS, generate

# no hub is reachable from the test machines: a hub id's config lookup fails at once instead of retrying for ~30 s
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for integration tests: 2 CPUs, no dashboard, shut down at the end of the module (a module that
    starts a Ray of its own, `test_placement_groups.py`, must find none running)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from raysal.model.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny") / "llava", "llava")


@pytest.fixture(scope="session")
def tiny_next(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from raysal.model.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny") / "llava_next", "llava_next")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Qwen2.5-VL and Qwen3-VL checkpoints, by model_type."""
    from raysal.model.tiny import write_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {arch: write_tiny(root / arch, arch) for arch in ("qwen2_5_vl", "qwen3_vl")}


@pytest.fixture
def tiny_of(request: pytest.FixtureRequest) -> Callable[[str], Path]:
    """The tiny checkpoint of a model_type (llava, llava_next, qwen2_5_vl, qwen3_vl), made once a session."""

    def get(arch: str) -> Path:
        if arch in ("qwen2_5_vl", "qwen3_vl"):
            return request.getfixturevalue("tiny_qwen")[arch]
        return request.getfixturevalue({"llava": "tiny_llava", "llava_next": "tiny_next"}[arch])

    return get


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of 40 small synthetic samples (32 train / 8 val) for model-side tests."""
    from raysal.data.shards import write_shards

    base = tmp_path_factory.mktemp("small")
    generate(base / "root", images=40, seed=2, max_side=320)
    write_shards(base / "root", base / "shards")
    return base / "shards"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("raysal_cache")


@pytest.fixture(scope="module")
def single_split(tmp_path_factory) -> Path:
    """COCONut-format data laid out as PanCap ships it: one split (train2017), 900 small images."""
    from raysal.data.shards import write_shards
    from raysal.data.synthetic import generate

    base = tmp_path_factory.mktemp("single_split")
    generate(base / "root", images=900, seed=4, max_side=48, val_fraction=0.0)
    write_shards(base / "root", base / "shards")
    return base / "shards"


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (behind a proxy that can cut it off), for the whole session; AWS test keys in
    the environment, so that Ray processes started by the tests read the bucket too."""
    pytest.importorskip("moto")
    from cluster_fixture import KEYS, S3Server

    old = {k: os.environ.get(k) for k in KEYS}
    os.environ.update(KEYS)
    server = S3Server()
    yield server
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(params=["local", "file", "s3"])
def storage_root(request, tmp_path) -> str:
    """A fresh storage location of each kind: a local folder, a file:// URI, an S3 prefix."""
    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "file":
        return (tmp_path / "store").as_uri()
    return request.getfixturevalue("s3_server").new_prefix()


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server for Optuna studies (Debian's package; .ci/run installs it), stopped after the module."""
    from cluster_fixture import Postgres, postgres_available

    if not postgres_available():
        if os.environ.get("CI"):
            pytest.fail("CI must have PostgreSQL and psycopg2 (.ci/run installs them)")
        pytest.skip("no PostgreSQL server binaries or psycopg2")
    server = Postgres()
    yield server
    server.stop()


_SUMMARY = pytest.StashKey[list]()


@pytest.fixture
def summary_lines(request) -> list[str]:
    """Lines a test puts in the terminal summary (how many docs commands `test_docs.py` checked)."""
    return request.config.stash.setdefault(_SUMMARY, [])


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    for line in config.stash.get(_SUMMARY, []):
        terminalreporter.write_line(line)
