"""Why a run stopped without finishing: one line in ``<run folder>/fail_reason.txt`` (local path or URI).

Written where the failure is known — the rank-0 worker for a divergence (Ray Train V2's ``Result.metrics`` only
holds the last *checkpointed* report, so a report is not enough), the trial process for a stall or an error —
and read by the drivers: ``raysal.train``'s exit code, the search's Optuna user attrs, table and summary.json.
Cleared when a run (re)starts, so a resumed run is judged on what it does now.
"""

from __future__ import annotations

import pyarrow.fs

from raysal.storage import filesystem

FILE = "fail_reason.txt"


def write_reason(run_dir: str, reason: str) -> None:
    fs, root = filesystem(run_dir)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{FILE}") as f:
        f.write(reason.encode())


def read_reason(run_dir: str) -> str | None:
    fs, root = filesystem(run_dir)
    if fs.get_file_info(f"{root}/{FILE}").type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(f"{root}/{FILE}") as f:
        return f.read().decode()


def clear_reason(run_dir: str) -> None:
    fs, root = filesystem(run_dir)
    if fs.get_file_info(f"{root}/{FILE}").type == pyarrow.fs.FileType.File:
        fs.delete_file(f"{root}/{FILE}")
