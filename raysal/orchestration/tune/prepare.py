"""Every check of a search before Ray starts: the space file, its keys against the config, the objectives against
the reported metrics, the control's config, the data and model (preflight) and the study's place.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from raysal.orchestration.train import preflight as checks  # checks.preflight: one name tests replace
from raysal.orchestration.train.compose import compose_cfg
from raysal.orchestration.train.spec import objective_metrics, spec_from_cfg
from raysal.orchestration.tune.places import check_study, search_places
from raysal.search.space import SearchSpaceError, SearchSpec
from raysal.search.space_file import load_search_space
from raysal.search.validate_space import validate_against


def resource_overrides(spec: SearchSpec) -> list[str]:
    """The file's per-trial resources, as the `scaling` config of every trial's Train run."""
    r = spec.resources
    return [
        f"scaling.num_workers={r.num_workers}",
        f"scaling.use_gpu={str(r.use_gpu).lower()}",
        f"scaling.cpus_per_worker={r.cpus_per_worker}",
        f"scaling.gpus_per_worker={r.gpus_per_worker}",
    ]


def prepare_search(
    path: Path, cli: list[str], optuna_storage: str | None = None
) -> tuple[SearchSpec, list[str], Any, Any]:
    """Every check of a search before Ray starts → (space, base overrides, the base run spec, data sizes).
    ``optuna_storage``: the command line's database URL for the study (over the file's). Raises on bad input (the
    entry point prints one `error:` line)."""
    profile = next((o.split("=", 1)[1] for o in cli if o.startswith("experiment=")), None)
    spec = load_search_space(path, profile)
    if optuna_storage:
        spec = replace(spec, optuna_storage=optuna_storage)
    base = [*spec.base_overrides, *resource_overrides(spec), *cli]
    validate_against(spec, compose_cfg)  # every key and option must exist: fail before any trial starts

    run_spec = spec_from_cfg(compose_cfg(base))
    reported = objective_metrics(run_spec.criteria, run_spec.config.get("trainer"))
    for i, o in enumerate(spec.objectives):
        if o.metric not in reported and not o.metric.startswith("train/loss/"):
            raise SearchSpaceError(
                path, f"objectives[{i}].metric", f"{o.metric!r} is not reported ({sorted(reported)})"
            )
    for key, guards in (("guards", spec.control.guards if spec.control else ()),
                        ("screening", spec.control.screening or () if spec.control else ())):  # fmt: skip
        for g in guards:
            if g.metric not in reported:
                raise SearchSpaceError(path, f"control.{key}.{g.metric}", "not reported by the runs (trainer.pope: "
                                       "its images and settings; trainer.readout.images)")  # fmt: skip
    if spec.control is not None:  # the control trial's config must compose too, before anything runs
        spec_from_cfg(compose_cfg([*base, *spec.control.overrides]))
    sizes = checks.preflight(run_spec)  # once, here, rather than racing in concurrent trials
    check_study(search_places(spec, run_spec))
    return spec, base, run_spec, sizes
