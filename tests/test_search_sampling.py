"""The Optuna sampler of a search space: alone, through Ray's OptunaSearch (in-process, no cluster), several
objectives, and a study that resumes from SQLite."""

from __future__ import annotations

import pickle
from pathlib import Path

import optuna
import pytest
from search_space_files import EXAMPLE, check_active, minimal, write

from raysal.search.optuna_params import decode_option, params_to_overrides
from raysal.search.sampling import define_by_run, sample
from raysal.search.space import (
    SearchSpec,
)
from raysal.search.space_file import load_search_space

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def spec(tmp_path: Path) -> SearchSpec:
    return load_search_space(write(tmp_path, EXAMPLE))


# ----------------------------------------------------------------------------------------------------- sampling


def test_sample_with_optuna(spec: SearchSpec) -> None:
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    seen_options, seen_layers = set(), []
    for i in range(30):
        trial = study.ask()
        overrides = sample(trial, spec)
        check_active(spec, overrides)
        # Conditional keys appear only with their option.
        option = overrides["criterion@criteria.align"]
        seen_options.add(option)
        assert ("criteria.align.weight" in overrides) == (option in ("kl", "mse"))
        assert ("criteria.align.smoothing" in overrides) == (option == "kl")
        if option == "mse":
            assert 0.1 <= overrides["criteria.align.weight"] <= 10.0
        seen_layers.append(overrides["criteria.align.layers"])
        # The params Optuna recorded (what Tune hands the trainable) give back the same overrides.
        assert params_to_overrides(trial.params) == overrides
        assert spec.trial_overrides(trial.params)[0] == "trainer.max_steps=2000"
        study.tell(trial, float(i % 7))
    assert seen_options == {"kl", "mse", "mass"}
    assert [-2, -1] in seen_layers  # a list option survives Optuna as a list


def test_null_and_odd_options_round_trip(tmp_path: Path) -> None:
    space = {
        "a.b": {"choice": [None, [1, "x y"], "json:not-json", 1.5, False, {"k": [1, 2]}]},
        "g/sub@pkg": {
            "choice": {"v1.5": {"p.q": {"uniform": [0, 1]}}, "a/b|c%d": {"p.q": {"int": [1, 2]}}, None: None}
        },
    }
    spec = load_search_space(write(tmp_path, minimal(space=space)))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    values, options = [], set()
    for _ in range(40):
        trial = study.ask()
        overrides = sample(trial, spec)
        check_active(spec, overrides)
        assert params_to_overrides(trial.params) == overrides
        values.append(overrides["a.b"])
        options.add(overrides["g/sub@pkg"])
        study.tell(trial, 0.0)
    assert None in values and [1, "x y"] in values and "json:not-json" in values and {"k": [1, 2]} in values
    assert options == {"v1.5", "a/b|c%d", None}


def test_define_by_run_pickles_and_returns_none(spec: SearchSpec) -> None:
    fn = pickle.loads(pickle.dumps(define_by_run(spec)))
    trial = optuna.create_study().ask()
    assert fn(trial) is None
    check_active(spec, params_to_overrides(trial.params))


def test_define_by_run_through_ray_optuna_search(spec: SearchSpec) -> None:
    pytest.importorskip("ray.tune")
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(
        space=define_by_run(spec),
        metric=spec.metric,
        mode=spec.mode,
        sampler=optuna.samplers.TPESampler(seed=0),
    )
    for i in range(6):
        config = searcher.suggest(f"t{i}")
        assert not any(isinstance(v, dict) for v in config.values())  # Ray's unflatten_dict left the names flat
        overrides = params_to_overrides(config)
        check_active(spec, overrides)
        lines = spec.trial_overrides(config)
        assert lines[0] == "trainer.max_steps=2000"
        assert f"criterion@criteria.align={overrides['criterion@criteria.align']}" in lines
        searcher.on_trial_complete(f"t{i}", {"val/amr": 0.1 * i, "train/step": 100, "training_iteration": 1})
    done = [t for t in searcher._ot_study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 6


def test_multi_objective(tmp_path: Path) -> None:
    text = minimal(
        objectives=[{"metric": "val/amr", "mode": "max"}, {"metric": "val/lm_loss", "mode": "min"}],
        scheduler={"type": "fifo"},
    )
    spec = load_search_space(write(tmp_path, text))
    assert spec.metric == ["val/amr", "val/lm_loss"] and spec.mode == ["max", "min"]
    pytest.importorskip("ray.tune")
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(space=define_by_run(spec), metric=spec.metric, mode=spec.mode)
    config = searcher.suggest("t0")
    assert set(params_to_overrides(config)) == {"optim.lr"}
    searcher.on_trial_complete("t0", {"val/amr": 0.5, "val/lm_loss": 2.0})
    (trial,) = searcher._ot_study.trials
    assert trial.values == [0.5, 2.0]


def test_sqlite_study_resumes(spec: SearchSpec, tmp_path: Path) -> None:
    url = "sqlite:///" + str(tmp_path / "optuna.db")
    study = optuna.create_study(
        storage=optuna.storages.RDBStorage(url),
        study_name=spec.name,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=0),
    )
    asked = []
    for i in range(3):
        trial = study.ask()
        overrides = sample(trial, spec)
        asked.append((trial.params, overrides))
        study.tell(trial, 0.1 * i)
    again = optuna.load_study(study_name=spec.name, storage=optuna.storages.RDBStorage(url))
    assert len(again.trials) == 3
    for stored, (params, overrides) in zip(again.trials, asked, strict=True):
        assert stored.state == optuna.trial.TrialState.COMPLETE
        assert stored.params == params  # lists stay JSON text, fixed values and None survive the storage
        assert params_to_overrides(stored.params) == overrides
    check_active(spec, sample(again.ask(), spec))  # same distributions: the resumed study keeps sampling


