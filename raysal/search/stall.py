"""A trial that reports nothing for ``trainer.stall_timeout_s`` is stopped with the reason "stalled".

A search runs unattended: a trial whose data pipeline never gets a CPU, or whose worker group never starts, would
otherwise hold its slot (and its placement group) until a person looks. Progress is what Ray Train writes at every
report: the run folder's ``checkpoint_manager_snapshot.json`` (rewritten at each report). The watchdog runs in the
trial process; on a stall it records the reason and ends that process: the Train controller, its workers and its
placement group are owned by it and go with it, and Tune marks the trial ERROR (Optuna FAIL, with the reason).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import pyarrow.fs

from raysal.orchestration.stale_checkpoints import SNAPSHOT
from raysal.orchestration.storage import filesystem

log = logging.getLogger(__name__)


def last_progress(run_dir: str) -> float | None:
    """Time of the run's last report (its snapshot's mtime), or None before the first one."""
    fs, root = filesystem(run_dir)
    info = fs.get_file_info(f"{root}/{SNAPSHOT}")
    if info.type != pyarrow.fs.FileType.File or info.mtime is None:
        return None
    return info.mtime.timestamp()


class StallWatchdog:
    """``with StallWatchdog(run_dir, timeout_s, on_stall):`` around ``trainer.fit()``."""

    def __init__(
        self, run_dir: str, timeout_s: float, on_stall: Callable[[str], None], *, poll_s: float = 5.0,
        end: Callable[[int], object] = os._exit,  # the trial's actor process: Tune records the trial as errored
    ) -> None:  # fmt: skip
        self.run_dir, self.timeout_s, self.on_stall, self.poll_s, self.end = run_dir, timeout_s, on_stall, poll_s, end
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="raysal-stall-watchdog", daemon=True)

    def __enter__(self) -> StallWatchdog:
        self.started = time.time()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(self.poll_s):
            try:
                last = max(self.started, last_progress(self.run_dir) or 0.0)
            except OSError:  # storage hiccup: judge on the next poll
                continue
            idle = time.time() - last
            if idle > self.timeout_s:
                reason = f"stalled: no report for {idle:.0f} s (trainer.stall_timeout_s={self.timeout_s:g})"
                log.error("%s; stopping the trial", reason)
                self.on_stall(reason)
                self.end(3)
                return
