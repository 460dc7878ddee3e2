"""Rank 0 of a Train run says that its workers run: a beat every `INTERVAL_S` in Ray's internal key-value store.

The search's stall watchdog (`raysal.orchestration.tune.stall`) reads it to tell a run whose workers run but report
nothing (stalled) from a run whose worker group waits for resources — nodes the autoscaler is still starting, or a
preempted node coming back — which is not a stall. Nor is a worker's setup: making first-use assets, downloading the
model (14 GB for a 7B one, on a node that just booted), fetching its checkpoint; so the beat also says when the
training loop began. The value is ``{"started": <when this worker group's training function started>, "training":
<when its loop began, null during setup>, "beat": <now>}``, under namespace `NAMESPACE`, keyed by the run folder: a
worker group that Ray Train restarts writes a new ``started`` and sets up again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from ray.experimental import internal_kv

log = logging.getLogger(__name__)

NAMESPACE = "raysal"
INTERVAL_S = 10.0


@dataclass(frozen=True)
class Heartbeat:
    started: float  # when the worker group's training function started (the worker's clock)
    beat: float  # the last beat
    training: float | None = None  # when the training loop began; None while the worker sets up


class Beating:
    """The beats of one worker group's rank 0: `training()` once its setup is done, `stop()` to end them early."""

    def __init__(self, send: Callable[[float | None], None], stop: threading.Event) -> None:
        self._send, self._stop, self.since = send, stop, None
        self._lock = threading.Lock()  # a beat read before `training` must not land after it

    def beat(self) -> None:
        with self._lock:
            self._send(self.since)

    def training(self) -> None:
        with self._lock:
            self.since = time.time()
            self._send(self.since)  # now, not at the next beat: the stall clock starts here

    def stop(self) -> None:
        self._stop.set()


def _key(run_dir: str) -> bytes:
    return f"heartbeat:{run_dir}".encode()


def _kv() -> ModuleType | None:
    """Ray's key-value store, or None outside a Ray process."""
    return internal_kv if internal_kv._internal_kv_initialized() else None


def start_heartbeat(run_dir: str, interval_s: float = INTERVAL_S) -> Beating | None:
    """Beat for ``run_dir`` while the calling thread lives (Ray Train runs the training function in a thread of its
    own, so the beats stop when the function returns or raises, without a ``finally`` in it), in setup until
    `Beating.training`; None outside Ray."""
    kv = _kv()
    if kv is None:
        log.warning("no Ray here: %s sends no heartbeat", run_dir)
        return None
    owner, stop, started, key = threading.current_thread(), threading.Event(), time.time(), _key(run_dir)

    def send(training: float | None) -> None:
        try:
            value = json.dumps({"started": started, "training": training, "beat": time.time()})
            kv._internal_kv_put(key, value.encode(), overwrite=True, namespace=NAMESPACE)
        except Exception as e:  # the GCS busy or restarting: the next beat tries again
            log.warning("heartbeat of %s not sent: %s", run_dir, e)

    beating = Beating(send, stop)

    def beat() -> None:
        while owner.is_alive() and not stop.is_set():
            beating.beat()
            stop.wait(interval_s)

    threading.Thread(target=beat, name="raysal-heartbeat", daemon=True).start()
    return beating


def read_heartbeat(run_dir: str) -> Heartbeat | None:
    """The run's last beat, or None when its workers never beat (or outside Ray)."""
    kv = _kv()
    raw = kv._internal_kv_get(_key(run_dir), namespace=NAMESPACE) if kv is not None else None
    if not raw:
        return None
    value = json.loads(raw)
    training = value.get("training")
    return Heartbeat(float(value["started"]), float(value["beat"]), None if training is None else float(training))
