"""Checkpoint folders Ray no longer knows about, removed before a run resumes.

A run killed between writing a checkpoint folder and saving Ray's ``checkpoint_manager_snapshot.json`` leaves a
folder that no resume will ever read or delete (Ray prunes only what its snapshot lists): on a long search these
pile up on shared storage. Called by the driver before it starts (or resumes) a Train run, when nothing else
writes to that run folder.
"""

from __future__ import annotations

import json
import logging

import pyarrow.fs

from raysal.storage import filesystem

log = logging.getLogger(__name__)
SNAPSHOT = "checkpoint_manager_snapshot.json"


def remove_stale_checkpoints(run_dir: str) -> list[str]:
    """Delete ``checkpoint_*`` folders of ``run_dir`` that Ray's snapshot does not list; returns their names."""
    fs, root = filesystem(run_dir)
    if fs.get_file_info(root).type != pyarrow.fs.FileType.Directory:
        return []
    known: set[str] = set()
    if fs.get_file_info(f"{root}/{SNAPSHOT}").type == pyarrow.fs.FileType.File:
        with fs.open_input_stream(f"{root}/{SNAPSHOT}") as f:
            snapshot = json.loads(f.read())
        results = [*snapshot.get("checkpoint_results", []), snapshot.get("latest_checkpoint_result") or {}]
        known = {r["checkpoint_dir_name"] for r in results if r.get("checkpoint_dir_name")}
    stale = [
        info.base_name
        for info in fs.get_file_info(pyarrow.fs.FileSelector(root))
        if info.type == pyarrow.fs.FileType.Directory
        and info.base_name.startswith("checkpoint_")
        and info.base_name not in known
    ]
    for name in stale:
        fs.delete_dir(f"{root}/{name}")
    if stale:
        log.info("removed %d checkpoint folder(s) of %s that Ray's snapshot does not list: %s", len(stale), run_dir,
                 ", ".join(sorted(stale)))  # fmt: skip
    return sorted(stale)
