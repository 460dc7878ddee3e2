"""The head finder's table before a search that may pick ``heads: localization``: made once, as a Ray task with
one worker's resources, on the search's storage, where every trial and every later search reads it.
"""

from __future__ import annotations

import logging
from typing import Any

import ray

from raysal import storage
from raysal.attention.head_scores import heads_file
from raysal.orchestration.train.compose import compose_cfg
from raysal.orchestration.train.head_finder import find_heads
from raysal.orchestration.train.spec import RunSpec, spec_from_cfg
from raysal.orchestration.tune.places import SearchStateError
from raysal.search.space import Choice, Fixed, SearchSpec


def missing_heads_table(spec: SearchSpec, run_spec: RunSpec) -> str | None:
    """The head finder's table that a space which may pick ``heads: localization`` needs (every such trial reads
    it), when it does not exist yet; None when the space never picks it or the table is there."""

    def values(dist: Any) -> list[Any]:
        if isinstance(dist, Choice):
            return [o.value for o in dist.options]
        return [dist.value] if isinstance(dist, Fixed) else []

    def may_pick(space: Any) -> bool:
        for p in space.params:
            if p.key.endswith(".heads") and "localization" in values(p.dist):
                return True
            if isinstance(p.dist, Choice) and any(may_pick(o.space) for o in p.dist.options):
                return True
        return False

    if not may_pick(spec.space):
        return None
    file = heads_file(run_spec.config["finder"]["out"], run_spec.model["name_or_path"])
    return None if storage.is_file(file) else file


def head_finder_task(overrides: list[str]) -> str:
    """A Ray task: the head finder (`find_heads`) on the search's base config → the table it wrote."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return find_heads(spec_from_cfg(compose_cfg(overrides)))


def ensure_heads_table(spec: SearchSpec, base: list[str], run_spec: RunSpec, pins: tuple[str, ...]) -> None:
    """Before any trial: a space that may pick ``heads: localization`` and finds no table for its model gets one,
    made by the head finder as a Ray task with one worker's resources (a GPU on a cluster, not the CPU-only head),
    written to the search's storage (``finder.out``), where every trial and every later search finds it."""
    file = missing_heads_table(spec, run_spec)
    if file is None:
        return
    r = spec.resources
    need = {"num_cpus": r.cpus_per_worker, "num_gpus": r.gpus_per_worker if r.use_gpu else 0}
    print(f"raysal: the space may pick heads: localization and {file} does not exist yet: scoring the base model's "
          f"heads first (a Ray task with one worker's resources: {need['num_cpus']:g} CPU, {need['num_gpus']:g} "
          "GPU)", flush=True)  # fmt: skip
    task = ray.remote(max_retries=2, **need)(head_finder_task)  # a lost node is retried; a bad config is not
    try:
        written = ray.get(task.remote([*base, *pins]))
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if getattr(e, "cause", None) is not None else e
        raise SearchStateError(f"the head finder failed before the search could start ({file}): "
                               f"{type(cause).__name__}: {' '.join(str(cause).split())[:500]}") from None  # fmt: skip
    print(f"raysal: heads table {written}: read by every trial that picks heads: localization, and reused by "
          "later searches of this model", flush=True)  # fmt: skip
