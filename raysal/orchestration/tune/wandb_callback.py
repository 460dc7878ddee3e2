"""W&B for a search: Ray's `WandbLoggerCallback` without writing the API key to disk, and without losing the
last rows of a trial.

Ray's callback gives its logging actor the key as ``runtime_env={"env_vars": {"WANDB_API_KEY": ...}}``, and Ray's
runtime-env agent logs every runtime env it sets up: the key ended up in plain text in
``<ray session>/logs/runtime_env_agent.log``, several times per search. Here the actor class is created without
that runtime env (the key is hidden from Ray's code path for the moment it builds it) and the key travels as a
constructor argument of the actor, which puts it in its own process environment only: Ray logs neither.

Ray kills a logging actor as soon as its ``run()`` returns, and the driver's exit kills the last ones; W&B's
``finish()`` can return before its core process has written the history, so the last trial of a search lost
every row (seen in the integration test). The actor's ``run()`` here ends with ``wandb.teardown()``, which waits
for W&B to finish writing.

W&B writes into ``dir`` on the driver's disk (the logging actors run on the driver's node); each actor copies its
trial's W&B folder to ``<search>/wandb/`` at every evaluation and when the trial ends (`mirror_wandb`), so the search
folder on storage holds them after a lost head.

A trial's run is named after its trial id, and its config is the whole run config it trained with under the
override names a user types (`raysal.orchestration.tune.wandb_config`), not Tune's searcher config, with no Ray
bookkeeping keys (``date``, ``hostname``, ``pid``…): the search is one comparable sweep; the control is tagged
``control``. Every metric's x-axis is ``train/step`` (``define_metric``), the objective and guarded metrics keep
their best value as the run's summary. Artifacts (the probe table) are staged inside the run's folder set
(``<dir>/wandb/artifacts-<id>``), not in ``~/.local/share/wandb``: `wandb sync` of the search's ``wandb/`` finds them.

Steps are ``train/step`` (not Tune's ``training_iteration``): the same x-axis as a single run's W&B run, and the
same after a resume. A restored trial (driver killed, search run again) resumes its W&B run and first re-logs the
rows of its Train run's latest checkpoint (``history.jsonl``) that the run lacks: rows a kill took before W&B wrote
them leave no gap.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import urllib.error
from collections.abc import Callable
from typing import Any

import pyarrow.fs
import ray.train
import wandb
from ray.air.integrations.wandb import WANDB_ENV_VAR, WandbLoggerCallback, _QueueItem, _WandbLoggingActor

from raysal import storage
from raysal.orchestration.train.probe_files import read_step, wandb_media
from raysal.orchestration.train.wandb_run import STEP, mirror_wandb, relog

logger = logging.getLogger(__name__)
_KEY_ARG = "raysal_wandb_api_key"
_HISTORY_ARG = "raysal_history"
_RUN_DIR_ARG = "raysal_run_dir"
_MIRROR_ARG = "raysal_mirror_to"
_MODES_ARG = "raysal_summary_modes"


class _SearchWandbLoggingActor(_WandbLoggingActor):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        key = kwargs.pop(_KEY_ARG, None)
        self._history = kwargs.pop(_HISTORY_ARG, [])
        self._run_dir = kwargs.pop(_RUN_DIR_ARG, None)  # the trial's Train run: its probe heatmaps
        self._mirror_to = kwargs.pop(_MIRROR_ARG, None)  # the search folder: W&B files are copied to its wandb/
        self._modes = kwargs.pop(_MODES_ARG, {})  # metric → "max"/"min": the run summary keeps that best value
        if key:
            os.environ[WANDB_ENV_VAR] = key  # this actor process only; never a file
        super().__init__(*args, **kwargs)

    def _probe_media(self, step: int) -> dict[str, Any]:

        try:
            rows, pictures = read_step(self._run_dir, step)
        except Exception as e:  # a missing picture must not cost the trial its metrics
            logger.warning("could not read the probe heatmaps of step %d in %s: %s", step, self._run_dir, e)
            return {}
        return wandb_media(rows, pictures) if rows else {}

    def _mirror(self) -> None:
        """The trial's W&B files (on the driver's disk) copied into the search folder: a lost head keeps them."""
        if not self._mirror_to or not self.kwargs.get("dir") or not self.kwargs.get("id"):
            return
        try:
            mirror_wandb(self.kwargs["dir"], str(self.kwargs["id"]), self._mirror_to)
        except Exception as e:  # storage down for a moment: the next evaluation copies again
            logger.warning("could not copy the W&B run of %s to %s: %s", self.kwargs["id"], self._mirror_to, e)

    def run(self) -> None:
        # Ray's loop (`_WandbLoggingActor.run`), with train/step as the W&B step and the history re-logged first
        os.environ["WANDB_START_METHOD"] = "thread"
        if self.kwargs.get("dir") and self.kwargs.get("id"):  # staged artifacts beside the run, mirrored with it
            os.environ["WANDB_DATA_DIR"] = os.path.join(self.kwargs["dir"], "wandb", f"artifacts-{self.kwargs['id']}")
        try:
            run = self._wandb.init(*self.args, **self.kwargs)
            define_metrics(run, self._modes)
            relog(run, self._history)
            while True:
                kind, content = self.queue.get()
                if kind == _QueueItem.END:
                    break
                if kind == _QueueItem.CHECKPOINT:
                    self._handle_checkpoint(content)
                    continue
                log, _ = self._handle_result(content)  # the config is the run's, set once: no Ray bookkeeping
                step = int(log[STEP]) if STEP in log else None
                if step is not None and self._run_dir:  # the heatmaps rank 0 wrote before this report
                    log.update(self._probe_media(step))
                try:
                    self._wandb.log(log, step=step)
                except urllib.error.HTTPError as e:  # as Ray does: a few missing points must not end the trial
                    logger.warning("failed to log a result to W&B: %s", e)
                if step is not None:  # an evaluation: the checkpoint boundary
                    self._mirror()
            self._wandb.finish()
        finally:
            wandb.teardown()  # wait until W&B has written everything: Ray kills this actor right after
            self._mirror()


def define_metrics(run: Any, modes: dict[str, str]) -> None:
    """``train/step`` as every metric's x-axis; the summary of each metric in ``modes`` its best value."""
    run.define_metric(STEP)
    run.define_metric("*", step_metric=STEP)
    for metric, mode in modes.items():
        run.define_metric(metric, step_metric=STEP, summary=mode)


