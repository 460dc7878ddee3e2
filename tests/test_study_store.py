"""The Optuna study of a search outlives the head: published to the search folder after every trial event, taken
back by a driver whose disk has none, or kept in a team's PostgreSQL; the control is one trial across restarts."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import optuna
import pytest

from raysal import storage
from raysal.orchestration.tune.study_store import redact, study_store
from raysal.search.control import choose_best, open_study, settle_study
from raysal.search.optuna_params import CONTROL_KEY
from raysal.search.space_file import load_search_space

SPACE = """
name: st
objectives: [{metric: val/amr, mode: max}]
num_samples: 2
space:
  optim.lr: {loguniform: [1.0e-3, 1.0e-2]}
"""


@pytest.fixture
def spec(tmp_path):
    (tmp_path / "st.yaml").write_text(SPACE)
    return load_search_space(tmp_path / "st.yaml")


def _states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.get_trials(deepcopy=False)]


def test_a_uri_search_publishes_its_study_and_a_new_head_takes_it_back(spec, tmp_path, s3_server):
    search = storage.join(s3_server.new_prefix(), "st")
    head = study_store(search, "st", None, str(tmp_path / "head1"))
    assert head.published_separately and Path(head.working).parent.is_dir()
    study = open_study("st", head.url, spec)
    t = study.ask()
    study.tell(t, 1.5)
    head.publish()
    assert storage.is_file(head.home)
    with storage.local_copy(head.home) as db:  # a consistent SQLite file, not a copy of a file being written
        assert sqlite3.connect(db).execute("pragma integrity_check").fetchone()[0] == "ok"

    new_head = study_store(search, "st", None, str(tmp_path / "head2"))  # another disk: no working copy
    assert not Path(new_head.working).exists()
    assert new_head.fetch() and not new_head.fetch()  # taken once, then the working copy is the one used
    again = optuna.load_study(study_name="st", storage=new_head.url)
    assert [t.value for t in again.trials] == [1.5]


def test_a_local_search_folder_holds_the_study_itself(spec, tmp_path):
    store = study_store(str(tmp_path / "st"), "st", None, str(tmp_path / "cache"))
    assert store.working == str(tmp_path / "st" / "optuna.db") and not store.published_separately
    open_study("st", store.url, spec)
    store.publish()  # nothing to copy
    assert store.home == str(tmp_path / "st" / "optuna.db")


def test_the_control_is_one_trial_across_restarts(spec, tmp_path):
    study = open_study("st", f"sqlite:///{tmp_path / 'o.db'}", spec)
    assert settle_study(study, set(), want_control=True, fresh=True) == {"lost": 0, "control_enqueued": 1}
    assert settle_study(study, set(), want_control=True, fresh=True)["control_enqueued"] == 0  # queued once
    control = study.ask()  # the searcher takes the control first
    assert control.user_attrs[CONTROL_KEY]
    sampled = study.ask()
    # restore: Tune knows the control; the sampled trial was created after Tune last saved its state
    settled = settle_study(study, {control._trial_id}, want_control=True, fresh=False)
    assert settled == {"lost": 1, "control_enqueued": 0}
    frozen = study._storage.get_trial(sampled._trial_id)
    assert frozen.state.name == "FAIL" and "lost with the search driver" in frozen.user_attrs["fail_reason"]
    # restore where the lost trial was the control: it is queued again (never a search without one)
    study.tell(control, state=optuna.trial.TrialState.FAIL)
    other = optuna.create_study(study_name="o2", storage=f"sqlite:///{tmp_path / 'o2.db'}", direction="maximize")
    settle_study(other, set(), want_control=True, fresh=True)
    lost_control = other.ask()
    assert settle_study(other, set(), want_control=True, fresh=False) == {"lost": 1, "control_enqueued": 1}
    assert other.ask().user_attrs[CONTROL_KEY] and lost_control.number == 0
    # a finished control stays the control: nothing is queued on a restore
    done = optuna.create_study(study_name="o3", storage=f"sqlite:///{tmp_path / 'o3.db'}", direction="maximize")
    settle_study(done, set(), want_control=True, fresh=True)
    c = done.ask()
    done.tell(c, 1.0)
    assert settle_study(done, set(), want_control=True, fresh=False) == {"lost": 0, "control_enqueued": 0}
    assert settle_study(done, set(), want_control=False, fresh=True)["control_enqueued"] == 0  # control: null


def test_no_winner_without_the_control():
    rows = [{"trial_id": "a", "metrics": {"val/amr": 3.0, "val/lm_loss": 9.0}, "config": {}}]
    best, decision = choose_best(rows, "val/amr", "max", lm_tolerance=0.02)
    assert best is None and "control did not finish" in decision["warning"]
    best, _ = choose_best(rows, "val/amr", "max", lm_tolerance=None)  # control: null
    assert best["trial_id"] == "a"


def test_a_restored_searcher_reopens_the_study_where_this_driver_keeps_it(spec, tmp_path):
    """Tune pickles the searcher; the pickle must not tie it to the saving head's disk."""
    pytest.importorskip("ray")
    from raysal.orchestration.tune import study_store as module
    from raysal.orchestration.tune.optuna_search import ReasonedOptunaSearch
    from raysal.search.sampling import define_by_run

    first = study_store(str(tmp_path / "first"), "st", None, str(tmp_path))
    settle_study(open_study("st", first.url, spec), set(), want_control=True, fresh=True)
    searcher = ReasonedOptunaSearch(space=define_by_run(spec), metric="val/amr", mode="max",
                                    storage=optuna.storages.RDBStorage(first.url), study_name="st",
                                    trials_dir=str(tmp_path / "first" / "trials"), store=first)  # fmt: skip
    assert searcher.suggest("t_control")[CONTROL_KEY]
    searcher.suggest("t_lost")  # created after the last save below: Tune will not know it
    searcher._ot_trials.pop("t_lost")
    searcher.save(str(tmp_path / "searcher.pkl"))

    moved = tmp_path / "second"
    moved.mkdir()
    Path(first.working).rename(moved / "optuna.db")  # the study now lives elsewhere; the old path is gone
    (tmp_path / "first").rmdir()
    module.active = study_store(str(moved), "st", None, str(tmp_path))
    try:
        restored = ReasonedOptunaSearch(space=define_by_run(spec), metric="val/amr", mode="max",
                                        trials_dir="unused")  # fmt: skip
        restored.restore(str(tmp_path / "searcher.pkl"))
    finally:
        module.active = None
    restored.on_trial_complete("t_control", {"val/amr": 1.2, "val/lm_loss": 5.0, "train/step": 4})
    study = optuna.load_study(study_name="st", storage=f"sqlite:///{moved / 'optuna.db'}")
    assert _states(study) == ["COMPLETE", "FAIL"]
    assert study.trials[0].user_attrs["trial_id"] == "t_control" and study.trials[0].value == 1.2
    restored.on_trial_complete("t_control", {"val/amr": 9.9})  # told again (a restored finished trial): kept
    assert optuna.load_study(study_name="st", storage=f"sqlite:///{moved / 'optuna.db'}").trials[0].value == 1.2


