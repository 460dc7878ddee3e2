"""Everything a run needs, checked before Ray starts: storage, model, shards, the validation set's size.

`spec_from_cfg` has checked the config's values; this checks what they point at. Both entry points call
`preflight` once (``raysal.tune`` for the search's base config, before any trial), so a bad path, a truncated
shard or an empty hold-out is one ``error:`` line, not a traceback from inside a Ray worker.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
from transformers import AutoConfig

from raysal import storage
from raysal.attention.selection import resolve_heads, resolve_layers, resolve_selection
from raysal.criteria.protocol import AttentionSelection, LayerSelection
from raysal.data.holdout import holdout_for
from raysal.data.shards import MANIFEST, SCHEMA
from raysal.model.build import QWEN, SUPPORTED
from raysal.orchestration.train.assets import ensure_data, ensure_model
from raysal.orchestration.train.errors import ConfigError
from raysal.orchestration.train.spec import RunSpec
from raysal.storage import filesystem

log = logging.getLogger(__name__)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name


@dataclass(frozen=True)
class DataSizes:
    """Images a run trains and evaluates on, counted from the shards (ids and a fixed hash; no image is read)."""

    train_split: str
    val_split: str
    train_images: int
    val_images: int  # the validation split, or the hold-out of the training split
    eval_images: int  # what each evaluation covers: val_images capped at data.val_max_images
    holdout: float | None  # the fraction held out when the splits coincide
    confirm_images: int = 0  # the confirmation hold-out (data.confirm_holdout): never trained or selected on

    def describe(self) -> str:
        val = (
            f"hold-out {self.holdout:g} of {self.train_split} = {self.val_images} images"
            if self.holdout is not None
            else f"{self.val_split} = {self.val_images} images"
        )
        train = f"train {self.train_split} = {self.train_images} images"
        confirm = f"; confirmation {self.confirm_images}" if self.confirm_images else ""
        return f"data: {train}; validation {val}; evaluating {self.eval_images}{confirm}"


def check_writable(location: str, key: str) -> None:
    """Create ``location`` if needed and write (then remove) a small file there; a URI goes through pyarrow.fs."""
    marker = f".raysal-write-test-{uuid.uuid4().hex[:8]}"
    try:
        fs, path = filesystem(location)
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(f"{path}/{marker}") as f:
            f.write(b"ok")
        fs.delete_file(f"{path}/{marker}")
    except (OSError, pa.ArrowException) as e:
        reason = getattr(e, "strerror", None) or " ".join(str(e).split())
        raise ConfigError(f"{key}={location}: not writable ({reason})") from None


def _model_config(name: str) -> Any | None:
    """The model's config.json: a saved folder's, or a hub model's (the Hugging Face cache first, else config.json
    alone is downloaded: kilobytes, never the weights), so the layer/head checks run here, once, before Ray starts.
    None when the hub cannot be reached from this machine (said in a warning: each trial checks on its own)."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name_or_path={name}: the folder holds no config.json (not a saved model)")
        try:
            return AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"model.name_or_path={name}: unreadable config.json ({' '.join(str(e).split())})"
            ) from None
    if not HUB_ID.match(name):
        raise ConfigError(
            f"model.name_or_path={name}: no such folder, and not a Hugging Face hub id of the form org/name"
        )
    try:
        return AutoConfig.from_pretrained(name)  # from the cache, or config.json alone from the hub
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:300]
        log.warning("model %s: cannot read its config from the Hugging Face hub here (%s); the layer and head checks "
                    "run in each trial instead", name, reason)  # fmt: skip
        return None


def check_model(spec: RunSpec) -> None:
    """The model exists (a folder with config.json, or a hub id), is of a supported family, every criterion and
    model option applies to that family (`families` of a criterion), and every criterion's and the evaluation
    protocol's layers and heads exist in it."""
    name = str(spec.model["name_or_path"])
    config = _model_config(name)
    if config is None:
        return
    if config.model_type not in SUPPORTED:
        raise ConfigError(f"model.name_or_path={name}: model_type {config.model_type!r} is not one of {SUPPORTED}")
    if config.model_type in QWEN and (spec.model.get("connector", "mlp") != "mlp" or spec.model.get("connector_init")):
        raise ConfigError(f"model.connector / model.connector_init: LLaVA's (a projector between the towers); "
                          f"{config.model_type}'s merger lives in its vision tower ({name})")  # fmt: skip
    for c in spec.criteria:
        families = getattr(c, "families", None)
        if families is not None and config.model_type not in families:
            raise ConfigError(f"criteria ({c.name}): runs on {', '.join(families)} only, not {config.model_type} "
                              f"({name})")  # fmt: skip
    text = config.text_config
    n_layers, n_heads = int(text.num_hidden_layers), int(text.num_attention_heads)
    for c in spec.criteria:
        try:
            if isinstance(c, AttentionSelection):
                resolve_selection(c.layers, c.heads, n_layers, n_heads)
            elif isinstance(c, LayerSelection):
                resolve_layers(c.layers, n_layers)
        except ValueError as e:
            raise ConfigError(f"criteria ({c.name}): {e} ({name})") from None
    try:
        resolve_layers(spec.fit.eval_layers, n_layers)
        resolve_heads(spec.fit.eval_heads, n_heads)
    except ValueError as e:
        raise ConfigError(f"trainer.eval: {e} ({name})") from None


