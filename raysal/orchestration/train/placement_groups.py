"""Placement groups of Train runs that outlive their trial: why they leak, the fix, and a janitor.

A trial's Train run reserves its workers' resources in a placement group created by the Train *controller*, an
actor. Ray keeps a placement group made by a non-detached actor until the *job* ends (the search driver), not until
that actor dies. Ray Train removes it itself on a clean shutdown; when the controller dies instead — ASHA stops the
trial, a trial reaches ``max_t``, a stall or driver kill — a detached ``PlacementGroupCleaner`` actor notices the
dead controller and removes it. That cleaner asks Ray's state API whether the controller is alive, and the state
API, inside a worker process, finds "its" cluster by auto-detection: on a host with more than one Ray instance (two
searches, a test run beside a search, the leftovers of a killed driver) it raises ``ConnectionError: Found multiple
active Ray instances``, the cleaner's thread dies, and the placement group stays reserved until the search ends:
the next trial's data pipeline finds no CPU and waits for ever (seen in the driver-kill test of issue 9).

Two fixes here:
- `pin_ray_address`, a ``worker_process_setup_hook`` of the search's job: every worker process gets
  ``RAY_ADDRESS`` = the cluster it belongs to, so the state API (and Ray Train's cleaner) never guesses.
- `PlacementGroupJanitor`, a Tune callback in the driver: rank 0 of every Train run writes its placement group's
  id into the run folder; a few seconds after a trial ends the janitor removes that placement group if it is still
  alive (counted in ``placement_groups_removed.jsonl`` in the search folder, on its storage; reported in
  ``summary.json``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import pyarrow.fs
from ray.tune import Callback

from raysal import storage
from raysal.storage import filesystem

log = logging.getLogger(__name__)
FILE = "placement_group.txt"
GRACE_S = 5.0  # Ray Train's own shutdown (or its cleaner) goes first; the janitor only removes what they left
REMOVED_LOG = "placement_groups_removed.jsonl"
# the job-level runtime env of both entry points' `ray.init`
JOB_RUNTIME_ENV = {"worker_process_setup_hook": "raysal.orchestration.train.placement_groups.pin_ray_address"}


def pin_ray_address() -> None:
    """Worker-process setup hook: the state API in this process talks to this process's cluster."""
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def record_placement_group(run_dir: str) -> None:
    """Rank 0 of a Train run: write the id of the placement group its workers run in (rewritten on every restart
    of the worker group, so it always names the live one)."""
    from ray.util import get_current_placement_group

    pg = get_current_placement_group()
    if pg is None:  # not under Ray Train's worker group (a test calling the loop directly)
        return
    fs, root = filesystem(run_dir)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{FILE}") as f:
        f.write(pg.id.hex().encode())


def recorded_placement_group(run_dir: str) -> str | None:
    fs, root = filesystem(run_dir)
    if fs.get_file_info(f"{root}/{FILE}").type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(f"{root}/{FILE}") as f:
        return f.read().decode().strip() or None


def remove_if_alive(pg_hex: str) -> bool:
    """Remove the placement group if this cluster still holds it; False if it is gone (or from an earlier
    cluster: a resumed search runs on a new one)."""
    from ray._raylet import PlacementGroupID
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup

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
