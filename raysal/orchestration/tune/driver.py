"""The search driver behind ``python -m raysal.tune`` (see its docstring for what a search does): checks before Ray
starts (`prepare_search`), the Tune trainable (`run_trial`: one Ray Train run per trial), and `run_search` in named
steps — where the search's things live (`search_places`), Ray (`connect_ray`), restore or start (`restore_tuner`,
`new_tuner`: the study, the searcher, the scheduler, the callbacks), run (`run_tuner`), and the end (`finish`:
summary, study, report). The summary and the report themselves are in `search_summary`.

The search folder on storage (``<storage_path>/<name>``, local or a URI) is the whole search: Tune's experiment
state, the trials' Train runs, the Optuna study (`study_store`), summary.json, the report, the janitor's log and the
W&B files. A driver on a new head (the old one lost) resumes from it with the same command.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from raysal import storage
from raysal.orchestration.train.compose import compose_cfg
from raysal.orchestration.tune.study_store import StudyStore, redact, study_store
from raysal.orchestration.tune.summary import report, summarise, trial_overrides
from raysal.search.override_text import format_override
from raysal.search.space import SearchSpaceError, SearchSpec
from raysal.search.space_file import load_search_space
from raysal.search.validate_space import validate_against

log = logging.getLogger("raysal.tune")
STOP_GRACE_S = 20.0  # after SIGTERM, how long Tune may take to stop trials gracefully
DRIVER_RESOURCE = "TRAIN_DRIVER"  # custom resource of the head node (cluster.yaml): trial drivers run there
# how often Tune uploads its experiment state (small files) to storage: what a lost head can lose of trial events
# (Ray's default is 300 s); the study reconciles the rest (`raysal.search.control.settle_study`)
STATE_SYNC_S = 10


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
    base: list[str], config: dict[str, Any], control: tuple[str, ...], trial_id: str, trials_dir: str,
    pins: tuple[str, ...] = (),
) -> list[str]:  # fmt: skip
    """The Train run of a trial: named after the Tune trial id, under the search's trials folder; W&B is logged
    by the Tune-side callback instead. ``pins``: the search-level values the driver resolved (`search_pins`)."""
    return [
        *trial_overrides(base, config, control),
        *pins,
        format_override("name", trial_id),  # quoted: Hydra reads an id like 71e76940 as a float (inf)
        format_override("storage_path", trials_dir),
        "wandb.mode=disabled",
    ]


class SearchStateError(RuntimeError):
    """The search folder cannot be resumed as it is (said in one line, exit 2)."""


class TrialFailed(RuntimeError):
    """A trial that must not be ranked: diverged, stalled, or failed after Ray Train's own retries."""


def search_pins(run_spec: Any) -> tuple[str, ...]:
    """Values a trial must take from the driver, not re-resolve where it runs: ``cache_dir`` comes from the
    environment (``RAYSAL_CACHE``, ``HOME``), and a trial process on the head has the raylet's environment, not the
    driver's; the demo's data and model paths are made from it and were checked by the driver's preflight.
    ``finder.out`` (``${storage_path}/heads``) is the search's: a trial's ``storage_path`` is its trials folder."""
    return (
        format_override("cache_dir", str(run_spec.config["cache_dir"])),
        format_override("finder.out", str(run_spec.config["finder"]["out"])),
    )