def checkpoint_history(run_dir: str) -> list[dict[str, Any]]:
    """The history saved with a Train run's latest checkpoint; none when it has no checkpoint yet."""
    try:
        checkpoint = ray.train.Result.from_path(run_dir).checkpoint
    except Exception:  # no run snapshot: the trial never reported a checkpoint
        return []
    if checkpoint is None:
        return []
    from raysal.loop.checkpoint import HISTORY  # here: the logging actors (this module) need no torch

    path = f"{checkpoint.path}/{HISTORY}"
    if checkpoint.filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        return []
    with checkpoint.filesystem.open_input_stream(path) as f:
        return [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]


class SearchWandbCallback(WandbLoggerCallback):
    """One W&B run per trial, id = the trial id, resumed when the trial is (``trials_dir``: the Train runs)."""

    _logger_actor_cls = _SearchWandbLoggingActor

    def __init__(
        self, *, trials_dir: str, mirror_to: str, describe: Callable[..., tuple[dict, list[str]]] | None = None,
        summary_modes: dict[str, str] | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        # reinit: W&B deprecated Ray's boolean; resume: a restored trial continues its W&B run
        super().__init__(**{"resume": "allow", "reinit": "finish_previous", **kwargs})
        self.trials_dir = trials_dir
        self.mirror_to = mirror_to  # the search folder on storage; W&B writes on the driver's disk (``dir``)
        self.describe = describe  # (Tune config, trial_id=) → (the run's W&B config, its tags): `wandb_config`
        self.summary_modes = summary_modes or {}

    def __del__(self) -> None:
        # Ray's __del__ asks `ray.is_initialized()`: at interpreter exit the module is gone already, and a
        # traceback ended every search ("Exception ignored in ... __del__"); the actors were stopped at the
        # experiment's end (`on_experiment_end`) by then
        if not sys.is_finalizing():
            super().__del__()

    def _start_logging_actor(self, trial: Any, exclude_results: list[str], **wandb_init_kwargs: Any) -> None:
        key = os.environ.pop(WANDB_ENV_VAR, None)  # Ray copies it into a logged runtime_env when it sees it
        try:
            if key:
                wandb_init_kwargs[_KEY_ARG] = key
            wandb_init_kwargs[_HISTORY_ARG] = checkpoint_history(storage.join(self.trials_dir, trial.trial_id))
            wandb_init_kwargs[_RUN_DIR_ARG] = storage.join(self.trials_dir, trial.trial_id)
            wandb_init_kwargs[_MIRROR_ARG] = self.mirror_to
            wandb_init_kwargs[_MODES_ARG] = self.summary_modes
            wandb_init_kwargs["name"] = trial.trial_id  # the id a user reads everywhere (console, report, Optuna)
            if self.describe is not None:
                config, tags = self.describe(trial.config, trial_id=trial.trial_id)
                wandb_init_kwargs["config"] = config
                wandb_init_kwargs["tags"] = [*(wandb_init_kwargs.get("tags") or []), *tags] or None
            super()._start_logging_actor(trial, exclude_results, **wandb_init_kwargs)
        finally:
            if key is not None:
                os.environ[WANDB_ENV_VAR] = key
