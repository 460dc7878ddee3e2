"""The path raysal's users take (marked `slow`: .ci/run runs them after the default suite): a multi-node Ray on this
machine (a head with ``TRAIN_DRIVER`` and 0 CPUs, two worker nodes), an S3-compatible server on 127.0.0.1 as
``storage_path``, a driver that is not on the workers' nodes. A lost head is a new Ray cluster with the driver's
local cache wiped: only the bucket remains. Every wait is on progress (a file in the bucket, a trial in the study),
with generous limits."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from cluster_fixture import KEYS, RayCluster
from entrypoint_runs import ENV, NO_EXTRAS, SMALL, descendants, space_file
from wandb_records import read_run

from raysal import storage
from raysal.orchestration.tune.wandb_callback import checkpoint_history
from raysal.search.override_text import format_override

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def cluster(s3_server):
    """A fresh multi-node Ray per test (nodes inherit the S3 keys the s3_server fixture put in the environment)."""
    c = RayCluster(workers=2, cpus=2)
    yield c
    with contextlib.suppress(Exception):
        c.shutdown()


def _env(cluster: RayCluster, cache: Path) -> dict[str, str]:
    return {**ENV, **KEYS, "RAY_ADDRESS": cluster.address, "RAYSAL_CACHE": str(cache)}


def _run(cmd: list[str], cluster: RayCluster, cache: Path, cwd: Path, timeout: int = 1500):
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True, timeout=timeout,
                          env=_env(cluster, cache), cwd=cwd)  # fmt: skip


def _checkpoints(trials_dir: str) -> dict[str, list[str]]:
    return {
        t: [n for n in storage.list_names(storage.join(trials_dir, t), dirs=True) if n.startswith("checkpoint_")]
        for t in storage.list_names(trials_dir, dirs=True)
    }


def _study(url_or_home: str, name: str) -> optuna.Study:
    if "://" in url_or_home and not url_or_home.startswith("s3://"):
        return optuna.load_study(study_name=name, storage=url_or_home)
    with storage.local_copy(url_or_home) as db:
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
        copy = optuna.create_study(directions=study.directions, study_name=name)
        copy.add_trials(study.get_trials())
        return copy


def _lost_head(cluster: RayCluster, cache: Path) -> RayCluster:
    """The head and its disk are gone: a new Ray cluster, the driver's search state wiped (demo assets kept)."""
    with contextlib.suppress(Exception):  # already gone
        cluster.shutdown()
    shutil.rmtree(cache / "searches", ignore_errors=True)
    shutil.rmtree(cache / "wandb", ignore_errors=True)
    return RayCluster(workers=2, cpus=2)


def _again_on_a_new_head(cmd: list[str], cluster: RayCluster, cache: Path, cwd: Path):
    """The same command after the head was lost → the finished process (rc 0 asserted)."""
    cluster = _lost_head(cluster, cache)
    try:
        res = _run(cmd, cluster, cache, cwd)
    finally:
        cluster.shutdown()
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def _shards_on_s3(root: str, tmp_path: Path) -> list[str]:
    """The demo's synthetic COCONut folder written as shards into the bucket (``python -m raysal.data.shards ROOT
    s3://…``, as a user prepares real data for a cluster) → the overrides that train on them."""
    from raysal.data.synthetic import generate

    generate(tmp_path / "coconut", images=24, seed=0, max_side=192)
    shards = storage.join(root, "shards")
    res = subprocess.run([sys.executable, "-m", "raysal.data.shards", str(tmp_path / "coconut"), shards],
                         capture_output=True, text=True, timeout=600, env={**ENV, **KEYS})  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert storage.is_file(storage.join(shards, "manifest.json"))
    return ["data.synthetic=null", format_override("data.shards", shards)]


