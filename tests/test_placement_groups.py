"""Train placement groups outlive a trial whose controller dies (Ray keeps a placement group made by an actor until
the job ends): the search pins RAY_ADDRESS in its workers so Ray Train's cleaner works on a host with several Ray
instances, and the janitor removes what is left (integration: a local Ray, ~1 min on 2 CPUs)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_rays():
    """A second, idle Ray instance on this host (the condition under which Ray Train's cleaner died), then ours."""
    import ray

    from raysal.orchestration.train.placement_groups import JOB_RUNTIME_ENV

    other = subprocess.Popen(
        [sys.executable, "-c", "import ray, time; ray.init(address='local', num_cpus=1, include_dashboard=False); "
         "print('up', flush=True); time.sleep(900)"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert other.stdout.readline().strip() == "up"
        ray.init(address="local", num_cpus=2, runtime_env=JOB_RUNTIME_ENV, log_to_driver=False)
        yield
    finally:
        ray.shutdown()
        other.kill()
        other.wait()


def _state_api_in_a_worker(actor_id: str, pin: bool) -> str:
    import ray

    @ray.remote(num_cpus=0)
    def probe(actor_id: str, pin: bool) -> str:
        import os

        if not pin:
            os.environ.pop("RAY_ADDRESS", None)  # what a worker had before the hook
        from ray.util.state import get_actor

        try:
            return get_actor(actor_id, timeout=30).state
        except Exception as e:
            return f"{type(e).__name__}: {e}"

    return ray.get(probe.remote(actor_id, pin))


def test_workers_find_their_own_cluster_among_several(two_rays):
    import ray

    @ray.remote(num_cpus=0)
    class Alive:
        def ping(self) -> int:
            return 1

    a = Alive.remote()
    ray.get(a.ping.remote())
    assert _state_api_in_a_worker(a._actor_id.hex(), pin=True) == "ALIVE"
    # without the pinned address the state API cannot choose between the two clusters (what killed the cleaner)
    assert "multiple active Ray instances" in _state_api_in_a_worker(a._actor_id.hex(), pin=False)


def test_janitor_removes_the_placement_group_an_ended_trial_left(two_rays, tmp_path):
    import ray

    from raysal.orchestration.train.placement_groups import FILE
    from raysal.orchestration.tune.janitor import PlacementGroupJanitor, removed_count

    @ray.remote(num_cpus=0)
    class Controller:  # like Ray Train's: it creates its workers' placement group, then dies without removing it
        def reserve(self) -> str:
            pg = ray.util.placement_group([{"CPU": 1}])
            ray.get(pg.ready(), timeout=60)
            return pg.id.hex()

    c = Controller.remote()
    pg = ray.get(c.reserve.remote())
    ray.kill(c)
    trials, logs = tmp_path / "trials", tmp_path / "search"
    logs.mkdir()
    (trials / "t_left").mkdir(parents=True)
    (trials / "t_left" / FILE).write_text(pg)
    (trials / "t_old").mkdir()
    (trials / "t_old" / FILE).write_text("ab" * 18)  # an id from an earlier cluster (a resumed search)
    (trials / "t_none").mkdir()  # a trial that never started its workers
    time.sleep(2)
    assert _pg_state(pg) == "CREATED"  # the controller is dead; Ray keeps its placement group (the leak)

    janitor = PlacementGroupJanitor(str(trials), str(logs), grace_s=3600)
    for tid in ("t_left", "t_old", "t_none"):
        janitor.on_trial_complete(0, [], SimpleNamespace(trial_id=tid))
    janitor.on_step_begin(0, [])  # within the grace period: Ray Train's own cleanup goes first
    assert _pg_state(pg) == "CREATED" and removed_count(logs) == 0
    assert janitor.sweep(float("inf")) == 1
    assert _pg_state(pg) == "REMOVED"
    (line,) = (logs / "placement_groups_removed.jsonl").read_text().splitlines()
    assert json.loads(line)["trial_id"] == "t_left" and removed_count(logs) == 1
    assert janitor.sweep(float("inf")) == 0  # each ended trial is checked once


def _pg_state(pg_hex: str) -> str | None:
    from ray.util import placement_group_table

    return placement_group_table().get(pg_hex, {}).get("state")


def test_leaked_placement_groups_waits_for_an_asynchronous_removal(monkeypatch):
    """The last trial's placement group is removed asynchronously: one still alive for a few polls is not a leak,
    one alive past the settle time is (a fixed sleep failed on a loaded CI machine)."""
    from raysal.orchestration.tune import janitor as search

    alive = iter([[{"state": "CREATED"}]] * 3 + [[]])
    monkeypatch.setattr(search, "live_placement_groups", lambda: next(alive))
    assert search.leaked_placement_groups(settle_s=60.0, poll_s=0.0) == 0
    monkeypatch.setattr(search, "live_placement_groups", lambda: [{"state": "CREATED", "name": "stuck"}])
    assert search.leaked_placement_groups(settle_s=0.05, poll_s=0.01) == 1
