"""Rank 0 of a Train run says that its workers run: a beat every `INTERVAL_S` in Ray's internal key-value store.

The search's stall watchdog (`raysal.search.stall`) reads it to tell a run whose workers run but report nothing
(stalled) from a run whose worker group waits for resources — nodes the autoscaler is still starting, or a
preempted node coming back — which is not a stall. The value is ``{"started": <when this worker group's training
function started>, "beat": <now>}``, under namespace `NAMESPACE`, keyed by the run folder: a worker group that
Ray Train restarts writes a new ``started``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

NAMESPACE = "raysal"
INTERVAL_S = 10.0


@dataclass(frozen=True)
class Heartbeat:
    started: float  # when the worker group's training function started (the worker's clock)
    beat: float  # the last beat


def _key(run_dir: str) -> bytes:
    return f"heartbeat:{run_dir}".encode()


def _kv():
    from ray.experimental import internal_kv

    return internal_kv if internal_kv._internal_kv_initialized() else None


def start_heartbeat(run_dir: str, interval_s: float = INTERVAL_S) -> threading.Event | None:
    """Beat for ``run_dir`` while the calling thread lives (Ray Train runs the training function in a thread of its
    own, so the beats stop when the function returns or raises, without a ``finally`` in it) → an event that stops
    the beats early; None outside Ray."""
    kv = _kv()
    if kv is None:
        log.warning("no Ray here: %s sends no heartbeat", run_dir)
        return None
    owner, stop, started, key = threading.current_thread(), threading.Event(), time.time(), _key(run_dir)

    def beat() -> None:
        while owner.is_alive() and not stop.is_set():
            try:
                value = json.dumps({"started": started, "beat": time.time()})
                kv._internal_kv_put(key, value.encode(), overwrite=True, namespace=NAMESPACE)
            except Exception as e:  # the GCS busy or restarting: the next beat tries again
                log.warning("heartbeat of %s not sent: %s", run_dir, e)
            stop.wait(interval_s)

    threading.Thread(target=beat, name="raysal-heartbeat", daemon=True).start()
    return stop


def read_heartbeat(run_dir: str) -> Heartbeat | None:
    """The run's last beat, or None when its workers never beat (or outside Ray)."""
    kv = _kv()
    raw = kv._internal_kv_get(_key(run_dir), namespace=NAMESPACE) if kv is not None else None
    if not raw:
        return None
    value = json.loads(raw)
    return Heartbeat(float(value["started"]), float(value["beat"]))
