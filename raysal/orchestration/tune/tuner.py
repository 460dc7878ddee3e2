"""Ray Tune for a search: Ray itself (`connect_ray`), a new Tuner (the study, the control queued first, the
searcher, the scheduler, the callbacks) or one restored from the search folder, and running what is left.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler

from raysal import storage
from raysal.orchestration.ray_fixes import ray_address
from raysal.orchestration.train.placement_groups import JOB_RUNTIME_ENV
from raysal.orchestration.train.spec import RunSpec
from raysal.orchestration.tune import study_store as study_module
from raysal.orchestration.tune.asha import ControlAwareASHA
from raysal.orchestration.tune.capacity import max_concurrent
from raysal.orchestration.tune.janitor import PlacementGroupJanitor
from raysal.orchestration.tune.optuna_search import ReasonedOptunaSearch
from raysal.orchestration.tune.places import SearchPlaces, SearchStateError
from raysal.orchestration.tune.progress import ProgressLines
from raysal.orchestration.tune.trial import DRIVER_RESOURCE, trial_dirname
from raysal.orchestration.tune.wandb_callback import SearchWandbCallback
from raysal.orchestration.tune.wandb_config import control_values
from raysal.search.control import open_study, settle_study
from raysal.search.sampling import define_by_run, fixed_values
from raysal.search.space import SearchSpec

log = logging.getLogger("raysal.tune")
STOP_GRACE_S = 20.0  # after SIGTERM, how long Tune may take to stop trials gracefully
# how often Tune uploads its experiment state (small files) to storage: what a lost head can lose of trial events
# (Ray's default is 300 s); the study reconciles the rest (`raysal.search.control.settle_study`)
STATE_SYNC_S = 10
# a finished trial's actor (the process that drives its Train run) runs the next trial: a new one costs a process
# start and raysal's imports (~10 CPU-s: a fifth of a demo trial on 2 cores); a stopped trial whose run is still
# ending is not reused (Tune's reset waits 2 s for it, then starts a new actor)
REUSE_ACTORS = True


def connect_ray(verbose: bool) -> None:
    """The cluster at RAY_ADDRESS (``ray job submit`` sets it) or the live one ``ray start`` recorded on this host
    (`ray_address`), or a local one with the head's trial-driver resource. The console shows raysal's one line per
    trial event (`ProgressLines`); -v brings back Ray's own output: worker logs, status tables, Ray's INFO lines and
    its slow-callback warnings."""
    quiet: dict[str, Any] = {} if verbose else {"log_to_driver": False, "logging_level": logging.WARNING}
    if not verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created ...": raysal says it
    if ray.is_initialized():
        return
    address = ray_address()
    if address != "local":
        ray.init(address=address, runtime_env=JOB_RUNTIME_ENV, **quiet)
    else:  # a local cluster: advertise the trial-driver resource the head node has on a real cluster
        ray.init(address="local", resources={DRIVER_RESOURCE: 64}, runtime_env=JOB_RUNTIME_ENV, **quiet)


def stop_on_sigterm() -> threading.Timer:
    """SIGTERM (a preempted head, `kill`) stops the search the way Ctrl-C does: Tune's SIGINT handler stops the
    trials and saves the experiment state, so the same command resumes it. Tune's graceful stop can wait on a trial
    whose Train worker group is still starting; after STOP_GRACE_S a second SIGINT skips that wait (Tune's own
    "press Ctrl-C again"), the state saved so far is kept. → the grace timer (cancel it when the search ends)."""
    grace = threading.Timer(STOP_GRACE_S, lambda: os.kill(os.getpid(), signal.SIGINT))
    grace.daemon = True

    def on_sigterm(*_: Any) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        if not grace.is_alive():
            grace.start()

    signal.signal(signal.SIGTERM, on_sigterm)
    return grace


def restore_tuner(places: SearchPlaces, trainable: Any) -> Any:
    """Tune's experiment from the search folder (local or a URI), its searcher re-opening the study here.
    Errored trials stay errored: Ray Train already retried their infrastructure failures, and a diverged trial
    would only diverge again."""
    places.study.fetch()  # a new or wiped head: the study published in the search folder
    if places.study.working is not None and not Path(places.study.working).exists():
        raise SearchStateError(
            f"{places.search_dir}: Tune's state is there but not the Optuna study ({places.study.home}): the search "
            "cannot resume; run with resume=false to start it over"
        )
    study_module.active = places.study
    log.info("resuming the search in %s (study: %s)", places.search_dir, places.study.describe())
    return tune.Tuner.restore(places.search_dir, trainable, resume_unfinished=True, resume_errored=False)


def make_sampler(seed: int) -> optuna.samplers.TPESampler:
    """TPE that models the parameters jointly (``multivariate``), per sub-space of the conditional space
    (``group``: each criterion's weight, ``top_k`` under ``localization``, sampled with the choice that enables
    them, not independently), and a constant liar so that concurrent trials do not get the same suggestion. Set
    explicitly: the defaults differ between Optuna releases (4.x: independent, no liar; 5.x: no groups)."""
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)


def make_scheduler(spec: SearchSpec) -> Any:

    s = spec.scheduler
    if s.type != "asha":
        return FIFOScheduler()
    return ControlAwareASHA(time_attr=s.time_attr, metric=spec.metric, mode=spec.mode, max_t=s.max_t,
                            grace_period=s.grace_period, reduction_factor=s.reduction_factor)  # fmt: skip


def summary_modes(spec: SearchSpec) -> dict[str, str]:
    """The metrics whose best value a trial's W&B summary keeps: the objectives, the LM loss and the guards."""
    modes = {o.metric: o.mode for o in spec.objectives}
    modes.setdefault("val/lm_loss", "min")
    for g in spec.control.guards if spec.control else ():
        modes.setdefault(g.metric, g.mode)
    return modes


