"""The search's scheduler when the space file asks for ASHA: it stops weak trials on the worker-reported step, but
never the LM-only control (`raysal.search.control`)."""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from raysal.search.optuna_params import CONTROL_KEY


class ControlAwareASHA(ASHAScheduler):
    """ASHA that never stops the control trial, and keeps its results out of the rungs (an LM-only trial's low
    grounding would lower every cut-off)."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if trial.config.get(CONTROL_KEY):
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        if not trial.config.get(CONTROL_KEY):
            super().on_trial_complete(tune_controller, trial, result)