def _wandb_steps(search: str, trial: str) -> set[int]:
    """Every ``train/step`` the trial's W&B run files in the bucket hold (a resumed trial has one file per process)."""
    wandb = storage.join(search, "wandb")
    steps: set[int] = set()
    for run_dir in [w for w in storage.list_names(wandb, dirs=True) if w.endswith(f"-{trial}")]:
        for file in [n for n in storage.list_names(storage.join(wandb, run_dir)) if n.endswith(".wandb")]:
            with storage.local_copy(storage.join(wandb, run_dir, file)) as p:
                steps |= {h["train/step"] for h in read_run(p)["history"] if "train/step" in h}
    return steps


def test_a_search_on_s3_survives_a_killed_driver_and_a_lost_head(cluster, s3_server, tmp_path, cache):
    """The path a cluster user takes, whole: shards and the head finder's table in the bucket, a space whose trials
    align the localization heads; the driver SIGKILLed after a trial finished and while the next one has a
    checkpoint, the head lost (a new Ray, the driver's disk wiped): the same command finishes the search from the
    bucket — the finished trial kept, the interrupted one resumed from its checkpoint, the control the same trial,
    the study whole, no placement group left, every reported row in the trials' W&B runs — and everything
    (summary, study, report with heatmaps, W&B runs) is in the bucket. Run once more on another new head, it trains
    nothing; the report is rebuilt on a machine that never ran the search. (A study in PostgreSQL through a killed
    driver: test_fault_injection.py's killed search.)"""
    root = s3_server.new_prefix()
    search = storage.join(root, "s3kill")
    common = [*SMALL, *_shards_on_s3(root, tmp_path), format_override("storage_path", root)]
    found = _run(["raysal.heads", *common, "finder.samples=4"], cluster, cache, tmp_path / "cwd0")
    assert found.returncode == 0, found.stderr[-3000:]
    assert storage.is_file(storage.join(root, "heads", "llava", "heads.json"))
    space = space_file(tmp_path, 1, "s3kill", space="  criteria.align.heads: {choice: [localization]}\n")
    cmd = ["raysal.tune", str(space), *common]
    study_at = storage.join(search, "optuna.db")
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 - closed below
    (tmp_path / "cwd1").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", *cmd], env=_env(cluster, cache), stdout=log,
                            stderr=subprocess.STDOUT, cwd=tmp_path / "cwd1")  # fmt: skip
    trials_dir = storage.join(search, "trials")
    deadline, done, before, orphans = time.time() + 1200, [], {}, []
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(3)
            try:
                trials = _study(study_at, "s3kill").trials
            except Exception:  # not published yet
                continue
            done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
            before = _checkpoints(trials_dir)
            if done and sum(1 for c in before.values() if c) > len(done):  # the next trial has a checkpoint
                break
        tail = (tmp_path / "first.log").read_text()[-3000:]
        assert proc.poll() is None, f"the search ended before it could be killed: {tail}"
        assert done, "no trial completed in time"
        orphans = descendants(proc.pid)
        proc.kill()
        proc.wait()
    finally:
        proc.kill()
        log.close()
        for pid in orphans:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    finished = {t.user_attrs["trial_id"] for t in done}
    assert list((tmp_path / "cwd1").iterdir()) == [], "nothing of a search on S3 is written in the working directory"

    res = _again_on_a_new_head(cmd, cluster, cache, tmp_path / "cwd2")
    assert "resuming the search" in res.stderr
    summary = storage.read_json(storage.join(search, "summary.json"))
    assert summary["trials"] == 2 and summary["reported"] == 2 and not summary["failed"], summary
    assert summary["control"] and "warning" not in summary, summary
    assert summary["leaked_placement_groups"] == 0, res.stdout[-3000:] + res.stderr[-5000:]  # which, and why
    assert "localization" in summary["table"], summary["table"]
    assert summary["best"] and storage.is_dir(storage.join(search, "best_adapter"))
    study = _study(study_at, "s3kill")
    assert [t.state.name for t in study.trials].count("COMPLETE") == 2, [(t.number, t.state) for t in study.trials]
    assert sum(1 for t in study.trials if t.user_attrs.get("raysal_control")) == 1  # the control: one trial
    after = _checkpoints(trials_dir)
    assert set(after) == set(before), "no trial was started again under a new id"
    for trial in finished:
        assert after[trial] == before[trial], f"finished trial {trial} was trained again"
    resumed = [t for t, c in before.items() if c and t not in finished]
    assert resumed and all(set(after[t]) - set(before[t]) for t in resumed), (before, after)

    # everything is in the bucket: the report with the probe heatmaps, every trial's W&B run, the summary run
    page = storage.read_text(storage.join(search, "report.html"))
    assert page.count('class="probe"') >= 2, "the report shows the probe heatmaps read from the bucket"
    assert {"plane.png", "probes.png"} <= set(storage.list_names(storage.join(search, "report")))
    # every row each trial reported is in its W&B run (one file per process; `wandb sync` merges them), the rows
    # the kill took before W&B wrote them included
    for trial in after:
        reported = {r["train/step"] for r in checkpoint_history(storage.join(trials_dir, trial))}
        assert reported and _wandb_steps(search, trial) == reported, (trial, _wandb_steps(search, trial), reported)
    assert any(w.endswith("-s3kill-summary") for w in storage.list_names(storage.join(search, "wandb"), dirs=True))
    assert f"the runs are in {storage.join(search, 'wandb')}/" in res.stdout

    # another lost head: the finished search trains nothing
    res = _again_on_a_new_head(cmd, cluster, cache, tmp_path / "cwd3")
    assert "is already finished (2 trials): 0 trials to run" in res.stdout, res.stdout[-3000:]
    assert "started" not in res.stdout  # no trial ran
    assert _checkpoints(trials_dir) == after
    again = storage.read_json(storage.join(search, "summary.json"))
    assert again["control"] == summary["control"] and again["best"]["trial_id"] == summary["best"]["trial_id"]

    # the report rebuilt on a machine that never ran the search: only the bucket
    other = tmp_path / "laptop"
    res = subprocess.run([sys.executable, "-m", "raysal.report", search], capture_output=True, text=True, timeout=600,
                         env={**ENV, **KEYS, "RAYSAL_CACHE": str(other / "cache")}, cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert storage.read_text(storage.join(search, "report.html")).count('class="probe"') >= 2


def _train_worker_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ray::RayTrainWorker"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _whole(checkpoints: list[str]) -> None:
    """Every checkpoint Ray lists is whole (it lists one only after its upload completed)."""
    for location in checkpoints:
        names = set(storage.list_names(location))
        assert {"state.pt", "history.jsonl"} <= names and storage.is_dir(storage.join(location, "adapter")), (
            location,
            names,
        )


def test_a_search_waits_for_nodes_and_rides_out_a_node_lost_for_longer_than_the_stall_timeout(
    s3_server, tmp_path, monkeypatch
):
    """The demo on a cluster scaled to zero whose autoscaler can add two 3-CPU worker nodes, each trial holding 2.5
    CPUs (a 2-CPU worker + its data pipelines): the search bounds its concurrency by what the cluster can grow to
    (2 trials at once, one per node) and its trials wait — longer than Ray Train's worker-group start timeout and
    than trainer.stall_timeout_s — for the nodes, which make the demo's model and data they lack (their setup is not
    counted as a stall). Then a node running a Train worker is lost after a checkpoint and comes back only after
    more than the stall timeout (the other node cannot hold its worker: the trial waits): it resumes from the
    bucket, nothing is failed as stalled or for waiting, the search ends with its winner.

    The driver has a disk of its own: it runs in a mount namespace with a tmpfs over the cache folder, so the demo's
    model and data its preflight makes are invisible to the nodes, which find the same path empty."""
    cache = tmp_path / "cache"  # fresh: no earlier test's demo files
    cache.mkdir()
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "15")  # the head's raylet passes it on: retried
    cluster = RayCluster(workers=0)
    try:
        cluster.announce_node_types({"cpu-worker": ({"CPU": 3}, 2)})
        root = s3_server.new_prefix()
        # the stall limit is above the slowest first report seen here (2 trials starting at once on 2 cores: 16
        # Python processes importing torch; > 90 s on a loaded day); POPE, the readout and the probes, which this
        # test does not look at, are off so that the first report comes sooner
        search, stall = storage.join(root, "sgrow"), 120
        space = space_file(tmp_path, 1, "sgrow", concurrency="", cpus_per_worker=2)  # + the control: 2 trials
        own_disk = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    'mount -t tmpfs raysal-driver "$0" && exec "$@"', str(cache)]  # fmt: skip
        cmd = [*own_disk, sys.executable, "-m", "raysal.tune", str(space), *SMALL, *NO_EXTRAS,
               f"trainer.stall_timeout_s={stall}", format_override("storage_path", root)]  # fmt: skip
        log_file = tmp_path / "search.log"
        log = open(log_file, "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(cmd, env=_env(cluster, cache), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        trials_dir = storage.join(search, "trials")
        phase, deadline, waited_from = "preflight", time.time() + 1800, 0.0
        try:
            while phase != "done" and proc.poll() is None and time.time() < deadline:
                time.sleep(1)
                text = log_file.read_text()
                if phase == "preflight" and " started: " in text:  # a trial started; no node can run it yet
                    assert not (cache / "tiny").exists(), "the driver's files are on its own disk"
                    phase, waited_from = "waiting", time.time()
                elif phase == "waiting" and time.time() - waited_from > stall + 10:  # > the stall and start timeouts
                    cluster.add_worker(3)
                    cluster.add_worker(3)
                    phase = "grown"
                elif phase == "grown" and any(_checkpoints(trials_dir).values()):
                    seen, phase = sum(map(len, _checkpoints(trials_dir).values())), "lose"
                elif phase == "lose" and sum(map(len, _checkpoints(trials_dir).values())) > seen:
                    nodes = [n for n in map(cluster.node_of_pid, _train_worker_pids()) if n is not None]
                    if not nodes:
                        continue
                    cluster.remove(nodes[0])  # preempted: raylet, workers and disk gone
                    time.sleep(stall + 10)  # gone for longer than the stall timeout
                    cluster.add_worker(3)  # ... and back
                    phase = "done"
            assert phase == "done", f"stopped in phase {phase}: {log_file.read_text()[-3000:]}"
            code = proc.wait(timeout=1500)
        finally:
            proc.kill()
            log.close()
        text = log_file.read_text()
        assert code == 0, text[-4000:]
        assert "at most 2 trials at once: the cluster can grow to 6 CPUs, 2.5 per trial" in text, text[-3000:]
        summary = storage.read_json(storage.join(search, "summary.json"))
        assert summary["trials"] == 2 and summary["reported"] == 2 and not summary["failed"], summary
        assert summary["best"] and summary["control"], summary
        assert "stalled" not in text and "waiting: no worker trained" not in text
        for trial, names in _checkpoints(trials_dir).items():
            _whole([storage.join(trials_dir, trial, n) for n in names])
        assert (cache / "tiny" / "llava" / "config.json").is_file(), "the node made the tiny model it lacked"
    finally:
        with contextlib.suppress(Exception):
            cluster.shutdown()


def test_storage_lost_during_a_report_and_a_checkpoint_is_ridden_out(cluster, s3_server, tmp_path, cache):
    """The S3 server unreachable for ~30 s while the run reports and checkpoints: a worker's failed upload is
    retried by Ray Train, the controller's failed snapshot write by raysal (`fit_through_outages`: the run resumes
    from its last checkpoint once the bucket answers); the run finishes, every checkpoint Ray lists is whole."""
    import ray.train

    root = s3_server.new_prefix()
    cmd = [sys.executable, "-m", "raysal.train", *SMALL, *NO_EXTRAS, "trainer.max_steps=8", "trainer.eval_every=2",
           "trainer.keep_checkpoints=10", "trainer.max_failures=10", format_override("storage_path", root),
           "name=ioutage"]  # fmt: skip
    run_dir = storage.join(root, "ioutage")
    log = open(tmp_path / "run.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=_env(cluster, cache), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    cut, deadline = False, time.time() + 900
    try:
        while not cut and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
            reported = storage.is_file(storage.join(run_dir, "checkpoint_manager_snapshot.json"))
            if reported and [n for n in storage.list_names(run_dir, dirs=True) if n.startswith("checkpoint_")]:
                with s3_server.outage():  # the next checkpoints' uploads find no storage
                    time.sleep(30)
                cut = True
        assert cut, "the run ended before its first checkpoint: " + (tmp_path / "run.log").read_text()[-3000:]
        code = proc.wait(timeout=900)
    finally:
        proc.kill()
        log.close()
    text = (tmp_path / "run.log").read_text()
    assert code == 0 and "raysal: run ioutage finished" in text, text[-4000:]
    result = ray.train.Result.from_path(run_dir)
    listed = [c for c, _ in result.best_checkpoints]
    assert listed
    _whole([storage.join(run_dir, c.path.rstrip("/").rsplit("/", 1)[-1]) for c in listed])


def _history(run_dir: str) -> dict[int, dict[str, float]]:
    """The run's reported rows by train/step, from its last checkpoint's history (a resumed run's holds the rows
    from before its resume too)."""
    last = sorted(n for n in storage.list_names(run_dir, dirs=True) if n.startswith("checkpoint_"))[-1]
    rows = [json.loads(x) for x in storage.read_text(storage.join(run_dir, last, "history.jsonl")).splitlines() if x]
    return {int(r["train/step"]): r for r in rows if "val/lm_loss" in r}


def test_a_run_resumed_on_another_node_continues_the_run_it_replaces(s3_server, tmp_path, cache):
    """Issue 29: the demo run's only worker node is SIGKILLed (raylet and all) after its first checkpoint reached the
    bucket; a new node joins 10 s later and Ray Train resumes the run there from the bucket. At the next two
    evaluations it reports what the same run reports uninterrupted (same seed): the same weights, optimizer,
    scheduler, RNG and the same batches from the checkpoint's position on (Ray Data in order)."""
    root = s3_server.new_prefix()
    cmd = [sys.executable, "-m", "raysal.train", *SMALL, *NO_EXTRAS, "trainer.max_steps=9", "trainer.eval_every=3",
           "trainer.keep_checkpoints=5", format_override("storage_path", root)]  # fmt: skip
    runs: dict[str, dict[int, dict[str, float]]] = {}
    for name in ("whole", "resumed"):
        cluster = RayCluster(workers=1, cpus=2)
        log_file = tmp_path / f"{name}.log"
        log = open(log_file, "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([*cmd, f"name={name}"], env=_env(cluster, cache), stdout=log,
                                stderr=subprocess.STDOUT, cwd=tmp_path)  # fmt: skip
        run_dir = storage.join(root, name)
        try:
            deadline = time.time() + 1200
            while name == "resumed" and proc.poll() is None and time.time() < deadline:
                time.sleep(0.5)
                if storage.exists(run_dir) and "checkpoint_0000003" in storage.list_names(run_dir, dirs=True):
                    cluster.remove(cluster.workers[0])  # the node and everything on it, as a preemption
                    time.sleep(10)
                    cluster.add_worker(2)
                    break
            code = proc.wait(timeout=1500)
        finally:
            proc.kill()
            log.close()
            cluster.shutdown()
        text = log_file.read_text()
        assert code == 0 and f"raysal: run {name} finished" in text, text[-4000:]
        runs[name] = _history(run_dir)
    assert "[FailurePolicy] RETRY" in text, "the node loss did not restart the run's worker group: " + text[-3000:]
    assert sorted(runs["whole"]) == sorted(runs["resumed"]) == [3, 6, 9]
    for step in (3, 6, 9):
        for key in ("val/lm_loss", "val/amr", "train/loss"):
            whole, resumed = runs["whole"][step][key], runs["resumed"][step][key]
            assert resumed == pytest.approx(whole, rel=1e-4, abs=1e-5), (step, key, whole, resumed)
