"""The search driver behind ``python -m raysal.tune`` (see its docstring for what a search does): checks before Ray
starts (`prepare_search`), the Tune trainable (`run_trial`: one Ray Train run per trial), and the Tuner with Optuna,
ASHA, the control trial, W&B and the janitors (`run_search`); the summary and the report are in `search_summary`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

from raysal.orchestration.compose import compose_cfg
from raysal.orchestration.search_summary import report, summarise, trial_overrides
from raysal.orchestration.storage import is_uri
from raysal.search.override_text import format_override
from raysal.search.space import SearchSpaceError, SearchSpec
from raysal.search.space_file import load_search_space
from raysal.search.validate_space import validate_against

log = logging.getLogger("raysal.tune")
STOP_GRACE_S = 20.0  # after SIGTERM, how long Tune may take to stop trials gracefully
DRIVER_RESOURCE = "TRAIN_DRIVER"  # custom resource of the head node (cluster.yaml): trial drivers run there


def resource_overrides(spec: SearchSpec) -> list[str]:
    """The file's per-trial resources, as the `scaling` config of every trial's Train run."""
    r = spec.resources
    return [
        f"scaling.num_workers={r.num_workers}",
        f"scaling.use_gpu={str(r.use_gpu).lower()}",
        f"scaling.cpus_per_worker={r.cpus_per_worker}",
        f"scaling.gpus_per_worker={r.gpus_per_worker}",
    ]


def trial_run_overrides(
    base: list[str], config: dict[str, Any], control: tuple[str, ...], trial_id: str, trials_dir: str
) -> list[str]:
    """The Train run of a trial: named after the Tune trial id, under the search's trials folder; W&B is logged
    by the Tune-side callback instead."""
    return [
        *trial_overrides(base, config, control),
        format_override("name", trial_id),  # quoted: Hydra reads an id like 71e76940 as a float (inf)
        format_override("storage_path", trials_dir),
        "wandb.mode=disabled",
    ]


class TrialFailed(RuntimeError):
    """A trial that must not be ranked: diverged, stalled, or failed after Ray Train's own retries."""


def run_trial(config: dict[str, Any], *, base: list[str], control: tuple[str, ...], trials_dir: str) -> None:
    """The Tune trainable: one Train run per trial, named after the Tune trial id (stable across restore).

    Lost workers and nodes are retried inside the run by Ray Train (``trainer.max_failures``); what reaches here
    is a real failure: its reason goes to the run folder (`raysal.orchestration.fail_reason`) and the trial raises,
    so Tune marks it ERROR and Optuna FAIL."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raysal.orchestration.fail_reason import clear_reason, read_reason, write_reason
    from raysal.orchestration.spec import spec_from_cfg
    from raysal.orchestration.stale_checkpoints import remove_stale_checkpoints
    from raysal.orchestration.trainer import build_trainer
    from raysal.search.stall import StallWatchdog

    trial_id = ray.tune.get_context().get_trial_id()
    spec = spec_from_cfg(compose_cfg(trial_run_overrides(base, config, control, trial_id, trials_dir)))
    run_dir = f"{trials_dir}/{trial_id}"
    remove_stale_checkpoints(run_dir)
    clear_reason(run_dir)
    timeout = spec.config["trainer"]["stall_timeout_s"]
    watchdog = (
        StallWatchdog(run_dir, timeout, lambda reason: write_reason(run_dir, reason))
        if timeout
        else contextlib.nullcontext()
    )
    try:
        with watchdog:
            build_trainer(spec, callbacks=[TuneReportCallback()]).fit()
    except Exception as e:
        cause = e.__cause__ or e
        write_reason(run_dir, f"failed: {type(cause).__name__}: {' '.join(str(cause).split())[:500]}")
        raise
    reason = read_reason(run_dir)  # a diverged run stops itself and leaves its reason there
    if reason:
        raise TrialFailed(reason)


def trial_dirname(trial: Any) -> str:
    return trial.trial_id  # the default packs every sampled value into the folder name


def leaked_placement_groups() -> int:
    """Placement groups still alive after the search (trials stopped by ASHA must release theirs)."""
    from ray.util import placement_group_table

    return sum(
        1 for pg in placement_group_table().values() if pg.get("state") in ("CREATED", "PENDING", "RESCHEDULING")
    )


def trial_cpus(spec: SearchSpec, encode_cpus: float) -> float:
    """CPUs one trial holds: its Train workers plus its data pipelines' budget (`DataCPUs`)."""
    r = spec.resources
    return r.num_workers * r.cpus_per_worker + encode_cpus


