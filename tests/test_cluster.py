"""The path raysal's users take (marked `slow`: .ci/run runs them after the default suite): a multi-node Ray on this
machine (a head with ``TRAIN_DRIVER`` and 0 CPUs, two worker nodes), an S3-compatible server on 127.0.0.1 as
``storage_path``, a driver that is not on the workers' nodes. A lost head is a new Ray cluster with the driver's
local cache wiped: only the bucket remains. Every wait is on progress (a file in the bucket, a trial in the study),
with generous limits."""

from __future__ import annotations

import contextlib
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
from entrypoint_runs import ENV, SMALL, descendants, space_file
from wandb_records import read_run

from raysal.orchestration import storage
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


def test_a_search_on_s3_is_whole_in_its_bucket_and_a_lost_head_retrains_nothing(cluster, s3_server, tmp_path, cache):
    root = s3_server.new_prefix()
    search = storage.join(root, "s3search")
    space = space_file(tmp_path, 1, "s3search")  # + the control: 2 trials
    cmd = ["raysal.tune", str(space), *SMALL, format_override("storage_path", root)]
    res = _run(cmd, cluster, cache, tmp_path / "cwd")
    assert res.returncode == 0, res.stderr[-4000:]
    assert list((tmp_path / "cwd").iterdir()) == [], "nothing of a search on S3 is written in the working directory"

    summary = storage.read_json(storage.join(search, "summary.json"))
    assert summary["trials"] == 2 and summary["reported"] == 2 and summary["control"], summary
    assert summary["best"] and storage.is_dir(storage.join(search, "best_adapter"))
    assert summary["study"] == storage.join(search, "optuna.db")
    study = _study(storage.join(search, "optuna.db"), "s3search")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    page = storage.read_text(storage.join(search, "report.html"))
    assert page.count('class="probe"') >= 2, "the report shows the probe heatmaps read from the bucket"
    assert {"plane.png", "probes.png"} <= set(storage.list_names(storage.join(search, "report")))
    trials = storage.list_names(storage.join(search, "trials"), dirs=True)
    wandb = storage.list_names(storage.join(search, "wandb"), dirs=True)
    for trial in trials:  # every trial's W&B run is in the bucket, with every evaluation it reported
        (run_dir,) = [w for w in wandb if w.endswith(f"-{trial}")]
        (file,) = [n for n in storage.list_names(storage.join(search, "wandb", run_dir)) if n.endswith(".wandb")]
        with storage.local_copy(storage.join(search, "wandb", run_dir, file)) as p:
            steps = {h["train/step"] for h in read_run(p)["history"] if "train/step" in h}
        assert steps == {2, 4, 6}, (trial, steps)
    assert any(w.endswith("-s3search-summary") for w in wandb)
    assert f"the runs are in {storage.join(search, 'wandb')}/" in res.stdout
    before = _checkpoints(storage.join(search, "trials"))

    res = _again_on_a_new_head(cmd, cluster, cache, tmp_path / "cwd2")
    assert "is already finished (2 trials): 0 trials to run" in res.stdout, res.stdout[-3000:]
    assert "started" not in res.stdout  # no trial ran
    assert _checkpoints(storage.join(search, "trials")) == before
    again = storage.read_json(storage.join(search, "summary.json"))
    assert again["control"] == summary["control"] and again["best"]["trial_id"] == summary["best"]["trial_id"]

    # the report rebuilt on a machine that never ran the search: only the bucket
    other = tmp_path / "laptop"
    res = subprocess.run([sys.executable, "-m", "raysal.report", search], capture_output=True, text=True, timeout=600,
                         env={**ENV, **KEYS, "RAYSAL_CACHE": str(other / "cache")}, cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert storage.read_text(storage.join(search, "report.html")).count('class="probe"') >= 2


@pytest.mark.parametrize("study_in", ["sqlite", "postgres"])
def test_a_killed_driver_resumes_from_the_bucket_on_a_new_head(cluster, s3_server, tmp_path, cache, study_in, request):
    """SIGKILL the driver after a trial finished and while the next one has a checkpoint, lose the head (a new Ray,
    the driver's disk wiped): the same command finishes the search from the bucket — the finished trial kept, the
    interrupted one resumed from its checkpoint, the control the same trial, the study whole."""
    root = s3_server.new_prefix()
    search = storage.join(root, "s3kill")
    space = space_file(tmp_path, 1, "s3kill")
    cmd = ["raysal.tune", str(space), *SMALL, format_override("storage_path", root)]
    study_at = storage.join(search, "optuna.db")
    if study_in == "postgres":
        study_at = request.getfixturevalue("postgres").url
        cmd.append(f"optuna_storage={study_at}")
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", *cmd], env=_env(cluster, cache), stdout=log,
                            stderr=subprocess.STDOUT, cwd=tmp_path)  # fmt: skip
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

    res = _again_on_a_new_head(cmd, cluster, cache, tmp_path / "cwd2")
    assert "resuming the search" in res.stderr
    summary = storage.read_json(storage.join(search, "summary.json"))
    assert summary["trials"] == 2 and summary["reported"] == 2, summary
    assert summary["control"] and "warning" not in summary, summary
    study = _study(study_at, "s3kill")
    assert [t.state.name for t in study.trials].count("COMPLETE") == 2, [(t.number, t.state) for t in study.trials]
    assert sum(1 for t in study.trials if t.user_attrs.get("raysal_control")) == 1  # the control: one trial
    after = _checkpoints(trials_dir)
    assert set(after) == set(before), "no trial was started again under a new id"
    for trial in finished:
        assert after[trial] == before[trial], f"finished trial {trial} was trained again"
    resumed = [t for t, c in before.items() if c and t not in finished]
    assert resumed and all(set(after[t]) - set(before[t]) for t in resumed), (before, after)
    if study_in == "postgres":  # the folder alone is the search: a snapshot of the database's study is there too
        assert len(_study(storage.join(search, "optuna.db"), "s3kill").trials) == len(study.trials)