def _read_manifest(shards: str) -> dict:
    path = storage.join(shards, MANIFEST)
    try:
        return storage.read_json(path)
    except FileNotFoundError:
        raise ConfigError(
            f"data.shards={shards}: no {MANIFEST}. Write shards with `python -m raysal.data.shards ROOT {shards}` "
            "or `python scripts/prepare_coconut.py` (see docs/data.md), or run experiment=demo for synthetic data"
        ) from None
    except (OSError, ValueError, pa.ArrowException) as e:  # a folder by that name, bad JSON, storage unreachable
        raise ConfigError(f"{path}: unreadable ({' '.join(str(e).split())})") from None


def _footer_columns(fs: pyarrow.fs.FileSystem, inner: str) -> set[str] | Exception:
    """The columns a parquet file's footer names (the footer alone is read, not the file), or why it cannot be read."""
    try:
        with fs.open_input_file(inner) as f:
            return set(pq.ParquetFile(f).schema_arrow.names)
    except (OSError, pa.ArrowException) as e:
        return e


def _split_files(shards: str, manifest: dict, split: str) -> list[str]:
    """The split's files (as the manifest names them, relative to ``shards``), each checked to be parquet with our
    columns."""
    names = manifest["splits"][split]["files"]
    if not names:
        raise ConfigError(f"{storage.join(shards, MANIFEST)}: split {split!r} has no rows (every sample was skipped?)")
    fs, base = storage.filesystem(shards)  # one filesystem for every file: one client, not one per file
    base = base.rstrip("/")
    # side by side: on an object store each footer is a round trip; errors still come in the manifest's order
    with ThreadPoolExecutor(max_workers=8) as pool:
        found = list(pool.map(lambda n: _footer_columns(fs, f"{base}/{n}"), names))
    for name, columns in zip(names, found, strict=True):
        f = storage.join(shards, name)
        if isinstance(columns, FileNotFoundError):
            raise ConfigError(f"{f}: listed in {MANIFEST} but missing; re-write the shards")
        if isinstance(columns, Exception):
            raise ConfigError(
                f"{f}: not a readable parquet file ({' '.join(str(columns).split())}); re-write the shards with "
                "`python -m raysal.data.shards`"
            )
        missing = sorted(set(SCHEMA.names) - columns)
        if missing:
            raise ConfigError(f"{f}: columns {missing} missing; written by another version? re-write the shards")
    return names


def _image_ids(shards: str, names: list[str]) -> list[int]:
    """The image ids of the files ``names`` of ``shards`` (that column alone is read, the files side by side)."""
    fs, base = storage.filesystem(shards)
    base = base.rstrip("/")
    try:
        table = pq.read_table([f"{base}/{n}" for n in names], filesystem=fs, columns=["image_id"])
    except (OSError, pa.ArrowException) as e:
        raise ConfigError(f"shards: cannot read image ids ({' '.join(str(e).split())})") from None
    return table.column("image_id").to_pylist()


