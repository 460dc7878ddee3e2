"""The stall watchdog: a run with no report for the timeout is ended with the reason; a reporting run is not."""

from __future__ import annotations

import os
import time

from raysal.orchestration.stale_checkpoints import SNAPSHOT
from raysal.search.stall import StallWatchdog, last_progress


def test_a_silent_run_is_ended_with_the_reason(tmp_path):
    reasons, ends = [], []
    with StallWatchdog(str(tmp_path), 0.3, reasons.append, poll_s=0.05, end=ends.append):
        deadline = time.time() + 30
        while not ends and time.time() < deadline:
            time.sleep(0.05)
    assert ends == [3]
    assert len(reasons) == 1 and reasons[0].startswith("stalled: no report for") and "stall_timeout_s=0.3" in reasons[0]


def test_a_reporting_run_is_left_alone(tmp_path):
    reasons, ends = [], []
    snapshot = tmp_path / SNAPSHOT
    assert last_progress(str(tmp_path)) is None
    with StallWatchdog(str(tmp_path), 0.5, reasons.append, poll_s=0.05, end=ends.append):
        for _ in range(20):  # 2 s of reports every 0.1 s: never 0.5 s of silence
            snapshot.write_text("{}")
            os.utime(snapshot)
            time.sleep(0.1)
    assert not reasons and not ends
    assert abs(last_progress(str(tmp_path)) - time.time()) < 60