def test_intermediate_values_are_keyed_by_train_step_and_the_last_evaluation_is_told(spec, tmp_path):
    """Optuna's view (pruners, optuna-dashboard's intermediate-value plot) has the same x-axis as W&B and the report:
    ``train/step``, not Tune's iteration; an evaluation that reaches only the completion is told too; a resumed
    trial's re-reported step once."""
    pytest.importorskip("ray")
    from raysal.orchestration.tune.optuna_search import ReasonedOptunaSearch
    from raysal.search.sampling import define_by_run

    store = study_store(str(tmp_path / "s"), "iv", None, str(tmp_path))
    settle_study(open_study("iv", store.url, spec), set(), want_control=False, fresh=True)
    searcher = ReasonedOptunaSearch(space=define_by_run(spec), metric="val/amr", mode="max",
                                    storage=optuna.storages.RDBStorage(store.url), study_name="iv",
                                    trials_dir=str(tmp_path / "trials"), store=store)  # fmt: skip
    searcher.suggest("t1")
    for it, (step, amr) in enumerate([(200, 1.0), (400, 1.5), (400, 1.5)], 1):  # the last: re-reported on resume
        searcher.on_trial_result("t1", {"val/amr": amr, "train/step": step, "training_iteration": it})
    searcher.on_trial_result("t1", {"train/loss": 3.0, "train/step": 500, "training_iteration": 4})  # no evaluation
    searcher.on_trial_complete("t1", {"val/amr": 2.0, "train/step": 600, "training_iteration": 5})
    trial = optuna.load_study(study_name="iv", storage=store.url).trials[0]
    assert trial.intermediate_values == {200: 1.0, 400: 1.5, 600: 2.0} and trial.value == 2.0


def test_redact_hides_the_password():
    assert redact("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact("sqlite:////x/optuna.db") == "sqlite:////x/optuna.db"


def test_a_database_study_is_snapshotted_into_the_search_folder(spec, tmp_path, postgres, s3_server):
    search = storage.join(s3_server.new_prefix(), "st")
    store = study_store(search, "st", postgres.url, str(tmp_path))
    assert store.in_database and "secret" not in store.describe()
    study = open_study("st", store.url, spec)
    settle_study(study, set(), want_control=True, fresh=True)
    t = study.ask()
    study.tell(t, 2.0)
    store.publish()  # per event: the database is the study, nothing to copy
    assert not storage.exists(store.home)
    store.publish(final=True)
    with storage.local_copy(store.home) as db:
        snap = optuna.load_study(study_name="st", storage=f"sqlite:///{db}")
        assert [x.value for x in snap.trials] == [2.0] and snap.trials[0].user_attrs[CONTROL_KEY]


def test_a_search_folder_without_its_study_is_not_resumed_blindly(tmp_path, s3_server):
    """Tune's state in the bucket but no optuna.db (and none on this disk): one clear error, not Optuna's KeyError."""
    pytest.importorskip("ray")
    from raysal.orchestration.tune.places import SearchPlaces, SearchStateError
    from raysal.orchestration.tune.tuner import restore_tuner

    search = storage.join(s3_server.new_prefix(), "st")
    storage.write_json(storage.join(search, "experiment_state-2026-12-01_00-00-00.json"), {})
    store = study_store(search, "st", None, str(tmp_path))
    places = SearchPlaces(search, storage.join(search, "trials"), tmp_path, store)
    with pytest.raises(SearchStateError, match="not the Optuna study"):
        restore_tuner(places, trainable=None)
