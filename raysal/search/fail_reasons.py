"""Why a trial failed, written by the trial (on the head node) and read by the driver: Optuna's user attrs, the
trials table, ``summary.json``. One small text file per trial id, on the driver's local disk."""

from __future__ import annotations

from pathlib import Path


def record_reason(reasons_dir: str | Path, trial_id: str, reason: str) -> None:
    Path(reasons_dir).mkdir(parents=True, exist_ok=True)
    Path(reasons_dir, f"{trial_id}.txt").write_text(reason)


def read_reason(reasons_dir: str | Path, trial_id: str) -> str | None:
    path = Path(reasons_dir, f"{trial_id}.txt")
    return path.read_text() if path.exists() else None
