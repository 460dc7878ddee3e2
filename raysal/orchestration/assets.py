"""Make what a config points at but does not exist yet: tiny checkpoints and synthetic data (first use)."""

from __future__ import annotations

import fcntl
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@contextmanager
def _lock(path: Path):
    """A file lock so that concurrent trials on one node do not generate the same asset twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_model(model: dict[str, Any]) -> None:
    """For ``model.tiny`` configs, write the tiny checkpoint at ``model.name_or_path`` if it is not there."""
    arch = model.get("tiny")
    if not arch:
        return
    out = Path(model["name_or_path"])
    with _lock(out):
        if not (out / "config.json").exists():
            from raysal.model.tiny import write_tiny

            log.info("writing tiny %s checkpoint to %s (first use)", arch, out)
            write_tiny(out, arch)


def ensure_data(data: dict[str, Any]) -> None:
    """For ``data.synthetic`` configs, generate the COCONut-format folder and its shards if missing."""
    syn = data.get("synthetic")
    if not syn:
        return  # real shards: `raysal.orchestration.preflight.check_data` says what is wrong with them
    shards = Path(data["shards"])
    with _lock(shards):
        if (shards / "manifest.json").exists():
            return
        from raysal.data.shards import write_shards
        from raysal.data.synthetic import generate

        log.info("generating %d synthetic samples in %s (first use)", syn["images"], syn["root"])
        generate(syn["root"], images=syn["images"], seed=syn["seed"], max_side=syn["max_side"])
        write_shards(syn["root"], shards)