def run_trial(
    config: dict[str, Any], *, base: list[str], control: tuple[str, ...], trials_dir: str, pins: tuple[str, ...] = ()
) -> None:
    """The Tune trainable: one Train run per trial, named after the Tune trial id (stable across restore).

    Lost workers and nodes are retried inside the run by Ray Train (``trainer.max_failures``; a worker group that
    waits for resources, without limit); what reaches here is a real failure: its reason goes to the run folder
    (`raysal.orchestration.train.fail_reason`) and the trial raises, so Tune marks it ERROR and Optuna FAIL. The stall
    watchdog ends a trial whose workers run without reporting (``trainer.stall_timeout_s``) or never run
    (``trainer.wait_timeout_s``) the same way."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raysal.orchestration.train.fail_reason import clear_reason, read_reason, write_reason
    from raysal.orchestration.train.heartbeat import read_heartbeat
    from raysal.orchestration.train.spec import spec_from_cfg
    from raysal.orchestration.train.stale_checkpoints import remove_stale_checkpoints
    from raysal.orchestration.train.trainer import build_trainer
    from raysal.orchestration.tune.stall import StallWatchdog

    trial_id = ray.tune.get_context().get_trial_id()
    spec = spec_from_cfg(compose_cfg(trial_run_overrides(base, config, control, trial_id, trials_dir, pins)))
    run_dir = storage.join(trials_dir, trial_id)
    remove_stale_checkpoints(run_dir)
    clear_reason(run_dir)
    stall, wait = spec.config["trainer"]["stall_timeout_s"], spec.config["trainer"]["wait_timeout_s"]
    beats = partial(read_heartbeat, storage.join(spec.storage_path, spec.name))  # the key rank 0 beats under
    watchdog = (
        StallWatchdog(run_dir, stall, partial(write_reason, run_dir), wait_timeout_s=wait, heartbeat=beats)
        if stall or wait
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


def live_placement_groups() -> list[dict[str, Any]]:
    from ray.util import placement_group_table

    return [pg for pg in placement_group_table().values() if pg.get("state") in ("CREATED", "PENDING", "RESCHEDULING")]


def leaked_placement_groups(settle_s: float = 60.0, poll_s: float = 0.5) -> int:
    """Placement groups still alive after the search (trials stopped by ASHA must release theirs). Tune and Ray
    Train remove the last trial's asynchronously, so this waits until none is left, up to ``settle_s`` (a loaded
    machine takes seconds), and names what is still alive then."""
    deadline = time.monotonic() + settle_s
    live = live_placement_groups()
    while live and time.monotonic() < deadline:
        time.sleep(poll_s)
        live = live_placement_groups()
    for pg in live:
        log.warning("placement group %s (%s, %s) still alive %.0f s after the search", pg.get("placement_group_id"),
                    pg.get("name") or "unnamed", pg.get("state"), settle_s)  # fmt: skip
    return len(live)


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
    import ray
    from ray._private.state import state

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
    import yaml

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


def _max_concurrent(spec: SearchSpec, encode_cpus: float) -> int | None:
    """Trials at once: the file's value, or what the cluster can hold — GPUs for GPU trials, and CPUs always (a
    trial whose data pipeline finds no CPU waits for ever). An autoscaling cluster is bounded by what it can grow
    to (the autoscaler's node types), a fixed one by what it has. With neither (nodes not up, their types unknown)
    the search refuses to start: unbounded, every trial would start at once and wait for nodes. Says the bound and
    why; raises `ConfigError` (one line) before any trial starts."""
    import ray

    from raysal.orchestration.train.errors import ConfigError

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


def missing_heads_table(spec: SearchSpec, run_spec: Any) -> str | None:
    """The head finder's table that a space which may pick ``heads: localization`` needs (every such trial reads
    it), when it does not exist yet; None when the space never picks it or the table is there."""
    from raysal.attention.head_scores import heads_file
    from raysal.search.space import Choice, Fixed

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


def find_heads(overrides: list[str]) -> str:
    """A Ray task: the head finder (`raysal.heads.find`) on the search's base config → the table it wrote."""
    from raysal.heads import find
    from raysal.orchestration.train.compose import compose_cfg

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return find(compose_cfg(overrides))


def ensure_heads_table(spec: SearchSpec, base: list[str], run_spec: Any, pins: tuple[str, ...]) -> None:
    """Before any trial: a space that may pick ``heads: localization`` and finds no table for its model gets one,
    made by the head finder as a Ray task with one worker's resources (a GPU on a cluster, not the CPU-only head),
    written to the search's storage (``finder.out``), where every trial and every later search finds it."""
    import ray

    file = missing_heads_table(spec, run_spec)
    if file is None:
        return
    r = spec.resources
    need = {"num_cpus": r.cpus_per_worker, "num_gpus": r.gpus_per_worker if r.use_gpu else 0}
    print(f"raysal: the space may pick heads: localization and {file} does not exist yet: scoring the base model's "
          f"heads first (a Ray task with one worker's resources: {need['num_cpus']:g} CPU, {need['num_gpus']:g} "
          "GPU)", flush=True)  # fmt: skip
    task = ray.remote(max_retries=2, **need)(find_heads)  # a lost node is retried; a bad config is not
    try:
        written = ray.get(task.remote([*base, *pins]))
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if getattr(e, "cause", None) is not None else e
        raise SearchStateError(f"the head finder failed before the search could start ({file}): "
                               f"{type(cause).__name__}: {' '.join(str(cause).split())[:500]}") from None  # fmt: skip
    print(f"raysal: heads table {written}: read by every trial that picks heads: localization, and reused by "
          "later searches of this model", flush=True)  # fmt: skip


