"""Ray's OptunaSearch, plus what an unattended search needs: every failed trial carries its reason into the study
(``user_attrs["fail_reason"]``), and results without the objective (a diverged run's last report) are skipped
instead of failing the driver. A module of its own so that Tune can pickle the searcher by reference."""

from __future__ import annotations

from typing import Any

from ray.tune.search.optuna import OptunaSearch

from raysal.orchestration.fail_reason import read_reason


class ReasonedOptunaSearch(OptunaSearch):
    def __init__(self, *args: Any, trials_dir: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trials_dir = trials_dir  # each trial's Train run folder: where its fail_reason.txt is

    def _metrics(self) -> list[str]:
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if "fail_reason" not in result and all(m in result for m in self._metrics()):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # attributes must be set before the result is told: Optuna refuses them on finished trials
        if trial_id in self._ot_trials:
            ot = self._ot_trials[trial_id]
            ot.set_user_attr("trial_id", trial_id)  # the Tune trial id: its run folder, W&B run and replay
            if error:
                reason = read_reason(f"{self.trials_dir}/{trial_id}") or "failed (see the trial's error.txt)"
                ot.set_user_attr("fail_reason", reason)
            for key, value in (result or {}).items():  # every validation metric, for the report (importance
                if key.startswith(("val/", "train/step")) and isinstance(value, int | float):  # of val/lm_loss)
                    ot.set_user_attr(key, float(value))
        super().on_trial_complete(trial_id, result, error)
