"""W&B for a single run, rank 0 only (``setup_wandb`` misbehaves in Train V2 workers). Never writes the API key."""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from raysal import storage

STEP = "train/step"  # the W&B step of every raysal run: the same after a resume


def has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def resolve_mode(mode: str) -> str:
    if mode not in ("auto", "online", "offline", "disabled"):
        raise ValueError(f"wandb.mode must be auto, online, offline or disabled, got {mode!r}")
    if mode == "auto":
        return "online" if has_api_key() else "offline"
    return mode


def run_id(name: str) -> str:
    """A stable W&B run id from the run name, so a resumed run continues the same W&B run."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)[:120]


def init_wandb(cfg: dict[str, Any], name: str, directory: Path, config: dict[str, Any]):
    import wandb  # heavy, and only in the process that logs (rank 0, the search's summary)

    mode = resolve_mode(cfg["mode"])
    if mode == "disabled":
        return None
    directory.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=cfg["project"], entity=cfg.get("entity"), group=cfg.get("group"), name=name, id=run_id(name),
        resume="allow", dir=str(directory), mode=mode, config=config, tags=cfg.get("tags") or None,
    )  # fmt: skip


def relog(run: Any, rows: list[dict[str, Any]]) -> int:
    """Log the rows of a checkpoint's history that the (resumed) W&B run lacks. An online run resumes after its
    last step and W&B refuses lower ones; an offline run writes a new file, and `wandb sync` keeps the steps the
    run already has. Returns how many rows it logged."""
    n = 0
    for row in rows:
        if STEP in row and int(row[STEP]) >= run.step:
            run.log(row, step=int(row[STEP]))
            n += 1
    return n


def sync_hint(location: str) -> str:
    """How to upload the offline runs kept in ``<location>/wandb/`` (a local folder or a URI)."""
    local = storage.local_path(location)
    if local is not None:
        return f"W&B ran offline: upload with `wandb sync {local}/wandb/offline-run-*` (after `wandb login`)"
    return (f"W&B ran offline: the runs are in {storage.join(location, 'wandb')}/; copy that folder to a machine "
            "that reaches W&B (e.g. `aws s3 cp --recursive`), then `wandb sync FOLDER/offline-run-*` (after "
            "`wandb login`)")  # fmt: skip


def mirror_wandb(local_dir: str | Path, run_id: str, location: str) -> int:
    """Copy this run's W&B folders (``<local_dir>/wandb/*-<run_id>``: offline runs and the local files of online
    ones) to ``<location>/wandb/`` on storage: W&B writes to a local disk, which a spot node or a lost head takes
    with it. Nothing to do when ``local_dir`` is ``location``. → folders copied. Called at every evaluation (the
    checkpoint boundary) and when the run ends."""
    if storage.same_place(local_dir, location):
        return 0
    root = Path(local_dir) / "wandb"
    folders = sorted(p for p in root.glob(f"*-{run_id}") if p.is_dir()) if root.is_dir() else []
    for folder in folders:
        storage.upload(folder, storage.join(location, "wandb", folder.name))
    return len(folders)


def log_search_summary(
    figures: dict[str, bytes], *, project: str, entity: str | None, group: str, mode: str, directory: str | Path,
    mirror_to: str, tags: list[str] | None = None, values: dict[str, Any] | None = None,
    table: tuple[list[str], list[list]] | None = None,
) -> None:  # fmt: skip
    """The search report's figures as one W&B run in the search's group (id ``<search>-summary``: re-logging
    resumes it), written in the local ``directory`` and mirrored to the search folder ``mirror_to``; ``values``
    go to its summary (the best trial, the verdict, the comparisons with the control and their intervals),
    ``table`` (columns, rows) is logged as the ``trials`` table. Its staged artifacts stay beside the run
    (``<directory>/wandb/artifacts-<id>``, mirrored with it): `wandb sync` of the search's ``wandb/`` has them."""
    import wandb  # heavy, and only in the process that logs

    if mode == "disabled" or not (figures or values or table):
        return
    rid = run_id(f"{group}-summary")
    with staged_in(Path(directory) / "wandb" / f"artifacts-{rid}"):
        run = wandb.init(
            project=project, entity=entity, group=group, name=f"{group}-summary", id=rid, job_type="summary",
            resume="allow", mode=mode, dir=str(directory), tags=tags, reinit="finish_previous",
        )  # fmt: skip
        logged: dict[str, Any] = {f"report/{name}": wandb.Image(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
                                  for name, png in (figures or {}).items()}  # fmt: skip
        if table is not None:
            logged["trials"] = wandb.Table(columns=table[0], data=table[1])
        if logged:
            run.log(logged)
        if values:
            run.summary.update(values)
        run.finish()
    mirror_wandb(directory, rid, mirror_to)


def tag_runs(
    tags: dict[str, list[str]], *, project: str, entity: str | None, group: str, mode: str, directory: str | Path,
    mirror_to: str,
) -> int:  # fmt: skip
    """Set each trial run's tags once the search has judged it (``best``, ``excluded:<metric>``: known only at
    the end). Online through W&B's public API; offline by resuming the run for a moment (a new offline file of the
    same id, which `wandb sync` merges), mirrored to the search folder. → runs tagged."""
    import wandb  # heavy, and only in the process that logs

    if mode == "disabled" or not tags:
        return 0
    if mode == "online":
        api = wandb.Api()
        for run_id_, run_tags in tags.items():
            run = api.run(f"{entity or api.default_entity}/{project}/{run_id(run_id_)}")
            run.tags = sorted(set(run.tags) | set(run_tags))
            run.update()
        return len(tags)
    for trial_id, run_tags in tags.items():
        rid = run_id(trial_id)
        with staged_in(Path(directory) / "wandb" / f"artifacts-{rid}"):
            run = wandb.init(project=project, entity=entity, group=group, id=rid, name=trial_id, resume="allow",
                             mode=mode, dir=str(directory), tags=run_tags, reinit="finish_previous")  # fmt: skip
            run.finish()
        mirror_wandb(directory, rid, mirror_to)
    return len(tags)


@contextlib.contextmanager
def staged_in(folder: Path) -> Iterator[None]:
    """W&B stages artifact files (tables, images of a table) under ``WANDB_DATA_DIR``, by default in the home
    folder: outside the run's folder, so an offline run copied elsewhere and synced lacked them."""
    old = os.environ.get("WANDB_DATA_DIR")
    os.environ["WANDB_DATA_DIR"] = str(folder)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("WANDB_DATA_DIR", None)
        else:
            os.environ["WANDB_DATA_DIR"] = old