@dataclass(frozen=True)
class SearchPlaces:
    """Where a search's things live."""

    search_dir: str  # <storage_path>/<name>: local path or URI, the whole search
    trials_dir: str  # <search>/trials: one Train run per trial
    local_dir: Path  # the driver's disk: W&B files before they are copied (the search folder itself when local)
    study: StudyStore


def search_places(spec: SearchSpec, run_spec: Any) -> SearchPlaces:
    search_dir = storage.join(run_spec.storage_path, spec.name)
    local = storage.local_path(search_dir) or Path(run_spec.config["cache_dir"]).expanduser() / "searches" / spec.name
    study = study_store(search_dir, spec.name, spec.optuna_storage, str(run_spec.config["cache_dir"]))
    return SearchPlaces(search_dir, storage.join(search_dir, "trials"), local, study)


def check_study(places: SearchPlaces) -> None:
    """The study's place works: the driver's disk for a working copy, or the database answers."""
    from raysal.orchestration.train.preflight import check_writable

    if places.study.published_separately:
        check_writable(str(Path(places.study.working).parent), "cache_dir")
    if places.study.in_database:
        import optuna

        from raysal.orchestration.train.errors import ConfigError

        try:
            optuna.storages.RDBStorage(places.study.url)
        except Exception as e:
            reason = " ".join(str(e).split())[:300].replace(places.study.url, redact(places.study.url))
            where = f"optuna_storage={redact(places.study.url)}"
            raise ConfigError(f"{where}: cannot open the database ({reason})") from None


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
    from raysal.orchestration.train.preflight import preflight
    from raysal.orchestration.train.spec import objective_metrics, spec_from_cfg

    run_spec = spec_from_cfg(compose_cfg(base))
    reported = objective_metrics(run_spec.criteria, run_spec.config.get("trainer"))
    for i, o in enumerate(spec.objectives):
        if o.metric not in reported and not o.metric.startswith("train/loss/"):
            raise SearchSpaceError(
                path, f"objectives[{i}].metric", f"{o.metric!r} is not reported ({sorted(reported)})"
            )
    if spec.control is not None:  # the control trial's config must compose too, before anything runs
        spec_from_cfg(compose_cfg([*base, *spec.control.overrides]))
    sizes = preflight(run_spec)  # once, here, rather than racing in concurrent trials
    check_study(search_places(spec, run_spec))
    return spec, base, run_spec, sizes


def connect_ray(verbose: bool) -> None:
    """The cluster at RAY_ADDRESS (``ray job submit`` sets it), or a local one with the head's trial-driver
    resource. The console shows raysal's one line per trial event (`ProgressLines`); -v brings back Ray's own
    output: worker logs, status tables, Ray's INFO lines and its slow-callback warnings."""
    import optuna
    import ray

    from raysal.orchestration.train.placement_groups import JOB_RUNTIME_ENV

    quiet: dict[str, Any] = {} if verbose else {"log_to_driver": False, "logging_level": logging.WARNING}
    if not verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created ...": raysal says it
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=JOB_RUNTIME_ENV, **quiet)
    else:  # a local cluster: advertise the trial-driver resource the head node has on a real cluster
        ray.init(resources={DRIVER_RESOURCE: 64}, runtime_env=JOB_RUNTIME_ENV, **quiet)


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


def restorable(search_dir: str) -> bool:
    """Tune wrote its experiment state there (a folder left by a search that failed to start is not)."""
    return any(n.startswith("experiment_state-") and n.endswith(".json") for n in storage.list_names(search_dir))


