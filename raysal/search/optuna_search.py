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
        # the reason must be set before the FAIL is told: Optuna refuses attributes on finished trials
        if error and trial_id in self._ot_trials:
            reason = read_reason(f"{self.trials_dir}/{trial_id}") or "failed (see the trial's error.txt)"
            self._ot_trials[trial_id].set_user_attr("fail_reason", reason)
        super().on_trial_complete(trial_id, result, error)
