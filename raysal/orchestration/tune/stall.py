"""A trial whose workers train but report nothing for ``trainer.stall_timeout_s`` is stopped as "stalled"; one whose
workers never train for ``trainer.wait_timeout_s`` (no worker group, or one that never ends its setup) is stopped as
"waiting".

A search runs unattended: a trial whose data pipeline never gets a CPU would otherwise hold its slot (and its
placement group) until a person looks. Waiting is not a stall: on an autoscaling cluster a trial's worker group
waits for nodes to start, and after a preemption for its node to come back (boot, setup, the model's download),
for longer than a stall may last; Ray Train retries the worker group's start without limit
(`raysal.orchestration.train.trainer`), so the wait has its own, generous limit here.

What the watchdog reads: progress, what Ray Train writes at every report (the run folder's
``checkpoint_manager_snapshot.json``, rewritten at each report), and the heartbeat of the workers' rank 0
(`raysal.orchestration.train.heartbeat`). Workers training (a recent beat, their setup done): the stall clock runs from
the start of their loop or the last report, whichever is later — a worker group that restarts after a lost node
starts it again. Workers setting up (first-use assets, the model's download, the checkpoint's fetch) or none
running: the waiting clock runs from the watchdog's start, the last beat of a training worker group or the last
report. The watchdog runs in
the trial process; at a limit it records the reason and ends that process: the Train controller, its workers and
its placement group are owned by it and go with it, and Tune marks the trial ERROR (Optuna FAIL, with the reason).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from functools import partial

import pyarrow.fs

from raysal.orchestration.train.heartbeat import INTERVAL_S, Heartbeat, read_heartbeat
from raysal.orchestration.train.stale_checkpoints import SNAPSHOT
from raysal.storage import filesystem

log = logging.getLogger(__name__)

# a beat older than this: no worker runs (three missed beats, so that a busy GCS or a slow beat is not a lost node)
ALIVE_S = 3 * INTERVAL_S


def last_progress(run_dir: str) -> float | None:
    """Time of the run's last report (its snapshot's mtime), or None before the first one."""
    fs, root = filesystem(run_dir)
    info = fs.get_file_info(f"{root}/{SNAPSHOT}")
    if info.type != pyarrow.fs.FileType.File or info.mtime is None:
        return None
    return info.mtime.timestamp()


class StallWatchdog:
    """``with StallWatchdog(run_dir, stall_timeout_s, on_stall, wait_timeout_s=...):`` around ``trainer.fit()``.
    Either limit may be None (off). ``heartbeat``: where the workers' beats come from (Ray's key-value store by
    default; tests pass their own)."""

    def __init__(
        self, run_dir: str, stall_timeout_s: float | None, on_stall: Callable[[str], None], *,
        wait_timeout_s: float | None = None, heartbeat: Callable[[], Heartbeat | None] | None = None,
        alive_s: float = ALIVE_S, poll_s: float = 5.0,
        end: Callable[[int], object] = os._exit,  # the trial's actor process: Tune records the trial as errored
    ) -> None:  # fmt: skip
        self.run_dir, self.on_stall, self.poll_s, self.end = run_dir, on_stall, poll_s, end
        self.stall_timeout_s, self.wait_timeout_s, self.alive_s = stall_timeout_s, wait_timeout_s, alive_s
        self.heartbeat = heartbeat or partial(read_heartbeat, run_dir)
        self._last_training = 0.0  # the last beat of a worker group that trained
        self._state: str | None = None  # "training", "setup" or "waiting"; None: not judged yet
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="raysal-stall-watchdog", daemon=True)

    def __enter__(self) -> StallWatchdog:
        self.started = time.time()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()

    def judge(self, now: float, progress: float | None, beat: Heartbeat | None) -> str | None:
        """The reason to stop the trial now, or None to let it go on."""
        if beat is not None and beat.training is not None:
            self._last_training = max(self._last_training, beat.beat)
        alive = beat is not None and now - beat.beat <= self.alive_s
        state = ("training" if beat.training is not None else "setup") if alive else "waiting"
        if state != self._state:
            if state == "training":
                log.info("%s: its workers train (started %.0f s ago)", self.run_dir, now - beat.started)
            elif state == "setup":
                log.info("%s: its workers set up (model, data, checkpoint): not a stall yet", self.run_dir)
            elif self._state is not None:
                log.warning("%s: no heartbeat from its workers for %.0f s: waiting for them (a lost node?)",
                            self.run_dir, now - beat.beat if beat else 0.0)  # fmt: skip
            self._state = state
        if state == "training":
            # the watchdog's own start too: a beat left by an earlier attempt of this trial must not count
            idle = now - max(self.started, beat.training, progress or 0.0)
            if self.stall_timeout_s is not None and idle > self.stall_timeout_s:
                return (f"stalled: no report for {idle:.0f} s while the workers trained "
                        f"(trainer.stall_timeout_s={self.stall_timeout_s:g})")  # fmt: skip
            return None
        waited = now - max(self.started, self._last_training, progress or 0.0)
        if self.wait_timeout_s is None or waited <= self.wait_timeout_s:
            return None
        why = (
            f"its workers have been setting up for {now - beat.started:.0f} s: a model download or checkpoint fetch "
            "that never ends (see the trial's log)" if state == "setup" else
            "the cluster never had the resources for this trial, or its worker group kept failing to start (see "
            "the trial's log)"
        )  # fmt: skip
        return f"waiting: no worker trained for {waited:.0f} s (trainer.wait_timeout_s={self.wait_timeout_s:g}): {why}"

    def _watch(self) -> None:
        while not self._done.wait(self.poll_s):
            try:
                progress = last_progress(self.run_dir)
            except OSError:  # storage hiccup: judge on the next poll
                continue
            try:
                beat = self.heartbeat()
            except Exception as e:  # the GCS busy: judge on the next poll
                log.warning("%s: heartbeat not read: %s", self.run_dir, e)
                continue
            reason = self.judge(time.time(), progress, beat)
            if reason:
                log.error("%s; stopping the trial", reason)
                self.on_stall(reason)
                self.end(3)
                return