def make_trainable(base: list[str], control: tuple[str, ...], trials_dir: str, pins: tuple[str, ...]) -> Any:
    import ray
    from ray import tune

    return tune.with_resources(
        partial(run_trial, base=base, control=control, trials_dir=trials_dir, pins=pins),
        {"CPU": 0, DRIVER_RESOURCE: 1} if DRIVER_RESOURCE in ray.cluster_resources() else {"CPU": 0},
    )


def restore_tuner(places: SearchPlaces, trainable: Any) -> Any:
    """Tune's experiment from the search folder (local or a URI), its searcher re-opening the study here.
    Errored trials stay errored: Ray Train already retried their infrastructure failures, and a diverged trial
    would only diverge again."""
    from ray import tune

    from raysal.orchestration.tune import study_store as study_module

    places.study.fetch()  # a new or wiped head: the study published in the search folder
    if places.study.working is not None and not Path(places.study.working).exists():
        raise SearchStateError(
            f"{places.search_dir}: Tune's state is there but not the Optuna study ({places.study.home}): the search "
            "cannot resume; run with resume=false to start it over"
        )
    study_module.active = places.study
    log.info("resuming the search in %s (study: %s)", places.search_dir, places.study.describe())
    return tune.Tuner.restore(places.search_dir, trainable, resume_unfinished=True, resume_errored=False)


def make_scheduler(spec: SearchSpec) -> Any:
    from ray.tune.schedulers import FIFOScheduler

    from raysal.search.control import ControlAwareASHA

    s = spec.scheduler
    if s.type != "asha":
        return FIFOScheduler()
    return ControlAwareASHA(time_attr=s.time_attr, metric=spec.metric, mode=spec.mode, max_t=s.max_t,
                            grace_period=s.grace_period, reduction_factor=s.reduction_factor)  # fmt: skip


def make_callbacks(spec: SearchSpec, run_spec: Any, places: SearchPlaces, wandb_mode: str) -> list:
    """Raysal's console lines, the placement-group janitor (removes the Train placement group of an ended trial
    if Ray Train did not: see placement_groups.py) and W&B (one run per trial)."""
    from raysal.orchestration.train.placement_groups import PlacementGroupJanitor
    from raysal.orchestration.tune.progress import ProgressLines
    from raysal.orchestration.tune.wandb_callback import SearchWandbCallback

    s = spec.scheduler
    callbacks: list = [
        PlacementGroupJanitor(places.trials_dir, places.search_dir),
        ProgressLines(spec.metric, s.time_attr, s.max_t if s.type == "asha" else None, places.trials_dir),
    ]
    if wandb_mode != "disabled":
        callbacks.append(
            SearchWandbCallback(
                trials_dir=places.trials_dir,
                mirror_to=places.search_dir,
                project=run_spec.wandb["project"],
                entity=run_spec.wandb.get("entity"),
                group=spec.name,
                mode=wandb_mode,
                dir=str(places.local_dir),
                tags=run_spec.wandb.get("tags") or None,
            )
        )
    return callbacks