def make_callbacks(spec: SearchSpec, run_spec: RunSpec, places: SearchPlaces, wandb_mode: str,
                   describe: Callable[..., tuple[dict, list[str]]] | None = None,
                   asha: bool = True) -> list:  # fmt: skip
    """Raysal's console lines, the placement-group janitor (removes the Train placement group of an ended trial
    if Ray Train did not: see placement_groups.py) and W&B (one run per trial; ``describe``: its config and tags,
    `raysal.orchestration.tune.wandb_config`). ``asha``: False for the finalists' stage (nothing stops early)."""
    s = spec.scheduler
    callbacks: list = [
        PlacementGroupJanitor(places.trials_dir, places.search_dir),
        ProgressLines(spec.metric, s.time_attr, s.max_t if s.type == "asha" and asha else None, places.trials_dir),
    ]
    if wandb_mode != "disabled":
        callbacks.append(
            SearchWandbCallback(
                trials_dir=places.trials_dir,
                mirror_to=places.search_dir,
                describe=describe,
                summary_modes=summary_modes(spec),
                project=run_spec.wandb["project"],
                entity=run_spec.wandb.get("entity"),
                group=spec.name,
                mode=wandb_mode,
                dir=str(places.local_dir),
                tags=run_spec.wandb.get("tags") or None,
            )
        )
    return callbacks


def new_tuner(spec: SearchSpec, run_spec: RunSpec, places: SearchPlaces, trainable: Any, wandb_mode: str,
              verbose: bool, describe: Callable[..., tuple[dict, list[str]]] | None = None,
              base: list[str] | None = None) -> Any:  # fmt: skip
    """A search that starts: the study (kept if the search folder has one), the control queued first, the
    searcher, the scheduler and the callbacks. Raises `ConfigError` when the cluster cannot say how many trials
    it holds (`_max_concurrent`), before the study is touched."""
    at_once = max_concurrent(spec, float(run_spec.data["encode_cpus"]))
    if places.study.published_separately and not storage.is_file(places.study.home):
        places.study.discard_working_copy()  # the search folder has no study: a copy here is an older search's
    places.study.fetch()
    study_module.active = places.study
    # the control's values as fixed parameters of its study trial: the dashboards and importance see it
    control = fixed_values(spec.space, control_values(base or [], spec.control.overrides)) if spec.control else {}
    settled = settle_study(open_study(spec.name, places.study.url, spec), set(), want_control=spec.control is not None,
                           fresh=True, control_params=control)  # fmt: skip
    if settled["lost"]:
        log.warning("%d trial(s) of the study were left running by an earlier driver: marked FAIL", settled["lost"])
    if settled["control_enqueued"]:
        log.info("control trial enqueued first: %s", " ".join(spec.control.overrides))
    searcher = ReasonedOptunaSearch(
        space=define_by_run(spec, control), metric=spec.metric, mode=spec.mode,
        sampler=make_sampler(spec.seed), storage=optuna.storages.RDBStorage(places.study.url),
        study_name=spec.name, trials_dir=places.trials_dir, store=places.study,
    )  # fmt: skip
    first = spec.objectives[0]
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=make_scheduler(spec),
            num_samples=spec.num_samples + (spec.control is not None),  # the control is one more trial
            max_concurrent_trials=at_once,
            trial_dirname_creator=trial_dirname,
            reuse_actors=REUSE_ACTORS,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            verbose=2 if verbose else 0,  # 0: no status tables (raysal prints a line per trial event)
            storage_path=run_spec.storage_path,
            callbacks=make_callbacks(spec, run_spec, places, wandb_mode, describe),
            failure_config=tune.FailureConfig(max_failures=0),  # retries happen inside the trial (Ray Train)
            sync_config=tune.SyncConfig(sync_period=STATE_SYNC_S),
            # Tune's copy of each trial's best checkpoint (`trial_reports`): what its own API returns
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=first.metric, checkpoint_score_order=first.mode
            ),
        ),
    )


def expected_trials(spec: SearchSpec) -> int:
    return spec.num_samples + (spec.control is not None)


def unfinished_trials(grid: Any) -> list[str]:
    return [t.trial_id for t in grid._experiment_analysis.trials if t.status not in ("TERMINATED", "ERROR")]


def run_tuner(tuner: Any, spec: SearchSpec, places: SearchPlaces, restored: bool) -> Any | None:
    """Run what is left of the search → its results, or None when it was interrupted (said on stderr). A restored
    search with nothing left to run is not run again."""
    if restored:
        grid = tuner.get_results()
        if not unfinished_trials(grid) and len(grid) >= expected_trials(spec):
            print(f"raysal: search {spec.name} is already finished ({len(grid)} trials): 0 trials to run; "
                  "writing its summary and report again", flush=True)  # fmt: skip
            return grid
    grace = stop_on_sigterm()
    try:
        grid = tuner.fit()
    except KeyboardInterrupt:
        print(f"search interrupted; run the same command again to continue it ({places.search_dir})", file=sys.stderr)
        return None
    finally:
        grace.cancel()
    unfinished = unfinished_trials(grid)
    if unfinished or len(grid) < expected_trials(spec):
        print(f"search interrupted with {len(unfinished)} unfinished trial(s); run the same command again to "
              f"continue it ({places.search_dir})", file=sys.stderr)  # fmt: skip
        return None
    return grid
