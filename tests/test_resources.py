"""CPU accounting: a run fits in num_workers × cpus_per_worker + data.encode_cpus, and a search's default
concurrency counts both, so concurrent trials never starve each other's data pipelines."""

from __future__ import annotations

from pathlib import Path

import pytest

from raysal.orchestration.train.data import DataCPUs
from raysal.orchestration.train.errors import ConfigError
from raysal.search.space_file import load_search_space

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("budget", [0.25, 0.5, 1.0, 4.0])
def test_data_pipelines_fit_in_the_budget_with_room_for_a_read(budget):
    cpus = DataCPUs.split(budget)
    actors = 2 * cpus.encode  # the train and validation pipelines (each split across the workers), held for the run
    assert actors + cpus.read <= budget + 1e-12
    assert cpus.read > 0 and cpus.encode > 0


def test_default_concurrency_counts_workers_and_data(monkeypatch):
    import ray

    from raysal.orchestration.tune import capacity as search

    demo = load_search_space(ROOT / "search_spaces" / "criteria.yaml", "demo")
    demo = type(demo)(**{**demo.__dict__, "max_concurrent_trials": None})
    assert search.trial_cpus(demo, 0.5) == 1.5
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert search.max_concurrent(demo, 0.5) == 1  # 2 // (1 worker CPU + 0.5 data): not 2 trials on 2 CPUs
    gpu = load_search_space(ROOT / "search_spaces" / "criteria.yaml", None)  # 1 GPU + 6 CPUs per trial
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 48.0, "GPU": 4.0})
    assert search.max_concurrent(gpu, 1.0) == 4  # GPU-bound
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 4.0})
    assert search.max_concurrent(gpu, 1.0) == 2  # CPU-bound: 16 // 7
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    with pytest.raises(ConfigError, match="max_concurrent_trials"):  # GPU nodes not up, their types unknown
        search.max_concurrent(gpu, 1.0)  # (autoscaling clusters: tests/test_autoscaling.py)


def test_a_trial_run_is_named_by_its_trial_id_even_when_it_reads_as_a_number():
    """Tune trial ids are hex: 71e76940 is a float to Hydra (inf); the run name must stay the id."""
    from raysal.orchestration.train.compose import compose_cfg
    from raysal.orchestration.tune import trial as search

    overrides = search.trial_run_overrides(["experiment=demo"], {"optim.lr": 0.003}, (), "71e76940", "/tmp/t 1")
    cfg = compose_cfg(overrides)
    assert cfg.name == "71e76940" and cfg.storage_path == "/tmp/t 1" and cfg.optim.lr == 0.003
    control = search.trial_run_overrides(["experiment=demo"], {"raysal_control": True}, ("~criterion@criteria.align",),
                                       "1e5", "/tmp/t")  # fmt: skip
    cfg = compose_cfg(control)
    assert (
        cfg.name == "1e5" and "align" not in (cfg.criteria.keys() - {"align"}) and "_target_" not in cfg.criteria.align
    )


def test_a_capped_data_pipeline_keeps_its_order():
    """Issue 29: ``scaling.data_cpus`` replaced the DataContext's options with Ray Data's defaults (preserve_order
    off): a resumed run's epoch came in another order than the one its checkpoint counted micro-batches of."""
    import ray.data

    from raysal.orchestration.train.shipped import data_config

    capped = data_config({"data_cpus": 1.5})
    for name in ("train", "val"):
        options = capped._resolve_execution_options(name)
        assert options.preserve_order and options.resource_limits.cpu == 1.5
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # what run_datasets sets
    assert data_config({"data_cpus": None})._resolve_execution_options("train").preserve_order
