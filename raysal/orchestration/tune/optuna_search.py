"""Ray's OptunaSearch, plus what an unattended search needs: every failed trial carries its reason into the study
(``user_attrs["fail_reason"]``), results without the objective (a diverged run's last report) are skipped instead
of failing the driver, the study is published to the search folder after every trial event (`StudyStore`), and a
restored searcher re-opens the study where this driver keeps it. A module of its own so that Tune can pickle the
searcher by reference."""

from __future__ import annotations

import logging
import pickle
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from raysal import storage
from raysal.orchestration.train.fail_reason import read_reason
from raysal.orchestration.tune import study_store
from raysal.search.control import settle_study

log = logging.getLogger(__name__)
STEP = "train/step"  # the x-axis of every intermediate value


class ReasonedOptunaSearch(OptunaSearch):
    def __init__(self, *args: Any, trials_dir: str, store: study_store.StudyStore | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trials_dir = trials_dir  # each trial's Train run folder: where its fail_reason.txt is
        self.store = store

    def _metrics(self) -> list[str]:
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    def _publish(self) -> None:
        if self.store is None:
            return
        try:
            self.store.publish()
        except Exception as e:  # storage down for a moment: the next event publishes again
            log.warning("could not publish the Optuna study to %s: %s", self.store.home, e)

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        self._publish()
        return config

    def _report(self, trial_id: str, result: dict) -> bool:
        """The objective as the trial's intermediate value at its ``train/step`` (Ray's searcher keys it by Tune's
        iteration: 1, 2, 3 — not the x-axis of W&B, the report or a pruner's ``max_t``); once per step. The step
        of a resumed trial's re-reported evaluation is already there: told once."""
        if (isinstance(self.metric, list) or trial_id in self._completed_trials or trial_id not in self._ot_trials
                or "fail_reason" in result or self.metric not in result or STEP not in result):  # fmt: skip
            return False
        ot = self._ot_trials[trial_id]
        step, value = int(result[STEP]), float(result[self.metric])
        if step in self._ot_study._storage.get_trial(ot._trial_id).intermediate_values:
            return False
        ot.report(value, step)
        return True

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self._report(trial_id, result):
            self._publish()

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # attributes must be set before the result is told: Optuna refuses them on finished trials (a trial that
        # finished just before the driver died is told again when its restored run ends: the study keeps the first)
        if trial_id in self._ot_trials and not self._finished_in_study(trial_id):
            ot = self._ot_trials[trial_id]
            ot.set_user_attr("trial_id", trial_id)  # the Tune trial id: its run folder, W&B run and replay
            if error:
                reason = read_reason(storage.join(self.trials_dir, trial_id)) or "failed (see the trial's error.txt)"
                ot.set_user_attr("fail_reason", reason)
            if result and not error:  # the last evaluation, when Tune hands it to the completion only
                self._report(trial_id, result)
            for key, value in (result or {}).items():  # every validation metric, for the report (importance
                if key.startswith(("val/", "train/step")) and isinstance(value, int | float):  # of val/lm_loss)
                    ot.set_user_attr(key, float(value))
            super().on_trial_complete(trial_id, result, error)
        else:
            self._completed_trials.add(trial_id)
        self._publish()

    def _finished_in_study(self, trial_id: str) -> bool:

        ot = self._ot_trials[trial_id]
        frozen = self._ot_study._storage.get_trial(ot._trial_id)
        return frozen.state != optuna.trial.TrialState.RUNNING

    def save(self, checkpoint_path: str) -> None:
        """Tune's searcher checkpoint, without the open study: a pickled SQLite storage names the file on the disk
        of the driver that saved it, and unpickling it on another head fails. `restore` re-opens the study."""
        state = self.__dict__.copy()
        state["_ot_study"] = None
        state["_storage"] = None  # the storage Ray's searcher was built with: the same file, pickled too
        state["_ot_trials"] = {tid: t._trial_id for tid, t in self._ot_trials.items()}  # Optuna's trial ids
        with open(checkpoint_path, "wb") as f:
            pickle.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        """Tune's restore: re-open the study where this driver keeps it (`study_store.active`: the copy fetched
        from the search folder on a new head, or the team database)."""
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self.__dict__.update(state)
        self.store = study_store.active or self.store
        if self.store is None:
            raise RuntimeError("restoring a search needs its study store (study_store.active)")
        self._storage = optuna.storages.RDBStorage(self.store.url)
        self._ot_study = optuna.load_study(study_name=self.store.name, storage=self._storage, sampler=self._sampler)
        self._ot_trials = {tid: optuna.Trial(self._ot_study, ot_id) for tid, ot_id in self._ot_trials.items()}
        # trials the dead driver created after Tune last saved its state: failed with the reason; the control
        # queued again if it was one of them
        known = {t._trial_id for t in self._ot_trials.values()}
        settled = settle_study(self._ot_study, known, want_control=True, fresh=False,
                               control_params=dict(getattr(self._space, "control", ())))  # fmt: skip
        if settled["lost"]:
            log.warning("%d trial(s) of the study were lost with the previous driver: marked FAIL", settled["lost"])
