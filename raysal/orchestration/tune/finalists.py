"""The finalists' stage, after the search (`raysal.search.finalists` says which runs, `raysal.search.decision`
what they decide): its runs trained as the trials of a second Tune experiment in the search folder, each run's
last checkpoint evaluated on the confirmation hold-out, and each finalist confirmed or not.

The stage is a Tune experiment of its own (``<search>/finalists``: a grid over the arms, no searcher, no early
stopping), run by the same trainable as the search's trials: its runs are Train runs in ``<search>/trials/<id>``,
with the search's W&B group and callbacks, tagged by role and seed, and it resumes as the search does — a driver
that dies during the stage (a lost head, a SIGKILL) runs the same command again, Tune restores the stage from the
search folder, finished runs are not trained again, an interrupted one goes on from its checkpoint; the
confirmation evaluations are kept in each run's ``confirmation.json`` and not repeated.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from typing import Any

import ray.train
from omegaconf import OmegaConf
from ray import tune

from raysal import storage
from raysal.metrics.records import ItemRecords
from raysal.orchestration.train.compose import compose_cfg
from raysal.orchestration.train.confirm import Asked, confirm_all, confirm_fraction, records_of
from raysal.orchestration.train.spec import RunSpec, spec_from_cfg
from raysal.orchestration.tune.places import SearchPlaces, restorable
from raysal.orchestration.tune.summary import trial_overrides
from raysal.orchestration.tune.trial import trial_dirname, trial_run_overrides
from raysal.orchestration.tune.tuner import (
    REUSE_ACTORS,
    STATE_SYNC_S,
    make_callbacks,
    stop_on_sigterm,
    unfinished_trials,
)
from raysal.search.control import LM_METRIC
from raysal.search.cost import search_cost, trial_cost
from raysal.search.decision import conditions, decide
from raysal.search.finalists import ARM_KEY, FINALIST, MATCHED_CONTROL, Arm, arms
from raysal.search.guards import POPE_SETTINGS
from raysal.search.space import SearchSpec

log = logging.getLogger("raysal.tune")
STAGE = "finalists"  # <search>/finalists: the stage's Tune experiment


class Interrupted(RuntimeError):
    """The stage stopped before its runs finished (Ctrl-C, SIGTERM): the same command resumes it."""


def asked(spec: SearchSpec) -> Asked:
    """What the confirmation evaluates beside the objective and the LM loss: the POPE settings the guards name (a
    third of the forwards for the usual adversarial guards), the readout only when a guard or objective reads it."""
    guarded = [g.metric for g in spec.control.guards] if spec.control else []
    settings = tuple(s for s in POPE_SETTINGS if any(m.startswith(f"val/pope/{s}/") for m in guarded))
    readout = any(m.startswith("val/rec_") for m in [*guarded, *(o.metric for o in spec.objectives)])
    return Asked(settings=settings or None, readout=readout)


def stage_arms(summary: dict, grid: Any, spec: SearchSpec, base: list[str], places: SearchPlaces,
               pins: tuple[str, ...]) -> list[Arm]:  # fmt: skip
    """The stage's runs for the summary's finalists, from the seed each finalist's search run trained with. A
    matched control whose config is the search's control's — a finalist that sampled nothing but its alignment
    criteria — is that run, not trained again."""
    configs = {_run_id(r): r.config for r in grid}
    control = spec.control.overrides if spec.control else ()
    first = summary["finalists"][0]
    seed = _spec(base, configs[first], control, first, places.trials_dir, pins).seed
    planned = arms([(f, configs[f]) for f in summary["finalists"]], control, spec.finalists.seeds, seed)
    search_control = summary.get("control")
    if search_control not in configs:
        return planned
    same = _resolved(base, configs[search_control], control, pins)
    return [replace(a, reuse=search_control) if a.role == MATCHED_CONTROL and a.seed == seed
            and _resolved(base, {ARM_KEY: a.as_config()}, control, pins) == same else a for a in planned]  # fmt: skip


def _resolved(base: list[str], config: dict, control: tuple[str, ...], pins: tuple[str, ...]) -> dict:
    """A run's whole config as composed for it, less its own bookkeeping (name, folder, W&B)."""
    c = OmegaConf.to_container(compose_cfg(trial_run_overrides(base, config, control, "x", "/x", pins)), resolve=True)
    return {k: v for k, v in c.items() if k not in ("name", "storage_path", "wandb")}


