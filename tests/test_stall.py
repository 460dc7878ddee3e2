"""The stall watchdog: a run whose workers run without a report for the stall timeout is ended with the reason, a
reporting run is not; a run whose workers wait for resources is not stalled, only ended after the wait timeout."""

from __future__ import annotations

import os
import time

import pytest

from raysal.orchestration.train.heartbeat import Heartbeat
from raysal.orchestration.train.stale_checkpoints import SNAPSHOT
from raysal.orchestration.tune.stall import StallWatchdog, last_progress

STARTED = time.time()


def running() -> Heartbeat:
    """Workers that beat now, training (started when the test module was imported)."""
    return Heartbeat(STARTED, time.time(), STARTED)


def wait_for(ends: list, seconds: float) -> None:
    deadline = time.time() + seconds
    while not ends and time.time() < deadline:
        time.sleep(0.05)


def test_a_silent_run_is_ended_with_the_reason(tmp_path):
    reasons, ends = [], []
    with StallWatchdog(str(tmp_path), 0.3, reasons.append, heartbeat=running, poll_s=0.05, end=ends.append):
        wait_for(ends, 30)
    assert ends == [3]
    assert len(reasons) == 1 and reasons[0].startswith("stalled: no report for"), reasons
    assert "while the workers trained" in reasons[0] and "stall_timeout_s=0.3" in reasons[0]


def test_a_reporting_run_is_left_alone(tmp_path):
    reasons, ends = [], []
    snapshot = tmp_path / SNAPSHOT
    assert last_progress(str(tmp_path)) is None
    with StallWatchdog(str(tmp_path), 0.5, reasons.append, heartbeat=running, poll_s=0.05, end=ends.append):
        for _ in range(20):  # 2 s of reports every 0.1 s: never 0.5 s of silence
            snapshot.write_text("{}")
            os.utime(snapshot)
            time.sleep(0.1)
    assert not reasons and not ends
    assert abs(last_progress(str(tmp_path)) - time.time()) < 60


def test_waiting_for_resources_longer_than_the_stall_timeout_is_not_a_stall(tmp_path):
    reasons, ends = [], []
    with StallWatchdog(str(tmp_path), 0.2, reasons.append, heartbeat=lambda: None, poll_s=0.05, end=ends.append):
        time.sleep(1.0)  # 5 stall timeouts without a worker: waiting, not stalled (no wait limit here)
    assert not reasons and not ends


def test_waiting_longer_than_the_wait_timeout_ends_with_its_reason(tmp_path):
    reasons, ends = [], []
    with StallWatchdog(str(tmp_path), 0.2, reasons.append, wait_timeout_s=0.5, heartbeat=lambda: None, poll_s=0.05,
                       end=ends.append):  # fmt: skip
        wait_for(ends, 30)
    assert ends == [3]
    assert len(reasons) == 1 and reasons[0].startswith("waiting: no worker trained for"), reasons
    assert "trainer.wait_timeout_s=0.5" in reasons[0] and "never had the resources" in reasons[0]


def judge_at(*, started: float = 0.0, stall: float | None = 100, wait: float | None = 1000) -> StallWatchdog:
    """A watchdog judged by hand on a fake clock (its thread never started), beats fresh for 30 s."""
    w = StallWatchdog("unused", stall, lambda _: None, wait_timeout_s=wait, heartbeat=lambda: None, alive_s=30)
    w.started = started
    return w


def test_a_node_lost_then_a_new_worker_group_resets_the_stall_clock():
    w = judge_at()
    assert w.judge(50, None, Heartbeat(10, 50, 10)) is None  # training, 40 s without a report
    assert w.judge(105, 100, Heartbeat(10, 105, 10)) is None  # a report at 100
    # the node is lost: the last beat (at 110) grows old; 290 s without a report is waiting, not a stall
    assert w.judge(400, 100, Heartbeat(10, 110, 10)) is None
    # Ray Train starts a new worker group at 600 (the node came back); it sets up (downloads the model) for 300 s,
    # longer than the stall timeout, then trains: its stall clock starts there
    assert w.judge(650, 100, Heartbeat(600, 650)) is None
    assert w.judge(899, 100, Heartbeat(600, 899)) is None
    assert w.judge(950, 100, Heartbeat(600, 950, 900)) is None
    reason = w.judge(1001, 100, Heartbeat(600, 1001, 900))
    assert reason is not None and reason.startswith("stalled: no report for 101 s while the workers trained")


def test_the_waiting_clock_runs_from_the_last_beat_or_report():
    w = judge_at()
    assert w.judge(900, None, None) is None  # never a worker: 900 s of waiting
    reason = w.judge(1001, None, None)
    assert reason is not None and reason.startswith(
        "waiting: no worker trained for 1001 s (trainer.wait_timeout_s=1000): the cluster never had the resources"
    )
    w = judge_at()
    assert w.judge(50, None, Heartbeat(10, 50, 20)) is None
    assert w.judge(1040, 60, Heartbeat(10, 50, 20)) is None  # lost at 50 after a report at 60: 980 s of waiting
    assert w.judge(1061, 60, Heartbeat(10, 50, 20)).startswith("waiting: no worker trained for 1001 s")


def test_a_setup_that_never_ends_is_waiting_not_stalled():
    """A worker group that beats but never starts its loop (a model download that hangs): past the stall timeout it
    is not stalled; after the wait timeout it ends as waiting, naming the setup."""
    w = judge_at()
    assert w.judge(500, None, Heartbeat(10, 500)) is None  # 5 stall timeouts of setup
    reason = w.judge(1001, None, Heartbeat(10, 1001))
    assert reason is not None and reason.startswith("waiting: no worker trained for 1001 s"), reason
    assert "setting up for 991 s: a model download or checkpoint fetch" in reason


def test_limits_can_be_off_and_an_earlier_attempts_beat_does_not_count():
    off = judge_at(stall=None, wait=None)
    assert off.judge(10**6, None, None) is None and off.judge(10**6, None, Heartbeat(0, 10**6, 0)) is None
    # a beat left by an earlier attempt of the trial, started long before this watchdog: the clock starts here
    w = judge_at(started=1000)
    assert w.judge(1010, None, Heartbeat(0, 1005, 0)) is None


def test_the_wait_timeout_is_a_checked_config_key():
    from raysal.orchestration.train.compose import compose_cfg
    from raysal.orchestration.train.errors import ConfigError
    from raysal.orchestration.train.spec import spec_from_cfg

    def wait(*overrides: str) -> float | None:
        return spec_from_cfg(compose_cfg(["experiment=demo", *overrides])).config["trainer"]["wait_timeout_s"]

    assert wait() == 7200 and wait("trainer.wait_timeout_s=null") is None
    with pytest.raises(ConfigError, match=r"trainer.wait_timeout_s=0: must be > 0"):
        wait("trainer.wait_timeout_s=0")
