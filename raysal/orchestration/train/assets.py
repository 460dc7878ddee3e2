"""Make what a config points at but does not exist yet: tiny checkpoints and synthetic data (first use).

Called wherever an asset is used, not only in the driver's preflight: on a multi-node cluster a local folder such
as ``${cache_dir}/tiny/llava`` exists only on the node that made it, so the Ray Data read tasks, the encode actors
and the Train workers each make it on their own node. Generation is seeded and deterministic, so every node makes
the same files; both functions are idempotent and cheap (one existence check) once the asset is there.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from raysal import storage
from raysal.data import synthetic
from raysal.data.shards import MANIFEST, publish_shards, write_shards
from raysal.orchestration.train.errors import ConfigError

log = logging.getLogger(__name__)


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    """A file lock beside the local ``path`` so that concurrent trials on one node do not make the same asset twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f"{path.name}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _local(location: str, key: str, what: str) -> Path:
    path = storage.local_path(location)
    if path is None:
        raise ConfigError(f"{key}={location}: {what} is written to a local folder, not a URI")
    return path


def ensure_model(model: dict[str, Any]) -> None:
    """For ``model.tiny`` configs, write the tiny checkpoint at ``model.name_or_path`` if it is not there; with
    ``model.captioned`` ({steps, lr, seed, patch, images}), the demo's base (`raysal.demo.base`: shipped or trained)."""
    arch = model.get("tiny")
    if not arch:
        return
    # a local folder: `from_pretrained` reads nothing else
    out = _local(str(model["name_or_path"]), "model.name_or_path", f"a tiny model (model.tiny={arch})")
    captioned = model.get("captioned")
    if captioned:
        from raysal.demo import base as demo_base  # trains a model: torch + transformers, only when needed

        args = {"steps": int(captioned["steps"]), "lr": float(captioned["lr"]), "seed": int(captioned["seed"]),
                "patch": int(captioned.get("patch", demo_base.PATCH)),
                "images": int(captioned.get("images", demo_base.IMAGES))}  # fmt: skip

        def is_current(path: Path) -> bool:
            return demo_base.is_current(path, arch, **args)

        def write(path: Path, arch: str) -> Path:
            return demo_base.make_demo_base(path, arch, **args)

        what = f"the demo base ({arch} trained to caption, {args['steps']} steps: copied if raysal ships it)"
    else:
        # transformers, only for a tiny-model config: the Ray Data read tasks import this module too
        from raysal.model.tiny import is_current
        from raysal.model.tiny import write_tiny as write

        what = f"tiny {arch} checkpoint"
    if is_current(out):  # written whole by a rename below, in this version's format
        return
    with _lock(out):
        if is_current(out):
            return

        log.warning("writing %s to %s (first use)", what, out)
        # beside the target, renamed over it when complete: a reader never loads a half-written checkpoint
        tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            write(tmp, arch)
            if out.exists():  # an older version's checkpoint, or a folder an interrupted writer left
                shutil.rmtree(out)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_data(data: dict[str, Any]) -> None:
    """For ``data.synthetic`` configs, generate the COCONut-format folder and its shards if missing.

    ``data.synthetic.root`` is a local folder (the generator writes files); ``data.shards`` a local folder or a URI.
    """
    syn = data.get("synthetic")
    if not syn:
        return  # real shards: `raysal.orchestration.train.preflight.check_data` says what is wrong with them
    shards = str(data["shards"])
    manifest = storage.join(shards, MANIFEST)
    if storage.is_file(manifest):  # written last: its presence means complete shards
        return
    root = _local(str(syn["root"]), "data.synthetic.root", "the synthetic COCONut folder")
    local = storage.local_path(shards)
    # the lock serialises the generators of one node; shards on an object store are guarded by the manifest
    with _lock(local if local is not None else root):
        if storage.is_file(manifest):
            return
        log.info("generating %d synthetic samples in %s (first use)", syn["images"], root)
        synthetic.generate(root, images=syn["images"], seed=syn["seed"], max_side=syn["max_side"],
                           palette=syn.get("palette", "any"), val_fraction=syn.get("val_fraction", 0.2))  # fmt: skip
        if local is not None:
            write_shards(root, local)
            return
        with tempfile.TemporaryDirectory(prefix="raysal-shards-") as tmp:
            staged = Path(tmp) / "shards"
            write_shards(root, staged)
            # another node may be publishing the same (deterministic) shards right now: its part files may be
            # there already. Anything else is someone's data, never overwritten.
            ours = {p.name for p in staged.iterdir()}
            foreign = sorted(set(storage.list_names(shards)) - ours)
            if foreign:
                raise FileExistsError(
                    f"{shards}: exists, is not empty and holds no {MANIFEST} (holds {foreign[:3]}); refusing to "
                    "overwrite it"
                )
            log.info("writing the synthetic shards to %s", shards)
            publish_shards(staged, shards, replace=False)
