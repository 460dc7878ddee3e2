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
- `raysal.orchestration.tune.janitor.PlacementGroupJanitor`, a Tune callback in the driver: rank 0 of every Train run
  writes its placement group's id into the run folder; a few seconds after a trial ends the janitor removes that
  placement group if it is still alive (counted in ``placement_groups_removed.jsonl`` in the search folder, on its
  storage; reported in ``summary.json``).
"""

from __future__ import annotations

import logging
import os

import pyarrow.fs
import ray
from ray.util import get_current_placement_group

from raysal.storage import filesystem

log = logging.getLogger(__name__)
FILE = "placement_group.txt"
# the job-level runtime env of both entry points' `ray.init`
JOB_RUNTIME_ENV = {"worker_process_setup_hook": "raysal.orchestration.train.placement_groups.pin_ray_address"}


def pin_ray_address() -> None:
    """Worker-process setup hook: the state API in this process talks to this process's cluster."""
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def record_placement_group(run_dir: str) -> None:
    """Rank 0 of a Train run: write the id of the placement group its workers run in (rewritten on every restart
    of the worker group, so it always names the live one)."""
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
