"""The end of a search, after the choice: the best trial and the control evaluated on the confirmation hold-out
(`raysal.orchestration.train.confirm`), and compared there, paired, on images the search never chose on. The
summary states these beside the selection figures, so the winner's curse is visible; a resumed search reuses
what was confirmed (``confirmation.json`` in each trial's folder)."""

from __future__ import annotations

import logging
from typing import Any

import ray.train

from raysal import storage
from raysal.metrics.paired import comparable, compare
from raysal.orchestration.train.compose import compose_cfg
from raysal.orchestration.train.confirm import confirm, confirm_fraction, records_of
from raysal.orchestration.train.spec import RunSpec, spec_from_cfg
from raysal.orchestration.tune.summary import collect_trials
from raysal.orchestration.tune.trial import trial_run_overrides
from raysal.search.control import LM_METRIC
from raysal.search.space import SearchSpec

log = logging.getLogger("raysal.tune")


def _trial_spec(config: dict, trial_id: str, spec: SearchSpec, base: list[str], trials_dir: str,
                pins: tuple[str, ...]) -> RunSpec:  # fmt: skip
    control = spec.control.overrides if spec.control else ()
    return spec_from_cfg(compose_cfg(trial_run_overrides(base, config, control, trial_id, trials_dir, pins)))


def confirm_search(
    grid: Any, summary: dict, spec: SearchSpec, base: list[str], run_spec: RunSpec, search_dir: str,
    pins: tuple[str, ...],
) -> dict | None:  # fmt: skip
    """{"images", "best", "control", "paired"} for the summary: the best trial's best checkpoint (the one exported)
    and the control's latest, on the confirmation hold-out, with the paired 95 % intervals of the objective, the LM
    loss and every guarded metric; None when there is no best or ``data.confirm_holdout`` is 0."""
    best = summary.get("best")
    if not best or confirm_fraction(run_spec.data) <= 0:
        return None
    trials_dir = storage.join(search_dir, "trials")
    configs = {r["trial_id"]: r["config"] for r in collect_trials(grid, spec, base, search_dir)[0]}
    metric, mode = spec.objectives[0].metric, spec.objectives[0].mode
    out: dict[str, Any] = {}
    for role, trial_id in (("best", best["trial_id"]), ("control", summary.get("control"))):
        if trial_id is None or trial_id not in configs:
            continue
        result = ray.train.Result.from_path(storage.join(trials_dir, trial_id))
        ckpt = result.get_best_checkpoint(metric, mode) if role == "best" else result.checkpoint
        if ckpt is None:
            continue
        got = confirm(_trial_spec(configs[trial_id], trial_id, spec, base, trials_dir, pins), ckpt)
        out[role] = {"trial_id": trial_id, **{k: got[k] for k in ("checkpoint", "step", "images", "metrics")},
                     "records": got}  # fmt: skip
    if "best" not in out:
        return None
    out["images"] = out["best"]["images"]
    out["paired"] = {}
    if "control" in out and out["control"]["trial_id"] != out["best"]["trial_id"]:
        b, c = records_of(out["best"]["records"]), records_of(out["control"]["records"])
        guards = [g.metric for g in spec.control.guards] if spec.control else []
        for m in dict.fromkeys([metric, LM_METRIC, *guards]):
            if comparable(m):
                try:
                    out["paired"][m] = compare(b, c, m).as_dict()
                except ValueError as e:  # no shared confirmation image for it
                    log.warning("confirmation: %s", e)
    for role in ("best", "control"):
        if role in out:
            del out[role]["records"]  # kept in each trial's confirmation.json, not in the summary
    return out
