"""A console a person can follow: one plain line per trial event, on the search driver's stdout.

    raysal: trial 627cb3c3 started: criterion@criteria.align=kl criteria.align.weight=0.44 optim.lr=0.0027
    raysal: trial 627cb3c3 step 8: val/amr 1.010  val/lm_loss 5.695  train/loss 6.470  (11.9 s/step)
    raysal: trial 627cb3c3 stopped early by ASHA at step 8 (max_t 24)
    raysal: trial 5bd01e2a failed: diverged: val/lm_loss 10.4 >= 0.98 x ln(V) at step 16

Ray's own output (worker logs, status tables) is off by default; ``-v`` brings it back (`raysal.tune`).
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback

from raysal import storage
from raysal.orchestration.train.errors import first_line
from raysal.orchestration.train.fail_reason import read_reason
from raysal.search.finalists import ARM_KEY, FINALIST, Arm
from raysal.search.optuna_params import CONTROL_KEY, params_to_overrides
from raysal.search.override_text import format_override

SHOWN = ("val/lm_loss", "train/loss")  # printed after the objective at every evaluation


class ProgressLines(Callback):
    def __init__(self, metric: str, time_attr: str, max_t: int | None, trials_dir: str) -> None:
        self.metric, self.time_attr, self.max_t, self.trials_dir = metric, time_attr, max_t, trials_dir

    @staticmethod
    def _say(text: str) -> None:
        print(f"raysal: {text}", flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        cfg = trial.config
        if ARM_KEY in cfg:
            arm = Arm.from_config(cfg[ARM_KEY])
            who = f"finalist {arm.finalist}" if arm.role == FINALIST else f"the matched control of {arm.finalist}"
            what = f"{who} at seed {arm.seed}"
        elif cfg.get(CONTROL_KEY):
            what = "the LM-only control"
        else:
            what = " ".join(format_override(k, v) for k, v in params_to_overrides(cfg).items())
        self._say(f"trial {trial.trial_id} started: {what}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self.metric not in result:
            return
        shown = [self.metric, *(k for k in SHOWN if k != self.metric)]
        values = "  ".join(f"{k} {result[k]:.4g}" for k in shown if isinstance(result.get(k), int | float))
        speed = f"  ({result['train/sec_per_step']:.1f} s/step)" if "train/sec_per_step" in result else ""
        step = result.get("train/step")
        at = f"{step:.0f}" if isinstance(step, int | float) else "?"
        self._say(f"trial {trial.trial_id} step {at}: {values}{speed}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        step = last.get(self.time_attr)
        if self.max_t is not None and isinstance(step, int | float) and step < self.max_t:
            where = f"{self.time_attr} {step:.0f} (max_t {self.max_t})"
            self._say(f"trial {trial.trial_id} stopped early by ASHA at {where}")
        else:
            value = last.get(self.metric)
            shown = f": {self.metric} {value:.4g}" if isinstance(value, int | float) else ""
            done = last.get("train/step")
            at = f"{done:.0f}" if isinstance(done, int | float) else "?"
            self._say(f"trial {trial.trial_id} finished at step {at}{shown}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        reason = read_reason(storage.join(self.trials_dir, trial.trial_id))
        reason = reason or first_line(str(trial.get_error() or "error"))
        self._say(f"trial {trial.trial_id} failed: {reason}")