def test_the_control_records_its_values_as_fixed_parameters(spec: SearchSpec) -> None:
    """The LM-only control is enqueued with the values its config has for the space's top-level parameters (those
    the distributions contain): Optuna records them as its params, so the intersection search space (dashboards,
    importance) includes the control; its Tune config says it is the control."""
    from raysal.search.optuna_params import CONTROL_KEY
    from raysal.search.sampling import fixed_values

    values = {"optim.lr": 2e-4, "lora.rank": 16, "criteria.align.layers": [-2, -1], "criterion@criteria.align": None,
              "optim.weight_decay": 0.0}  # fmt: skip
    fixed = fixed_values(spec.space, values)
    assert fixed["optim.lr"] == 2e-4 and fixed["lora.rank"] == 16
    assert decode_option(fixed["criteria.align.layers"]) == [-2, -1]
    assert "criterion@criteria.align" not in fixed and "optim.weight_decay" not in fixed  # absent, or not a param
    assert "lora.rank" not in fixed_values(spec.space, {"lora.rank": 32})  # outside the choices: not recorded
    assert "optim.lr" not in fixed_values(spec.space, {"optim.lr": 1.0})  # outside the range

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.enqueue_trial(fixed, user_attrs={CONTROL_KEY: True})
    trial = study.ask()
    assert define_by_run(spec, fixed)(trial) == {CONTROL_KEY: True}
    assert trial.params == fixed  # categorical values as Optuna stores them (a list option as JSON text)
    assert params_to_overrides({**trial.params, CONTROL_KEY: True}) == {}  # the control trains base + control
    study.tell(trial, 1.0)
    other = study.ask()
    define_by_run(spec, fixed)(other)
    study.tell(other, 2.0)
    from optuna.search_space import intersection_search_space

    assert {"optim.lr", "lora.rank"} <= set(intersection_search_space(study.get_trials()))


def test_the_search_sampler_models_the_conditional_space_jointly_with_a_liar(spec: SearchSpec) -> None:
    """The tuner's TPE: multivariate, grouped by sub-space, a constant liar (set explicitly: Optuna's defaults
    moved between releases); it samples the conditional space with trials asked concurrently, the control among
    them, every trial's overrides consistent with its options, and no warning."""
    import warnings

    from raysal.orchestration.tune.tuner import make_sampler
    from raysal.search.optuna_params import CONTROL_KEY
    from raysal.search.sampling import fixed_values

    sampler = make_sampler(0)
    assert (sampler._multivariate, sampler._group, sampler._constant_liar) == (True, True, True)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    fixed = fixed_values(spec.space, {"optim.lr": 2e-4, "lora.rank": 16})
    study.enqueue_trial(fixed, user_attrs={CONTROL_KEY: True})
    space = define_by_run(spec, fixed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for wave in range(6):  # 4 trials running at once, told when the wave ends (the liar fills the pending ones)
            trials = [study.ask() for _ in range(4)]
            for t in trials:
                space(t)
                if not t.user_attrs.get(CONTROL_KEY):
                    check_active(spec, params_to_overrides(t.params))
            for i, t in enumerate(trials):
                study.tell(t, float((wave * 4 + i) % 5))
    assert len(study.trials) == 24 and sum(1 for t in study.trials if t.user_attrs.get(CONTROL_KEY)) == 1