def _train_worker_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ray::RayTrainWorker"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_a_lost_worker_node_is_recovered_on_the_other_node_from_the_bucket(cluster, s3_server, tmp_path, cache):
    """The node that runs the Train worker dies (raylet and all) after a checkpoint reached the bucket: Ray Train
    restarts the worker group on the other node from that checkpoint, and the run finishes by itself."""
    import ray.train

    root = s3_server.new_prefix()
    cmd = [sys.executable, "-m", "raysal.train", *SMALL, "trainer.max_steps=10", "trainer.eval_every=2",
           "trainer.keep_checkpoints=10", format_override("storage_path", root), "name=inode"]  # fmt: skip
    run_dir = storage.join(root, "inode")
    log = open(tmp_path / "run.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=_env(cluster, cache), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    removed, deadline = None, time.time() + 900
    try:
        while removed is None and proc.poll() is None and time.time() < deadline:
            time.sleep(1)
            if not [n for n in storage.list_names(run_dir, dirs=True) if n.startswith("checkpoint_")]:
                continue
            nodes = [cluster.node_of_pid(p) for p in _train_worker_pids()]
            nodes = [n for n in nodes if n is not None]
            if nodes:
                removed = nodes[0]
                cluster.remove(removed)
        tail = (tmp_path / "run.log").read_text()[-3000:]
        assert removed is not None, f"no worker node to remove before the run ended: {tail}"
        code = proc.wait(timeout=900)
    finally:
        proc.kill()
        log.close()
    text = (tmp_path / "run.log").read_text()
    assert code == 0, text[-4000:]
    assert "raysal: run inode finished" in text
    result = ray.train.Result.from_path(run_dir)
    assert result.metrics["train/step"] == 10
    assert storage.is_dir(storage.join(run_dir, "best_adapter"))
    # rank 0's W&B files left its node for the bucket (the lost node took its disk)
    wandb = storage.list_names(storage.join(run_dir, "wandb"), dirs=True)
    assert any(n.startswith("offline-run-") and n.endswith("-inode") for n in wandb), wandb
    assert f"the runs are in {storage.join(run_dir, 'wandb')}/" in text


def test_storage_lost_during_a_checkpoint_never_leaves_a_half_listed_checkpoint(cluster, s3_server, tmp_path, cache):
    """The S3 server unreachable for ~30 s while the run checkpoints: Ray Train retries (or the run fails with the
    reason); every checkpoint Ray lists afterwards is whole and loads."""
    import ray.train

    root = s3_server.new_prefix()
    cmd = [sys.executable, "-m", "raysal.train", *SMALL, "trainer.max_steps=8", "trainer.eval_every=2",
           "trainer.keep_checkpoints=10", "trainer.max_failures=10", format_override("storage_path", root),
           "name=ioutage"]  # fmt: skip
    run_dir = storage.join(root, "ioutage")
    log = open(tmp_path / "run.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=_env(cluster, cache), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    cut, deadline = False, time.time() + 900
    try:
        while not cut and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
            if [n for n in storage.list_names(run_dir, dirs=True) if n.startswith("checkpoint_")]:
                with s3_server.outage():  # the next checkpoints' uploads find no storage
                    time.sleep(30)
                cut = True
        assert cut, "the run ended before its first checkpoint: " + (tmp_path / "run.log").read_text()[-3000:]
        code = proc.wait(timeout=900)
    finally:
        proc.kill()
        log.close()
    text = (tmp_path / "run.log").read_text()
    if code != 0:  # failing is allowed, with the reason
        assert "error" in text.lower() and ("storage" in text.lower() or "s3" in text.lower()), text[-4000:]
    else:
        assert "raysal: run ioutage finished" in text
    result = ray.train.Result.from_path(run_dir)
    listed = [c for c, _ in result.best_checkpoints]
    assert listed
    for checkpoint in listed:  # whole: Ray lists a checkpoint only after its upload completed
        with checkpoint.as_directory() as d:
            names = set(os.listdir(d))
            assert {"adapter", "state.pt", "history.jsonl"} <= names, (checkpoint.path, names)