def run_stage(todo: list[Arm], trainable: Any, spec: SearchSpec, run_spec: RunSpec, places: SearchPlaces,
              wandb_mode: str, describe: Any) -> Any:  # fmt: skip
    """Train the arms ``todo`` (new, or resumed from the search folder) → the stage's results (Tune's
    `ResultGrid`). Raises `Interrupted` when it stops before they all finish."""
    stage_dir = storage.join(places.search_dir, STAGE)
    if restorable(stage_dir):
        log.info("resuming the finalists' stage in %s", stage_dir)
        tuner = tune.Tuner.restore(stage_dir, trainable, resume_unfinished=True, resume_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={ARM_KEY: tune.grid_search([a.as_config() for a in todo])},
            tune_config=tune.TuneConfig(
                num_samples=1,
                trial_dirname_creator=trial_dirname,
                max_concurrent_trials=spec.max_concurrent_trials,
                reuse_actors=REUSE_ACTORS,
            ),
            run_config=tune.RunConfig(
                name=STAGE,
                storage_path=places.search_dir,
                verbose=0,
                callbacks=make_callbacks(spec, run_spec, places, wandb_mode, describe, asha=False),
                failure_config=tune.FailureConfig(max_failures=0),  # retries happen inside the run (Ray Train)
                sync_config=tune.SyncConfig(sync_period=STATE_SYNC_S),
            ),
        )
    grace = stop_on_sigterm()
    try:
        grid = tuner.fit()
    except KeyboardInterrupt:
        raise Interrupted from None
    finally:
        grace.cancel()
    if unfinished_trials(grid) or len(grid) < len(todo):
        raise Interrupted
    return grid


def _run_id(result: Any) -> str:
    return (result.metrics or {}).get("trial_id") or storage.name(result.path)


def _spec(base: list[str], config: dict, control: tuple[str, ...], run_id: str, trials_dir: str,
          pins: tuple[str, ...]) -> RunSpec:  # fmt: skip
    return spec_from_cfg(compose_cfg(trial_run_overrides(base, config, control, run_id, trials_dir, pins)))


def _finished(run_dir: str, max_steps: int) -> Any | None:
    """The run's last checkpoint when the run reached its budget (a failed or short run has none to confirm)."""
    try:
        ckpt = ray.train.Result.from_path(run_dir).checkpoint
    except Exception:  # no Train run snapshot: it never started
        return None
    if ckpt is None or int(storage.name(ckpt.path).rsplit("_", 1)[-1]) < max_steps:
        return None
    return ckpt


def confirm_stage(all_arms: list[Arm], runs: dict[str, str], grid: Any, stage_results: Any, spec: SearchSpec,
                  base: list[str], places: SearchPlaces, pins: tuple[str, ...]) -> dict[str, Any]:  # fmt: skip
    """Every arm's last checkpoint on the confirmation hold-out (side by side), then each finalist's conditions
    over its seeds and the decision (`raysal.search.decision`) → the summary's ``confirmation``."""
    control = spec.control.overrides if spec.control else ()
    configs = {_run_id(r): r.config for r in grid}
    jobs, placed, missing = [], [], {}
    for arm in all_arms:
        run_id = arm.reuse or runs.get(arm.key)
        config = configs.get(run_id) if arm.reuse else {ARM_KEY: arm.as_config()}
        if run_id is None or config is None:
            missing[arm.key] = "never ran"
            continue
        run_spec = _spec(base, config, control, run_id, places.trials_dir, pins)
        ckpt = _finished(storage.join(places.trials_dir, run_id), run_spec.fit.max_steps)
        if ckpt is None:
            missing[arm.key] = f"run {run_id} did not reach step {run_spec.fit.max_steps}"
            continue
        jobs.append((run_spec, ckpt))
        placed.append((arm, run_id))
    what = asked(spec)
    done = confirm_all(jobs, what)
    results = {arm.key: (arm, run_id, got) for (arm, run_id), got in zip(placed, done, strict=True)}
    metric, mode = spec.objectives[0].metric, spec.objectives[0].mode
    per: dict[str, dict] = {}
    for finalist in dict.fromkeys(a.finalist for a in all_arms):
        pairs: list[tuple[ItemRecords, ItemRecords]] = []
        lost = [f"{k}: {why}" for k, why in missing.items() if k.startswith(f"{finalist}/")]
        for seed in sorted({a.seed for a in all_arms if a.finalist == finalist}):
            mine = results.get(f"{finalist}/{FINALIST}/seed{seed}")
            theirs = results.get(f"{finalist}/{MATCHED_CONTROL}/seed{seed}")
            if mine and theirs:
                pairs.append((records_of(mine[2]), records_of(theirs[2])))
        if lost or len(pairs) < 2:
            per[finalist] = {"comparisons": {}, "p": 1.0, "failed": lost or ["fewer than two seeds confirmed"],
                             "harms": [], "seeds": len(pairs), "images": 0}  # fmt: skip
            continue
        per[finalist] = conditions(pairs, metric, mode, spec.control.lm_tolerance, spec.control.guards)
    decided = decide(per)
    arm_rows = [{"key": a.key, "finalist": a.finalist, "role": a.role, "seed": a.seed, "run": run_id,
                 "checkpoint": got["checkpoint"], "step": got["step"], "images": got["images"],
                 "metrics": {k: v for k, v in got["metrics"].items() if k in _shown(spec)},
                 "eval_s": got.get("eval_s"), "replay": _replay(base, a)}
                for a, run_id, got in results.values()]  # fmt: skip
    return {
        "finalists": decided,
        "arms": arm_rows,
        "missing": missing,
        "seeds": spec.finalists.seeds,
        "lm_tolerance": spec.control.lm_tolerance,
        "guards": {g.metric: g.max_loss for g in spec.control.guards},
        "asked": {"settings": list(what.settings or POPE_SETTINGS), "readout": what.readout},
        "cost": stage_cost(stage_results, done),
    }


