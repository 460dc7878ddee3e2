"""Scheduling on an autoscaling cluster, against a real local Ray: the default concurrency is bounded by what the
cluster can grow to (the autoscaler's node types, as Ray reports them in its internal key-value store), a fixed
cluster by what it has, and a cluster that can say neither makes the search refuse to start; rank 0's heartbeat
reaches the trial process through Ray."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from raysal.orchestration.train.errors import ConfigError, user_message
from raysal.search.space import TrialResources
from raysal.search.space_file import load_search_space

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def space(**resources):
    spec = load_search_space(ROOT / "search_spaces" / "criteria.yaml", None)
    return replace(spec, max_concurrent_trials=None, resources=TrialResources(**resources))


GPU8 = {"num_workers": 8, "use_gpu": True, "cpus_per_worker": 6, "gpus_per_worker": 1}  # 49 CPUs + 8 GPUs
CPU1 = {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1, "gpus_per_worker": 0}  # 1.5 CPUs


@pytest.fixture
def node_types(ray_local):
    """Report the autoscaler's node types the way the autoscaler does: ``{name: (resources, max_count)}``."""
    import ray
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    where = {"namespace": ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE}

    def report(types: dict[str, tuple[dict[str, int], int]]) -> None:
        config = autoscaler_pb2.ClusterConfig()
        for name, (resources, max_count) in types.items():
            group = config.node_group_configs.add(name=name, max_count=max_count)
            group.resources.update(resources)
        _internal_kv_put(ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, config.SerializeToString(), **where)

    yield report
    _internal_kv_del(ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, **where)


HEAD = {"head": ({"CPU": 0, "TRAIN_DRIVER": 16}, 1)}


def test_an_autoscaling_cluster_is_bounded_by_what_it_can_grow_to(node_types, capsys):
    from raysal.orchestration.tune import capacity as search

    node_types({**HEAD, "a100": ({"CPU": 96, "GPU": 8}, 4)})  # scaled to zero: none of them is up
    assert search.max_concurrent(space(**GPU8), 1.0) == 4  # 32 GPUs // 8 (384 CPUs // 49 = 7)
    assert "raysal: at most 4 trials at once: the cluster can grow to 32 GPUs, 8 per trial" in capsys.readouterr().out
    assert search.max_concurrent(space(**CPU1), 0.5) == 256  # CPU trials: 384 CPUs // 1.5
    node_types({**HEAD, "a100": ({"CPU": 96, "GPU": 8}, -1)})  # no maximum count
    assert search.max_concurrent(space(**GPU8), 1.0) is None
    assert "no bound on trials at once" in capsys.readouterr().out


def test_a_trial_bigger_than_the_cluster_can_grow_is_refused(node_types):
    from raysal.orchestration.tune import capacity as search

    node_types({**HEAD, "a10g": ({"CPU": 48, "GPU": 4}, 1)})
    with pytest.raises(ConfigError) as e:
        search.max_concurrent(space(**GPU8), 1.0)
    assert "resources: one trial needs 49 CPUs and 8 GPUs" in str(e.value)
    assert "the cluster can grow to at most 48 CPUs and 4 GPUs" in str(e.value)


def test_a_cluster_that_cannot_say_what_it_holds_refuses_to_start_naming_the_key(ray_local):
    """No autoscaler node types and no GPUs (local Ray: 2 CPUs): unbounded, every trial would wait for nodes."""
    from raysal.orchestration.tune import capacity, tuner

    for resources in (GPU8, {**CPU1, "num_workers": 4}):  # no GPU at all; 4.5 CPUs of 2
        with pytest.raises(ConfigError) as e:
            capacity.max_concurrent(space(**resources), 0.5)
        message = user_message(e.value)  # what `error:` prints: one line
        assert "\n" not in message and "max_concurrent_trials: not set" in message
        assert "set max_concurrent_trials: N in the space file" in message
    # before anything of the search is touched (the study, the searcher): `places` would fail on any use
    with pytest.raises(ConfigError, match="max_concurrent_trials"):
        tuner.new_tuner(space(**GPU8), SimpleNamespace(data={"encode_cpus": 1.0}), None, None, "disabled", False)


def test_a_fixed_cluster_is_bounded_by_what_it_has(ray_local, capsys):
    from raysal.orchestration.tune import capacity as search

    assert search.max_concurrent(space(**CPU1), 0.5) == 1  # 2 CPUs // 1.5
    assert "raysal: at most 1 trial at once: the cluster has 2 CPUs, 1.5 per trial" in capsys.readouterr().out
    assert search.max_concurrent(replace(space(**GPU8), max_concurrent_trials=3), 1.0) == 3  # the file's value
    assert "raysal: at most 3 trials at once: max_concurrent_trials in" in capsys.readouterr().out


def test_rank_zeros_heartbeat_reaches_the_driver_and_stops_with_its_thread(ray_local, tmp_path):
    import ray

    from raysal.orchestration.train.heartbeat import read_heartbeat, start_heartbeat

    run_dir = f"file://{tmp_path}/trials/abc"

    @ray.remote(num_cpus=0)
    def worker(seconds: float) -> float:
        """The training thread of a Train worker: it beats, then returns."""
        started = time.time()

        def train() -> None:
            beating = start_heartbeat(run_dir, interval_s=0.1)
            time.sleep(seconds)  # its setup
            beating.training()
            time.sleep(seconds)

        thread = threading.Thread(target=train)
        thread.start()
        time.sleep(seconds / 2)
        in_setup = read_heartbeat(run_dir)
        thread.join()
        return started, in_setup

    assert read_heartbeat(run_dir) is None
    started, in_setup = ray.get(worker.remote(1.0))
    assert in_setup is not None and in_setup.training is None, in_setup  # setting up: not training yet
    beat = read_heartbeat(run_dir)
    assert beat is not None and started <= beat.started <= started + 1 and time.time() - beat.beat < 1.0
    assert started + 1 <= beat.training <= started + 2
    time.sleep(0.5)  # the training thread is gone: no more beats
    assert read_heartbeat(run_dir) == beat


def test_a_ray_up_head_reads_the_node_types_from_its_autoscaler_config(ray_local, tmp_path, monkeypatch, capsys):
    """The classic autoscaler (`ray up`) does not tell the GCS its node types; it leaves its config on the head as
    ~/ray_bootstrap_config.yaml (cluster.yaml, prepared): the bound comes from there."""
    import shutil

    from raysal.orchestration.tune import capacity as search

    assert search.bootstrap_max_resources(str(tmp_path / "none.yaml")) is None
    grow = search.bootstrap_max_resources(str(ROOT / "cluster.yaml"))
    # head once; g5.12xlarge: 4 nodes x (48 CPUs, 4 GPUs); p4d.24xlarge: 2 nodes x (96 CPUs, 8 GPUs)
    assert grow["GPU"] == 32 and grow["CPU"] == 384 and grow["TRAIN_DRIVER"] == 16, grow
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(ROOT / "cluster.yaml", tmp_path / "ray_bootstrap_config.yaml")
    assert search.max_concurrent(space(**GPU8), 1.0) == 4  # 32 GPUs // 8
    assert "at most 4 trials at once: the cluster can grow to 32 GPUs, 8 per trial" in capsys.readouterr().out
    (tmp_path / "ray_bootstrap_config.yaml").write_text("available_node_types: [not, a, map]\n")
    assert search.bootstrap_max_resources(str(tmp_path / "ray_bootstrap_config.yaml")) is None