def check_data(data: dict[str, Any], num_workers: int) -> DataSizes:
    """Splits exist, every shard file is readable parquet with our columns, and the validation set (a split or a
    hold-out of the training split, counted by id) holds at least ``data.val_min_images`` images."""
    shards = str(data["shards"])
    manifest = _read_manifest(shards)
    for key in ("train_split", "val_split"):
        if data[key] not in manifest["splits"]:
            raise ConfigError(
                f"data.{key}={data[key]!r}: no such split in {storage.join(shards, MANIFEST)} "
                f"(it has {sorted(manifest['splits'])})"
            )
    train_split, val_split = data["train_split"], data["val_split"]
    train_files = _split_files(shards, manifest, train_split)
    same = train_split == val_split
    holdout = float(data["val_holdout"] or 0.0)
    if same and holdout <= 0:
        raise ConfigError(
            f"data.val_split={val_split!r} equals data.train_split: set data.val_holdout > 0 to hold out validation "
            "images, or point data.val_split at a split of its own"
        )
    confirm = float(data.get("confirm_holdout") or 0.0)
    if same and holdout + confirm >= 1:
        raise ConfigError(f"data.val_holdout={holdout:g} + data.confirm_holdout={confirm:g} >= 1: nothing is left "
                          f"to train on in split {train_split!r}")  # fmt: skip
    ids = _image_ids(shards, train_files)
    val_ids = ids if same else _image_ids(shards, _split_files(shards, manifest, val_split))
    train_keep, select, confirming = (holdout_for(data, p) for p in ("train", "select", "confirm"))
    n_train = sum(map(train_keep.keeps, ids))
    n_val = sum(map(select.keeps, val_ids))
    n_confirm = sum(map(confirming.keeps, val_ids)) if confirm > 0 else 0
    cap = data.get("val_max_images")
    sizes = DataSizes(train_split, val_split, n_train, n_val, min(n_val, cap or n_val), holdout if same else None,
                      n_confirm)  # fmt: skip
    if sizes.eval_images < data["val_min_images"]:
        where = (
            f"data.val_holdout={holdout:g} holds out {n_val} of the {len(ids)} images of split {train_split!r}"
            if same
            else f"data.val_split={val_split!r} has {n_val} images"
        )
        taken = f" once data.confirm_holdout={confirm:g} took {n_confirm} for confirmation" if n_confirm else ""
        raise ConfigError(
            f"{where}{taken} in {shards}, fewer than data.val_min_images={data['val_min_images']}: raise "
            f"data.val_holdout, point data.val_split at a larger split, lower data.val_min_images"
            + (" or data.confirm_holdout" if n_confirm else "")
        )
    check_confirmation(data, sizes, len(val_ids), holdout if same else 0.0)
    if sizes.eval_images < num_workers:  # each worker evaluates its own part of the validation set
        raise ConfigError(
            f"the validation set has {sizes.eval_images} images, fewer than scaling.num_workers={num_workers}: "
            "every worker evaluates a part of it"
        )
    if n_train < num_workers:
        raise ConfigError(
            f"data.train_split={train_split!r} leaves {n_train} training images in {shards}, fewer than "
            f"scaling.num_workers={num_workers}"
        )
    return sizes


def check_confirmation(data: dict[str, Any], sizes: DataSizes, split_images: int, select: float) -> None:
    """The confirmation hold-out (``data.confirm_holdout`` > 0) holds at least ``data.confirm_min_images`` images:
    found now, not after training (a run confirms its checkpoint, a search its finalists, once training is done).
    The message names what to set: the fraction that would hold enough (the hash spreads ids evenly)."""
    confirm = float(data.get("confirm_holdout") or 0.0)
    need = int(data.get("confirm_min_images") or 1)
    if confirm <= 0 or sizes.confirm_images >= need:
        return
    enough = min(0.99 - select, math.ceil(100 * 1.25 * need / max(split_images, 1)) / 100)
    holds = "no image" if not sizes.confirm_images else f"{sizes.confirm_images} images"
    fix = (
        f"set data.confirm_holdout={enough:g} (about {need} of its {split_images} images)"
        if enough > confirm and split_images * (1 - select) * 0.8 >= need
        else "use a larger split"
    )
    raise ConfigError(
        f"data.confirm_holdout={confirm:g} holds out {holds} of split {data['val_split']!r}, fewer than "
        f"data.confirm_min_images={need} to confirm on: {fix}, lower data.confirm_min_images, or set "
        "data.confirm_holdout=0 to confirm nothing"
    )


def preflight(spec: RunSpec) -> DataSizes:
    """Check what the run points at, creating the demo's assets (tiny model, synthetic data) on first use."""
    check_writable(spec.storage_path, "storage_path")
    if spec.wandb.get("dir"):
        check_writable(str(spec.wandb["dir"]), "wandb.dir")
    try:
        ensure_model(spec.model)
        ensure_data(spec.data)
    except OSError as e:
        raise ConfigError(f"cache_dir: cannot create the demo's model or data ({e})") from None
    check_model(spec)
    return check_data(spec.data, int(spec.scaling["num_workers"]))
