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
"""

from __future__ import annotations

import os
from typing import Any

from ray.air.integrations.wandb import WANDB_ENV_VAR, WandbLoggerCallback, _WandbLoggingActor

_KEY_ARG = "raysal_wandb_api_key"


class _SearchWandbLoggingActor(_WandbLoggingActor):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        key = kwargs.pop(_KEY_ARG, None)
        if key:
            os.environ[WANDB_ENV_VAR] = key  # this actor process only; never a file
        super().__init__(*args, **kwargs)

    def run(self) -> Any:
        try:
            return super().run()
        finally:
            import wandb

            wandb.teardown()  # wait until W&B has written everything: Ray kills this actor right after


class SearchWandbCallback(WandbLoggerCallback):
    _logger_actor_cls = _SearchWandbLoggingActor

    def _start_logging_actor(self, trial: Any, exclude_results: list[str], **wandb_init_kwargs: Any) -> None:
        key = os.environ.pop(WANDB_ENV_VAR, None)  # Ray copies it into a logged runtime_env when it sees it
        try:
            if key:
                wandb_init_kwargs[_KEY_ARG] = key
            super()._start_logging_actor(trial, exclude_results, **wandb_init_kwargs)
        finally:
            if key is not None:
                os.environ[WANDB_ENV_VAR] = key