def _replay(base: list[str], arm: Arm) -> str:
    return "python -m raysal.train " + " ".join(trial_overrides(base, {ARM_KEY: arm.as_config()}))


def _shown(spec: SearchSpec) -> set[str]:
    return {spec.objectives[0].metric, LM_METRIC, *(g.metric for g in (spec.control.guards if spec.control else ()))}


def stage_cost(stage_results: Any, confirmations: list[dict]) -> dict[str, float]:
    """What the stage cost: its runs' training and evaluation (reported, as a search's trials), and the
    confirmation evaluations (their wall seconds, one worker each)."""
    cost = search_cost(trial_cost(r.metrics or {}) for r in stage_results or [])
    confirm_s = sum(float(c.get("eval_s") or 0.0) for c in confirmations)
    per_h = cost["gpu_hours"] / max(cost["worker_hours"], 1e-12) if cost["worker_hours"] else 0.0
    cost.update(confirm_s=confirm_s, worker_hours=cost["worker_hours"] + confirm_s / 3600,
                gpu_hours=cost["gpu_hours"] + per_h * confirm_s / 3600)  # fmt: skip
    return cost


def finalists_stage(summary: dict, grid: Any, spec: SearchSpec, base: list[str], run_spec: RunSpec,
                    places: SearchPlaces, trainable: Any, wandb_mode: str, describe: Any,
                    pins: tuple[str, ...]) -> dict[str, Any] | None:  # fmt: skip
    """The stage for the summary's finalists → the summary's ``confirmation``; None when there is nothing to
    confirm (no aligned finalist, no ``finalists`` in the space file, ``data.confirm_holdout`` 0). Raises
    `Interrupted`."""
    if spec.finalists is None or not summary.get("finalists") or confirm_fraction(run_spec.data) <= 0:
        return None
    all_arms = stage_arms(summary, grid, spec, base, places, pins)
    todo = [a for a in all_arms if a.reuse is None]
    print(f"raysal: finalists' stage: {', '.join(summary['finalists'])} at {spec.finalists.seeds} seeds, each "
          f"beside its matched control: {len(todo)} run(s) to train", flush=True)  # fmt: skip
    stage = run_stage(todo, trainable, spec, run_spec, places, wandb_mode, describe)
    runs = {Arm.from_config(r.config[ARM_KEY]).key: _run_id(r) for r in stage}
    return confirm_stage(all_arms, runs, grid, stage, spec, base, places, pins)


def say_interrupted(places: SearchPlaces) -> int:
    print(f"finalists' stage interrupted; run the same command again to continue it ({places.search_dir})",
          file=sys.stderr)  # fmt: skip
    return 130