def _max_concurrent(spec: SearchSpec, encode_cpus: float) -> int | None:
    """Trials at once: the file's value, or what the cluster holds — GPUs for GPU trials, and CPUs always (a trial
    whose data pipeline finds no CPU waits for ever)."""
    import ray

    if spec.max_concurrent_trials:
        return spec.max_concurrent_trials
    r = spec.resources
    total = ray.cluster_resources()
    n = int(total.get("CPU", 0) // trial_cpus(spec, encode_cpus))
    if r.use_gpu:
        per = r.num_workers * r.gpus_per_worker
        n = min(n, int(total.get("GPU", 0) // per)) if per else n
    return n or None  # 0: the GPU nodes are not up yet (autoscaling) — let Tune queue trials


def check_localization_heads(spec: SearchSpec, path: Path, run_spec: Any) -> None:
    """A space that may pick ``heads: localization`` needs the head finder's table for the model before any trial
    (every such trial would fail on its own otherwise)."""
    from raysal.attention.head_scores import heads_file
    from raysal.search.space import Choice, Fixed, key_where

    def values(dist: Any) -> list[Any]:
        if isinstance(dist, Choice):
            return [o.value for o in dist.options]
        return [dist.value] if isinstance(dist, Fixed) else []

    def walk(space: Any, requires: tuple) -> None:
        for p in space.params:
            if p.key.endswith(".heads") and "localization" in values(p.dist):
                file = heads_file(run_spec.config["finder"]["out"], run_spec.model["name_or_path"])
                if not file.is_file():
                    raise SearchSpaceError(path, key_where(requires, p.key), f"may pick localization, but {file} "
                                           "does not exist: run `python -m raysal.heads` with the same overrides "
                                           "first")  # fmt: skip
            if isinstance(p.dist, Choice):
                for o in p.dist.options:
                    walk(o.space, (*requires, (p.key, o.value)))

    walk(spec.space, ())


def prepare_search(path: Path, cli: list[str]) -> tuple[SearchSpec, list[str], Any, Any]:
    """Every check of a search before Ray starts → (space, base overrides, the base run spec, data sizes).
    Raises on bad input (the entry point prints one `error:` line)."""
    profile = next((o.split("=", 1)[1] for o in cli if o.startswith("experiment=")), None)
    spec = load_search_space(path, profile)
    base = [*spec.base_overrides, *resource_overrides(spec), *cli]
    validate_against(spec, compose_cfg)  # every key and option must exist: fail before any trial starts
    from raysal.orchestration.preflight import check_writable, preflight
    from raysal.orchestration.spec import objective_metrics, spec_from_cfg

    run_spec = spec_from_cfg(compose_cfg(base))
    reported = objective_metrics(run_spec.criteria)
    for i, o in enumerate(spec.objectives):
        if o.metric not in reported and not o.metric.startswith("train/loss/"):
            raise SearchSpaceError(
                path, f"objectives[{i}].metric", f"{o.metric!r} is not reported ({sorted(reported)})"
            )
    if spec.control is not None:  # the control trial's config must compose too, before anything runs
        spec_from_cfg(compose_cfg([*base, *spec.control.overrides]))
    check_localization_heads(spec, path, run_spec)
    sizes = preflight(run_spec)  # once, here, rather than racing in concurrent trials
    if is_uri(run_spec.storage_path):  # the Optuna study is a local SQLite file
        check_writable(str(Path(run_spec.config["cache_dir"]) / "searches"), "cache_dir")
    return spec, base, run_spec, sizes


def run_search(spec: SearchSpec, base: list[str], run_spec: Any, resume: str, verbose: bool = False) -> int:
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from raysal.orchestration.placement_groups import JOB_RUNTIME_ENV, PlacementGroupJanitor, removed_count
    from raysal.orchestration.wandb_callback import SearchWandbCallback
    from raysal.orchestration.wandb_run import resolve_mode, sync_hint
    from raysal.search.control import ControlAwareASHA, enqueue_control
    from raysal.search.optuna_search import ReasonedOptunaSearch
    from raysal.search.progress import ProgressLines
    from raysal.search.sampling import define_by_run

    storage = run_spec.storage_path
    search_dir = f"{storage}/{spec.name}"
    # the driver's own files (Optuna's SQLite study, summary.json) stay on the head node's disk
    local_dir = Path(search_dir)
    if is_uri(search_dir):
        local_dir = Path(run_spec.config["cache_dir"]) / "searches" / spec.name
    control = spec.control.overrides if spec.control else ()
    # the console shows raysal's one line per trial event (`ProgressLines`); -v brings back Ray's own output:
    # worker logs, status tables, Ray's INFO lines and its slow-callback warnings
    quiet: dict[str, Any] = {} if verbose else {"log_to_driver": False, "logging_level": logging.WARNING}
    if not verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created ...": raysal says it
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=JOB_RUNTIME_ENV, **quiet)
        else:  # a local cluster: advertise the trial-driver resource the head node has on a real cluster
            ray.init(resources={DRIVER_RESOURCE: 64}, runtime_env=JOB_RUNTIME_ENV, **quiet)
    # SIGTERM (a preempted head, `kill`) stops the search the way Ctrl-C does: Tune's SIGINT handler stops the
    # trials and saves the experiment state, so the same command resumes it. Tune's graceful stop can wait on a
    # trial whose Train worker group is still starting; after STOP_GRACE_S a second SIGINT skips that wait (Tune's
    # own "press Ctrl-C again"), the state saved so far is kept.
    grace = threading.Timer(STOP_GRACE_S, lambda: os.kill(os.getpid(), signal.SIGINT))
    grace.daemon = True

    def on_sigterm(*_: Any) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        if not grace.is_alive():
            grace.start()

    signal.signal(signal.SIGTERM, on_sigterm)

    trainable = tune.with_resources(
        partial(run_trial, base=base, control=control, trials_dir=f"{search_dir}/trials"),
        {"CPU": 0, DRIVER_RESOURCE: 1} if DRIVER_RESOURCE in ray.cluster_resources() else {"CPU": 0},
    )
    # a run that diverged reports its reason without the objective (then stops): Tune must not take that for a
    # misspelt metric (the objectives were checked against the reported metrics before the search started)
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    wandb_mode = resolve_mode(run_spec.wandb["mode"])
    if wandb_mode == "offline":
        os.environ["WANDB_MODE"] = "offline"  # Ray's callback insists on an API key unless W&B itself is offline
    # restorable = Tune wrote its experiment state there (a folder left by a search that failed to start is not)
    restore = resume != "false" and not is_uri(search_dir) and any(Path(search_dir).glob("experiment_state-*.json"))
    if resume == "true" and not restore:
        print(f"error: resume=true but there is no search to restore in {search_dir}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if restore:
        log.info("resuming the search in %s", search_dir)
        # errored trials stay errored: Ray Train already retried their infrastructure failures, and a diverged
        # trial would only diverge again
        tuner = tune.Tuner.restore(search_dir, trainable, resume_unfinished=True, resume_errored=False)
    else:
        local_dir.mkdir(parents=True, exist_ok=True)
        db = optuna.storages.RDBStorage(f"sqlite:///{local_dir / 'optuna.db'}")
        if spec.control is not None and enqueue_control(spec.name, db, spec):
            log.info("control trial enqueued first: %s", " ".join(spec.control.overrides))
        searcher = ReasonedOptunaSearch(
            space=define_by_run(spec), metric=spec.metric, mode=spec.mode,
            sampler=optuna.samplers.TPESampler(seed=spec.seed), storage=db, study_name=spec.name,
            trials_dir=f"{search_dir}/trials",
        )  # fmt: skip
        s = spec.scheduler
        scheduler = (
            ControlAwareASHA(
                time_attr=s.time_attr,
                metric=spec.metric,
                mode=spec.mode,
                max_t=s.max_t,
                grace_period=s.grace_period,
                reduction_factor=s.reduction_factor,
            )
            if s.type == "asha"
            else FIFOScheduler()
        )
        # removes the Train placement group of an ended trial if Ray Train did not (see placement_groups.py)
        callbacks: list = [
            PlacementGroupJanitor(f"{search_dir}/trials", str(local_dir)),
            ProgressLines(spec.metric, spec.scheduler.time_attr, spec.scheduler.max_t if s.type == "asha" else None,
                          f"{search_dir}/trials"),
        ]  # fmt: skip
        if wandb_mode != "disabled":
            callbacks.append(
                SearchWandbCallback(
                    trials_dir=f"{search_dir}/trials",
                    project=run_spec.wandb["project"],
                    entity=run_spec.wandb.get("entity"),
                    group=spec.name,
                    mode=wandb_mode,
                    dir=str(Path(search_dir) if not is_uri(search_dir) else Path.cwd()),
                    tags=run_spec.wandb.get("tags") or None,
                )
            )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=spec.num_samples + (spec.control is not None),  # the control is one more trial
                max_concurrent_trials=_max_concurrent(spec, float(run_spec.data["encode_cpus"])),
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=spec.name,
                verbose=2 if verbose else 0,  # 0: no status tables (raysal prints a line per trial event)
                storage_path=storage,
                callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=0),  # retries happen inside the trial (Ray Train)
            ),
        )
    try:
        grid = tuner.fit()
    except KeyboardInterrupt:
        print(f"search interrupted; run the same command again to continue it ({search_dir})", file=sys.stderr)
        return 130
    finally:
        grace.cancel()
    unfinished = [t.trial_id for t in grid._experiment_analysis.trials if t.status not in ("TERMINATED", "ERROR")]
    if unfinished or len(grid) < spec.num_samples + (spec.control is not None):
        print(f"search interrupted with {len(unfinished)} unfinished trial(s); run the same command again to "
              f"continue it ({search_dir})", file=sys.stderr)  # fmt: skip
        return 130
    summary = summarise(grid, spec, base, search_dir)
    time.sleep(2)  # placement groups of the last trial are removed asynchronously
    summary["leaked_placement_groups"] = leaked_placement_groups()
    summary["placement_groups_removed"] = removed_count(local_dir)  # by the janitor: Ray Train had left them
    if summary["leaked_placement_groups"]:
        log.warning("%d placement group(s) still alive after the search", summary["leaked_placement_groups"])
    Path(local_dir, "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(summary["table"])
    report(local_dir, run_spec, wandb_mode, search_dir, spec.name)
    best = summary.get("best")
    w = sync_hint(Path(search_dir)) if resolve_mode(run_spec.wandb["mode"]) == "offline" else ""
    print(
        f"raysal: search {spec.name} finished in {time.perf_counter() - t0:.0f}s — {summary['reported']}/"
        f"{summary['trials']} trials reported; best {best['trial_id'] if best else None}; exported: "
        f"{summary.get('best_adapter') or summary.get('best_model')}; folder: {search_dir}. {w}"
    )
    return 0 if best else 1  # failed trials are part of a search's result; no trial to export is not
