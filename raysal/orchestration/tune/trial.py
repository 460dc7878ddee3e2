"""One trial of a search: the Tune trainable that runs one Ray Train run, named after the Tune trial id, under
the search's trials folder, with the values the driver pinned (`search_pins`); its failure reason in the run
folder, a stall watchdog around it.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any

import ray
import ray.tune
from ray import tune

from raysal import storage
from raysal.orchestration.train.compose import compose_cfg
from raysal.orchestration.train.confirm import Asked, ConfirmAtEnd
from raysal.orchestration.train.fail_reason import clear_reason, read_reason, write_reason
from raysal.orchestration.train.heartbeat import read_heartbeat
from raysal.orchestration.train.outage import fit_through_outages
from raysal.orchestration.train.spec import RunSpec, spec_from_cfg
from raysal.orchestration.train.stale_checkpoints import remove_stale_checkpoints
from raysal.orchestration.train.trainer import build_trainer
from raysal.orchestration.tune.stall import StallWatchdog
from raysal.orchestration.tune.summary import trial_overrides
from raysal.orchestration.tune.trial_reports import relay_reports
from raysal.search.finalists import ARM_KEY
from raysal.search.override_text import format_override

DRIVER_RESOURCE = "TRAIN_DRIVER"  # custom resource of the head node (cluster.yaml): trial drivers run there


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


class TrialFailed(RuntimeError):
    """A trial that must not be ranked: diverged, stalled, or failed after Ray Train's own retries."""


def search_pins(run_spec: RunSpec) -> tuple[str, ...]:
    """Values a trial must take from the driver, not re-resolve where it runs: ``cache_dir`` comes from the
    environment (``RAYSAL_CACHE``, ``HOME``), and a trial process on the head has the raylet's environment, not the
    driver's; the demo's data and model paths are made from it and were checked by the driver's preflight.
    ``finder.out`` (``${storage_path}/heads``) is the search's: a trial's ``storage_path`` is its trials folder."""
    return (
        format_override("cache_dir", str(run_spec.config["cache_dir"])),
        format_override("finder.out", str(run_spec.config["finder"]["out"])),
    )


def run_trial(
    config: dict[str, Any],
    *,
    base: list[str],
    control: tuple[str, ...],
    trials_dir: str,
    pins: tuple[str, ...] = (),
    objective: tuple[str, str] = ("val/amr", "max"),
    datasets: dict[str, Any] | None = None,
    confirm: Asked | None = None,
) -> None:
    """The Tune trainable: one Train run per trial, named after the Tune trial id (stable across restore).
    ``datasets``: the search's encoded once (`raysal.orchestration.tune.shared_data`), else the run encodes its own.
    ``confirm``: what a run of the finalists' stage evaluates on the confirmation hold-out before it ends, its model
    still in memory (`ConfirmAtEnd`).

    Lost workers and nodes are retried inside the run by Ray Train (``trainer.max_failures``; a worker group that
    waits for resources, without limit), a storage outage by running the run again from its last checkpoint
    (`raysal.orchestration.train.outage`); what reaches here is a real failure: its reason goes to the run folder
    (`raysal.orchestration.train.fail_reason`) and the trial raises, so Tune marks it ERROR and Optuna FAIL. The stall
    watchdog ends a trial whose workers run without reporting (``trainer.stall_timeout_s``) or never run
    (``trainer.wait_timeout_s``) the same way. Its reports reach Tune with their checkpoints
    (`raysal.orchestration.tune.trial_reports`; ``objective``: (metric, mode), which checkpoint is the best)."""
    trial_id = ray.tune.get_context().get_trial_id()
    spec = spec_from_cfg(compose_cfg(trial_run_overrides(base, config, control, trial_id, trials_dir, pins)))
    after_fit = ConfirmAtEnd(confirm) if confirm is not None and ARM_KEY in config else None
    run_dir = storage.join(trials_dir, trial_id)
    remove_stale_checkpoints(run_dir)
    clear_reason(run_dir)
    stall, wait = spec.config["trainer"]["stall_timeout_s"], spec.config["trainer"]["wait_timeout_s"]
    beats = partial(read_heartbeat, spec.run_dir)  # the key rank 0 beats under
    watchdog = (
        StallWatchdog(run_dir, stall, partial(write_reason, run_dir), wait_timeout_s=wait, heartbeat=beats)
        if stall or wait
        else contextlib.nullcontext()
    )
    try:
        with watchdog:
            trainer = partial(build_trainer, spec, datasets=datasets, after_fit=after_fit)
            relay_reports(lambda callbacks: fit_through_outages(lambda: trainer(callbacks=callbacks).fit(), run_dir),
                          *objective)  # fmt: skip
    except Exception as e:
        cause = e.__cause__ or e
        write_reason(run_dir, f"failed: {type(cause).__name__}: {' '.join(str(cause).split())[:500]}")
        raise
    reason = read_reason(run_dir)  # a diverged run stops itself and leaves its reason there
    if reason:
        raise TrialFailed(reason)


def trial_dirname(trial: Any) -> str:
    return trial.trial_id  # the default packs every sampled value into the folder name


def make_trainable(
    base: list[str], control: tuple[str, ...], trials_dir: str, pins: tuple[str, ...],
    objective: tuple[str, str] = ("val/amr", "max"), datasets: dict[str, Any] | None = None,
    confirm: Asked | None = None,
) -> Any:  # fmt: skip

    return tune.with_resources(
        partial(
            run_trial,
            base=base,
            control=control,
            trials_dir=trials_dir,
            pins=pins,
            objective=objective,
            datasets=datasets,
            confirm=confirm,
        ),
        {"CPU": 0, DRIVER_RESOURCE: 1} if DRIVER_RESOURCE in ray.cluster_resources() else {"CPU": 0},
    )