def new_tuner(spec: SearchSpec, run_spec: Any, places: SearchPlaces, trainable: Any, wandb_mode: str,
              verbose: bool) -> Any:  # fmt: skip
    """A search that starts: the study (kept if the search folder has one), the control queued first, the
    searcher, the scheduler and the callbacks. Raises `ConfigError` when the cluster cannot say how many trials
    it holds (`_max_concurrent`), before the study is touched."""
    import optuna
    from ray import tune

    from raysal.orchestration.tune import study_store as study_module
    from raysal.orchestration.tune.optuna_search import ReasonedOptunaSearch
    from raysal.search.control import open_study, settle_study
    from raysal.search.sampling import define_by_run

    max_concurrent = _max_concurrent(spec, float(run_spec.data["encode_cpus"]))
    if places.study.published_separately and not storage.is_file(places.study.home):
        places.study.discard_working_copy()  # the search folder has no study: a copy here is an older search's
    places.study.fetch()
    study_module.active = places.study
    settled = settle_study(open_study(spec.name, places.study.url, spec), set(), want_control=spec.control is not None,
                           fresh=True)  # fmt: skip
    if settled["lost"]:
        log.warning("%d trial(s) of the study were left running by an earlier driver: marked FAIL", settled["lost"])
    if settled["control_enqueued"]:
        log.info("control trial enqueued first: %s", " ".join(spec.control.overrides))
    searcher = ReasonedOptunaSearch(
        space=define_by_run(spec), metric=spec.metric, mode=spec.mode,
        sampler=optuna.samplers.TPESampler(seed=spec.seed), storage=optuna.storages.RDBStorage(places.study.url),
        study_name=spec.name, trials_dir=places.trials_dir, store=places.study,
    )  # fmt: skip
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=make_scheduler(spec),
            num_samples=spec.num_samples + (spec.control is not None),  # the control is one more trial
            max_concurrent_trials=max_concurrent,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            verbose=2 if verbose else 0,  # 0: no status tables (raysal prints a line per trial event)
            storage_path=run_spec.storage_path,
            callbacks=make_callbacks(spec, run_spec, places, wandb_mode),
            failure_config=tune.FailureConfig(max_failures=0),  # retries happen inside the trial (Ray Train)
            sync_config=tune.SyncConfig(sync_period=STATE_SYNC_S),
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


def finish(grid: Any, spec: SearchSpec, base: list[str], run_spec: Any, places: SearchPlaces, wandb_mode: str,
           t0: float) -> int:  # fmt: skip
    """summary.json, the study and the report, all in the search folder; the console's last line."""
    from raysal.orchestration.train.placement_groups import removed_count
    from raysal.orchestration.train.wandb_run import sync_hint
    from raysal.search.verdict import verdict

    summary = summarise(grid, spec, base, places.search_dir)
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
    report(places.search_dir, run_spec, wandb_mode, places.local_dir, spec.name)
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


def guard_lines(summary: dict) -> list[str]:
    """One console line per guard: what the control scored, the limit, the trials that failed it."""
    out = []
    for metric, g in (summary.get("guards") or {}).items():
        failed = sorted(t for t, names in (summary.get("failed_guards") or {}).items() if metric in names)
        worse = "may fall by at most" if g["mode"] == "max" else "may rise by at most"
        out.append(f"guard {metric} ({worse} {g['max_loss']:g}): control {g['control']:.4g}, limit "
                   f"{g['limit']:.4g}; failed by {', '.join(failed) if failed else 'no trial'}")  # fmt: skip
    return out


def run_search(spec: SearchSpec, base: list[str], run_spec: Any, resume: str, verbose: bool = False) -> int:
    from raysal.orchestration.train.wandb_run import resolve_mode

    places = search_places(spec, run_spec)
    places.local_dir.mkdir(parents=True, exist_ok=True)
    connect_ray(verbose)
    control = spec.control.overrides if spec.control else ()
    try:
        ensure_heads_table(spec, base, run_spec, search_pins(run_spec))
    except SearchStateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainable = make_trainable(base, control, places.trials_dir, search_pins(run_spec))
    # a run that diverged reports its reason without the objective (then stops): Tune must not take that for a
    # misspelt metric (the objectives were checked against the reported metrics before the search started)
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    wandb_mode = resolve_mode(run_spec.wandb["mode"])
    if wandb_mode == "offline":
        os.environ["WANDB_MODE"] = "offline"  # Ray's callback insists on an API key unless W&B itself is offline
    restore = resume != "false" and restorable(places.search_dir)
    if resume == "true" and not restore:
        print(f"error: resume=true but there is no search to restore in {places.search_dir}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if restore:
        try:
            tuner = restore_tuner(places, trainable)
        except SearchStateError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        from raysal.orchestration.train.errors import ConfigError, print_user_error

        try:
            tuner = new_tuner(spec, run_spec, places, trainable, wandb_mode, verbose)
        except ConfigError as e:  # no bound on trials at once: one `error:` line, exit 2, nothing started
            return print_user_error(e)
    grid = run_tuner(tuner, spec, places, restore)
    if grid is None:
        return 130
    return finish(grid, spec, base, run_spec, places, wandb_mode, t0)
