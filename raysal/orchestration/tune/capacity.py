"""How many trials run at once: the space file's ``max_concurrent_trials``, or what the cluster can hold — what an
autoscaling cluster can grow to (the autoscaler's node types, from the GCS or ``~/ray_bootstrap_config.yaml``), or
what a fixed one has. A search that cannot tell refuses to start, naming ``max_concurrent_trials``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import ray
import yaml
from ray._private.state import state

from raysal.orchestration.train.errors import ConfigError
from raysal.search.space import SearchSpec

log = logging.getLogger("raysal.tune")


def trial_cpus(spec: SearchSpec, encode_cpus: float) -> float:
    """CPUs one trial holds: its Train workers plus its data pipelines' budget (`DataCPUs`)."""
    r = spec.resources
    return r.num_workers * r.cpus_per_worker + encode_cpus


def trial_need(spec: SearchSpec, encode_cpus: float) -> dict[str, float]:
    """What one trial holds: CPUs always (its workers + its data pipelines), GPUs for GPU trials."""
    r = spec.resources
    need = {"CPU": trial_cpus(spec, encode_cpus)}
    if r.use_gpu and r.num_workers * r.gpus_per_worker:
        need["GPU"] = r.num_workers * r.gpus_per_worker
    return need


def autoscaler_max_resources() -> dict[str, float] | None:
    """What the cluster can grow to, from the autoscaler's node types (max count × resources, summed), as Ray Train
    reads it to refuse a worker group the cluster can never hold; None when Ray does not know them."""
    if not ray.is_initialized():
        return None
    try:
        known = state.get_max_resources_from_cluster_config() or None
    except Exception as e:  # a private API: a Ray that lacks it knows no node types
        log.debug("no autoscaler node types in the GCS: %s", e)
        known = None
    return known or bootstrap_max_resources()


BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` puts the autoscaler's config on the head


def bootstrap_max_resources(path: str = BOOTSTRAP_CONFIG) -> dict[str, float] | None:
    """What the cluster can grow to, from the autoscaler config `ray up` leaves on the head (the classic autoscaler
    does not tell the GCS its node types; v2 does): the head's resources once plus each worker type's resources ×
    its ``max_workers``. None when this machine has no such file (a driver that is not on the head)."""
    file = Path(path).expanduser()
    if not file.is_file():
        return None
    try:
        config = yaml.safe_load(file.read_text()) or {}
        types = config["available_node_types"]
        total: dict[str, float] = {}
        for name, node_type in types.items():
            count = 1 if name == config.get("head_node_type") else int(node_type.get("max_workers", 0))
            for key, value in (node_type.get("resources") or {}).items():
                total[key] = total.get(key, 0) + count * float(value)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError) as e:
        log.warning("%s: not a readable autoscaler config (%s); its node types are not used", file, e)
        return None
    return total or None


def _amounts(resources: dict[str, float], keys: Any) -> str:
    def one(k: str) -> str:
        v = resources.get(k, 0)
        return f"no limit of {k}s" if v >= sys.maxsize else f"{v:g} {k}{'s' if v != 1 else ''}"

    return " and ".join(one(k) for k in keys)


def _fit(need: dict[str, float], have: dict[str, float]) -> tuple[int | None, str]:
    """How many trials ``have`` holds (None: no limit) → (count, the resource that bounds it)."""
    counts = {k: int(have.get(k, 0) // v) for k, v in need.items() if have.get(k, 0) < sys.maxsize}
    if not counts:
        return None, ""
    key = min(counts, key=counts.__getitem__)
    return counts[key], key


def _at_once(n: int | None) -> str:
    return "no bound on trials at once" if n is None else f"at most {n} trial{'s' if n != 1 else ''} at once"


def max_concurrent(spec: SearchSpec, encode_cpus: float) -> int | None:
    """Trials at once: the file's value, or what the cluster can hold — GPUs for GPU trials, and CPUs always (a
    trial whose data pipeline finds no CPU waits for ever). An autoscaling cluster is bounded by what it can grow
    to (the autoscaler's node types), a fixed one by what it has. With neither (nodes not up, their types unknown)
    the search refuses to start: unbounded, every trial would start at once and wait for nodes. Says the bound and
    why; raises `ConfigError` (one line) before any trial starts."""
    if spec.max_concurrent_trials:
        n = spec.max_concurrent_trials
        print(f"raysal: {_at_once(n)}: max_concurrent_trials in {spec.path}", flush=True)
        return n
    need = trial_need(spec, encode_cpus)
    grow = autoscaler_max_resources()
    if grow is not None:
        n, key = _fit(need, grow)
        if n == 0:
            raise ConfigError(
                f"{spec.path}: resources: one trial needs {_amounts(need, need)} (CPUs: its workers' and "
                f"data.encode_cpus), but the cluster can grow to at most {_amounts(grow, need)} (the autoscaler's "
                "node types): no trial could ever start"
            )
        why = (
            f"the cluster can grow to {_amounts(grow, [key])}, {need[key]:g} per trial"
            if n is not None
            else "the autoscaler's node types set no maximum: Tune queues the trials"
        )
    else:
        have = ray.cluster_resources()
        n, key = _fit(need, have)
        if not n:
            raise ConfigError(
                f"{spec.path}: max_concurrent_trials: not set, and the cluster cannot say how many trials it can "
                f"hold: it has {_amounts(have, need)} now (one trial needs {_amounts(need, need)}) and Ray does not "
                "know the autoscaler's node types; set max_concurrent_trials: N in the space file (how many trials "
                "the cluster can run at once when it has grown)"
            )
        why = f"the cluster has {_amounts(have, [key])}, {need[key]:g} per trial"
    print(f"raysal: {_at_once(n)}: {why}", flush=True)
    return n
