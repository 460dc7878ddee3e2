"""A search's datasets encoded once, for every trial (``data.encode_once``).

Every trial of a search reads the same shards with the same processor and prompt, and by default each trial's Train
run runs its own Ray Data pipeline: read tasks and an encode actor per pass over the data (a new process that
imports torch and transformers and loads the processor), a pass per epoch. For a dataset that fits in the object
store (the demo's few hundred synthetic images), that start-up costs more than the encoding: measured on the demo,
~40 CPU-seconds of read and encode processes per 24-step trial. With ``data.encode_once: true`` the driver runs
the pipeline once (`ray.data.Dataset.materialize`: the encoded blocks in the object store, in the shards' order) and
hands every trial — the search's and the finalists' stage's — the same materialized datasets; a trial's Train run
splits and shuffles them as it would its own (Ray Train's `DataConfig`, the run's seeded local shuffle), so every
trial sees the same batches in the same order as with its own pipeline. A search whose space samples a model or data
key (the processor or the prompt would differ per trial) encodes per trial, and says so. COCONut (118k images,
~40 GB encoded for LLaVA-1.5) keeps the per-trial pipelines: ``data.encode_once: false``.

Only on one machine: a search on a cluster (more than one node, or an autoscaler's node types) encodes per trial,
and says so. There the driver's materialization would wait for worker nodes before any trial asks for them (a
cluster scaled to zero grows for trials, not for the driver), and the encoded blocks live on worker nodes, where a
lost node takes them with it (blocks made by an actor pool are not rebuilt from lineage: Ray 2.60).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

from raysal.orchestration.train.data import run_datasets
from raysal.orchestration.train.spec import RunSpec
from raysal.orchestration.tune.capacity import autoscaler_max_resources
from raysal.search.space import SearchSpec

log = logging.getLogger("raysal.tune")


def _encoding_keys(spec: SearchSpec) -> list[str]:
    """The space's keys that change how samples are encoded: a model or data group choice or value."""
    out = []
    for k in spec.space.keys():  # noqa: SIM118 (a Space, not a dict)
        path = k.key.lstrip("+~").split("=", 1)[0].rsplit("@", 1)[-1]
        if path.split(".", 1)[0] in ("model", "data"):
            out.append(k.key)
    return out


def shared_datasets(spec: SearchSpec, run_spec: RunSpec) -> dict[str, Any] | None:
    """{"train", "val"} encoded once and materialized, for every trial; None when ``data.encode_once`` is off or the
    space samples what the encoding depends on."""
    if not run_spec.data.get("encode_once"):
        return None
    touched = _encoding_keys(spec)
    if touched:
        log.warning("data.encode_once: the space samples %s: every trial encodes its own data", ", ".join(touched))
        return None
    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    if nodes > 1 or autoscaler_max_resources():
        log.warning("data.encode_once: a cluster (%d node(s)%s): every trial encodes its own data", nodes,
                    ", autoscaling" if nodes == 1 else "")  # fmt: skip
        return None
    datasets = run_datasets(run_spec.data, run_spec.model["name_or_path"], model=run_spec.model)
    with ThreadPoolExecutor(max_workers=len(datasets)) as pool:  # side by side: each pipeline starts its own actor
        done = dict(zip(datasets, pool.map(lambda ds: ds.materialize(), datasets.values()), strict=True))
    return done
