"""Placement groups at a search's end and after each trial: the janitor (a Tune callback) removes the Train
placement group of an ended trial that Ray Train left (why they leak: `raysal.orchestration.train.placement_groups`),
and the search counts what is still alive when it ends.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from ray._raylet import PlacementGroupID
from ray.tune import Callback
from ray.util import placement_group_table, remove_placement_group
from ray.util.placement_group import PlacementGroup

from raysal import storage
from raysal.orchestration.train.placement_groups import recorded_placement_group

log = logging.getLogger("raysal.tune")
GRACE_S = 5.0  # Ray Train's own shutdown (or its cleaner) goes first; the janitor only removes what they left
REMOVED_LOG = "placement_groups_removed.jsonl"


def live_placement_groups() -> list[dict[str, Any]]:

    return [pg for pg in placement_group_table().values() if pg.get("state") in ("CREATED", "PENDING", "RESCHEDULING")]


def leaked_placement_groups(settle_s: float = 60.0, poll_s: float = 0.5) -> int:
    """Placement groups still alive after the search (trials stopped by ASHA must release theirs). Tune and Ray
    Train remove the last trial's asynchronously, so this waits until none is left, up to ``settle_s`` (a loaded
    machine takes seconds), and names what is still alive then."""
    deadline = time.monotonic() + settle_s
    live = live_placement_groups()
    while live and time.monotonic() < deadline:
        time.sleep(poll_s)
        live = live_placement_groups()
    for pg in live:
        log.warning("placement group %s (%s, %s) still alive %.0f s after the search", pg.get("placement_group_id"),
                    pg.get("name") or "unnamed", pg.get("state"), settle_s)  # fmt: skip
    return len(live)


def remove_if_alive(pg_hex: str) -> bool:
    """Remove the placement group if this cluster still holds it; False if it is gone (or from an earlier
    cluster: a resumed search runs on a new one)."""
    pg = PlacementGroup(PlacementGroupID.from_hex(pg_hex))
    state = placement_group_table(pg).get("state")
    if state not in ("PENDING", "CREATED", "RESCHEDULING"):
        return False
    remove_placement_group(pg)
    return True


def removed_count(search_dir: str) -> int:
    path = storage.join(search_dir, REMOVED_LOG)
    return len(storage.read_text(path).splitlines()) if storage.is_file(path) else 0


class PlacementGroupJanitor(Callback):
    """Removes the Train placement group of every ended trial that nobody else removed, before the next trial
    waits on its resources. Runs in the search driver, on Tune's event loop."""

    def __init__(self, trials_dir: str, log_dir: str, grace_s: float = GRACE_S) -> None:
        self.trials_dir = trials_dir
        self.log_dir = log_dir
        self.grace_s = grace_s
        self._ended: dict[str, float] = {}  # trial id -> when it ended

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended[trial.trial_id] = time.monotonic()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended[trial.trial_id] = time.monotonic()

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        self.sweep(time.monotonic() - self.grace_s)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        last = max(self._ended.values(), default=None)
        if last is not None:  # the last trial's run gets its grace too
            time.sleep(max(0.0, last + self.grace_s - time.monotonic()))
        self.sweep(float("inf"))

    def sweep(self, ended_before: float) -> int:
        """Check the trials that ended before ``ended_before`` (monotonic clock); returns how many it removed."""
        removed = 0
        for trial_id, ended in list(self._ended.items()):
            if ended > ended_before:
                continue
            del self._ended[trial_id]
            try:
                pg = recorded_placement_group(storage.join(self.trials_dir, trial_id))
                if pg is None or not remove_if_alive(pg):
                    continue
            except Exception as e:  # the janitor must never take the search down
                log.warning("could not check the placement group of trial %s: %s", trial_id, e)
                continue
            removed += 1
            log.warning("removed placement group %s left by ended trial %s", pg, trial_id)
            try:
                storage.append_line(
                    storage.join(self.log_dir, REMOVED_LOG),
                    json.dumps({"trial_id": trial_id, "placement_group": pg, "time": time.time()}),
                )
            except Exception as e:  # the count is a report, not a reason to stop the search
                log.warning("could not record the removal in %s: %s", self.log_dir, e)
        return removed
