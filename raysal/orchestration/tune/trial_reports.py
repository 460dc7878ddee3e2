"""How a trial's Ray Train reports reach Ray Tune: its metrics, and its checkpoint as a real Tune checkpoint.

Ray's `TuneReportCallback` (Train V2 in Tune) forwards the metrics of each report and only the checkpoint's path,
as a metric: Tune's own API then finds no checkpoint (``ExperimentAnalysis.get_best_checkpoint`` logs "No
checkpoints have been found", ``ResultGrid.get_best_result().checkpoint`` is None). Here the Train controller's
callback puts each report's metrics *and* its `ray.train.Checkpoint` on a queue the trial owns; the trial's own
thread (the Tune session's) reports them to Tune, attaching the checkpoint when it improves the trial's objective.
Tune copies a reported checkpoint into the trial's Tune folder and keeps the best one (``num_to_keep=1`` in the
tuner's ``CheckpointConfig``): one copy per trial, made only when the objective improved; every checkpoint stays
in the trial's Train run (``<search>/trials/<trial_id>``). The Train run runs in a thread of the trial meanwhile;
Tune stopping the trial (ASHA) ends the trial's actor and with it the run it owns, as before.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable
from typing import Any

import ray.tune
from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Empty, Queue

CHECKPOINT_PATH = "checkpoint_path"  # the metric Ray's TuneReportCallback sets: kept for readers of results


class ReportToTrial(UserCallback):
    """In the Train controller: each report's rank-0 metrics and its checkpoint onto the trial's queue (blocking:
    the run waits while the trial hands the previous report to Tune, as with Ray's callback)."""

    def __init__(self, reports: Queue) -> None:
        self.reports = reports

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        self.reports.put((dict(metrics[0]), checkpoint))


class BestCheckpoint:
    """Which reports carry their checkpoint to Tune: those that improve ``metric`` (``mode``) over the trial's
    earlier reports; a report without the metric or with a non-finite value never does."""

    def __init__(self, metric: str, mode: str) -> None:
        self.metric, self.mode = metric, mode
        self.best: float | None = None

    def improves(self, metrics: dict[str, Any]) -> bool:
        value = metrics.get(self.metric)
        if not isinstance(value, int | float) or not math.isfinite(value):
            return False
        if self.best is not None and (value <= self.best if self.mode == "max" else value >= self.best):
            return False
        self.best = float(value)
        return True


def relay_reports(run: Callable[[list[Any]], None], metric: str, mode: str) -> None:
    """Run ``run(callbacks)`` (the Train run, given the callbacks to pass its trainer) in a thread, and report its
    reports to Tune from this one (the Tune session's), with checkpoints by `BestCheckpoint`. Re-raises what the
    run raised, after its last report."""
    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
    failure: list[BaseException] = []

    def train() -> None:
        try:
            run([ReportToTrial(reports)])
        except BaseException as e:  # handed to the trial's thread below
            failure.append(e)

    worker = threading.Thread(target=train, name="raysal-train-run", daemon=True)
    worker.start()
    best = BestCheckpoint(metric, mode)
    try:
        while worker.is_alive() or not reports.empty():
            try:
                metrics, checkpoint = reports.get(timeout=1.0)
            except (Empty, queue.Empty):
                continue
            if checkpoint is not None:
                metrics[CHECKPOINT_PATH] = checkpoint.path
            ray.tune.report(metrics, checkpoint=checkpoint if checkpoint is not None and best.improves(metrics)
                            else None)  # fmt: skip
        worker.join()
    finally:
        ray.kill(reports.actor)
    if failure:
        raise failure[0]
