"""The search driver behind ``python -m raysal.tune`` (see its docstring for what a search does), in named steps:
where the search's things live (`places`), Ray (`tuner.connect_ray`), the head finder's table if the space needs it
(`heads_table`), restore or start (`tuner`), run, and the end (`finish`: summary, study, report).

The search folder on storage (``<storage_path>/<name>``, local or a URI) is the whole search: Tune's experiment
state, the trials' Train runs, the Optuna study (`study_store`), summary.json, the report, the janitor's log and the
W&B files. A driver on a new head (the old one lost) resumes from it with the same command.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from raysal import storage
from raysal.orchestration.train.errors import ConfigError, print_user_error
from raysal.orchestration.train.spec import RunSpec
from raysal.orchestration.train.wandb_run import resolve_mode, sync_hint, tag_runs
from raysal.orchestration.tune.finalists import Interrupted, asked, finalists_stage, say_interrupted
from raysal.orchestration.tune.heads_table import ensure_heads_table
from raysal.orchestration.tune.janitor import leaked_placement_groups, removed_count
from raysal.orchestration.tune.places import SearchPlaces, SearchStateError, restorable, search_places
from raysal.orchestration.tune.shared_data import shared_datasets
from raysal.orchestration.tune.summary import report, settle, summarise
from raysal.orchestration.tune.trial import make_trainable, search_pins
from raysal.orchestration.tune.tuner import connect_ray, new_tuner, restore_tuner, run_tuner
from raysal.orchestration.tune.wandb_config import trial_wandb_config
from raysal.search.space import SearchSpec
from raysal.search.verdict import guard_lines, summary_values, trial_roles, trials_table, verdict

log = logging.getLogger("raysal.tune")


def run_search(spec: SearchSpec, base: list[str], run_spec: RunSpec, resume: str, verbose: bool = False) -> int:
    """Run (or resume) the search checked by `prepare_search` → the exit code: 0 with a best trial, 1 without,
    2 on a search folder or cluster that cannot run it (one `error:` line), 130 when interrupted."""
    places = search_places(spec, run_spec)
    places.local_dir.mkdir(parents=True, exist_ok=True)
    connect_ray(verbose)
    pins = search_pins(run_spec)
    wandb_mode = resolve_mode(run_spec.wandb["mode"])
    set_search_environment(wandb_mode)
    restore = resume != "false" and restorable(places.search_dir)
    t0 = time.perf_counter()
    try:
        if resume == "true" and not restore:
            raise SearchStateError(f"resume=true but there is no search to restore in {places.search_dir}")
        ensure_heads_table(spec, base, run_spec, pins)
        first = spec.objectives[0]  # the one Tune keeps each trial's best checkpoint by
        control = spec.control.overrides if spec.control else ()
        confirm = asked(spec) if spec.finalists else None  # what a run of the finalists' stage confirms at its end
        trainable = make_trainable(base, control, places.trials_dir, pins, (first.metric, first.mode),
                                   shared_datasets(spec, run_spec), confirm)  # fmt: skip
        describe = partial(trial_wandb_config, base=base, control=control, trials_dir=places.trials_dir, pins=pins)
        if restore:
            tuner = restore_tuner(places, trainable)
        else:
            tuner = new_tuner(spec, run_spec, places, trainable, wandb_mode, verbose, describe, base)
    except (SearchStateError, ConfigError) as e:  # one `error:` line, exit 2, no trial started
        return print_user_error(e)
    grid = run_tuner(tuner, spec, places, restore)
    if grid is None:
        return 130
    stage = Stage(trainable, describe, wandb_mode, pins)
    return finish(grid, spec, base, run_spec, places, t0, stage)


def set_search_environment(wandb_mode: str) -> None:
    # a run that diverged reports its reason without the objective (then stops): Tune must not take that for a
    # misspelt metric (the objectives were checked against the reported metrics before the search started)
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if wandb_mode == "offline":
        os.environ["WANDB_MODE"] = "offline"  # Ray's callback insists on an API key unless W&B itself is offline


def tag_judged_runs(summary: dict, run_spec: RunSpec, wandb_mode: str, places: SearchPlaces) -> None:
    """The best trial's and the excluded trials' W&B runs get their tags (the control has its own from the start);
    a failure is said, the search is not failed for it."""
    w = run_spec.wandb
    judged = {t: [*(w.get("tags") or []), *roles] for t, roles in trial_roles(summary).items()
              if any(r != "control" for r in roles)}  # fmt: skip
    try:
        tag_runs(judged, project=w["project"], entity=w.get("entity"), group=summary["search"], mode=wandb_mode,
                 directory=places.local_dir, mirror_to=places.search_dir)  # fmt: skip
    except Exception as e:
        log.warning("could not tag the judged trials' W&B runs (%s): %s", ", ".join(judged), e)


@dataclass(frozen=True)
class Stage:
    """What the finalists' stage runs its trials with: the search's trainable, W&B description and mode, pins."""

    trainable: Any
    describe: Any
    wandb_mode: str
    pins: tuple[str, ...] = ()


def finish(grid: Any, spec: SearchSpec, base: list[str], run_spec: RunSpec, places: SearchPlaces, t0: float,
           stage: Stage) -> int:  # fmt: skip
    """The finalists' stage, then summary.json, the study and the report, all in the search folder; the
    console's last line. 130 when the stage is interrupted (the same command resumes it)."""
    wandb_mode = stage.wandb_mode
    summary = summarise(grid, spec, base, places.search_dir)
    try:
        summary["confirmation"] = finalists_stage(summary, grid, spec, base, run_spec, places, stage.trainable,
                                                  wandb_mode, stage.describe, stage.pins)  # fmt: skip
    except Interrupted:
        return say_interrupted(places)
    summary.update(settle(summary, places.search_dir))
    summary["verdict"] = verdict(summary)
    summary["leaked_placement_groups"] = leaked_placement_groups()
    summary["placement_groups_removed"] = removed_count(places.search_dir)  # by the janitor: Ray Train left them
    summary["study"] = places.study.describe()
    if summary["leaked_placement_groups"]:
        log.warning("%d placement group(s) still alive after the search", summary["leaked_placement_groups"])
    storage.write_json(storage.join(places.search_dir, "summary.json"), summary)
    places.study.publish(final=True)
    print(summary["table"])
    for line in guard_lines(summary):
        print(f"raysal: {line}")
    if summary["verdict"]:
        print(f"raysal: {summary['verdict']}", flush=True)
    report(places.search_dir, run_spec, wandb_mode, places.local_dir, spec.name, summary_values(summary),
           trials_table(summary))  # fmt: skip
    tag_judged_runs(summary, run_spec, wandb_mode, places)
    best = summary.get("best")
    w = sync_hint(places.search_dir) if wandb_mode == "offline" else ""
    print(
        f"raysal: search {spec.name} finished in {time.perf_counter() - t0:.0f}s — {summary['reported']}/"
        f"{summary['trials']} trials reported; best {best['trial_id'] if best else None}; exported: "
        f"{summary.get('best_adapter') or summary.get('best_model')}; folder: {places.search_dir}. {w}"
    )
    if summary.get("warning"):
        print(f"raysal: {summary['warning']}", file=sys.stderr)
    return 0 if best else 1  # failed trials are part of a search's result; no trial to export is not
