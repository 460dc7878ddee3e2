"""Search-space files: parsing, errors that name the key, the Optuna sampler (alone and through Ray's OptunaSearch),
Hydra override text, and validation against a composed config. No Ray cluster: OptunaSearch runs in-process."""

from __future__ import annotations

import copy
import math
import pickle
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from omegaconf import OmegaConf, open_dict

from raysal.search.optuna_params import params_to_overrides
from raysal.search.override_text import format_override
from raysal.search.sampling import define_by_run, sample
from raysal.search.space import (
    Choice,
    Fixed,
    IntRange,
    LogUniform,
    Objective,
    Scheduler,
    SearchSpaceError,
    SearchSpec,
    Space,
    TrialResources,
    Uniform,
)
from raysal.search.space_file import load_search_space
from raysal.search.validate_space import validate_against

optuna.logging.set_verbosity(optuna.logging.WARNING)

EXAMPLE = """\
name: criteria                    # search name (W&B group, folder name); default: the file stem
objectives:                       # one or more; ASHA only with exactly one
  - {metric: val/amr, mode: max}
  # - {metric: val/lm_loss, mode: min}
num_samples: 48
max_concurrent_trials: null       # null: derived later from cluster resources
seed: 0                           # sampler seed
scheduler:                        # type asha | fifo
  type: asha
  time_attr: train/step
  max_t: 2000
  grace_period: 200
  reduction_factor: 3
resources:                        # per trial
  num_workers: 1
  use_gpu: true
  cpus_per_worker: 4
  gpus_per_worker: 1
base_overrides:                   # Hydra overrides applied to every trial
  - trainer.max_steps=2000
space:                            # keys are Hydra override paths
  criterion@criteria.align:       # options carry their own sub-spaces (conditional parameters)
    choice:
      kl:
        criteria.align.weight: {loguniform: [0.05, 2.0]}
        criteria.align.smoothing: {uniform: [0.0, 0.2]}
      mse:
        criteria.align.weight: {loguniform: [0.1, 10.0]}
      mass: {}
  criteria.align.layers: {choice: [early, middle, late, all, [-2, -1]]}
  criteria.align.query_offset: {choice: [0, -1]}
  lora.rank: {choice: [8, 16, 64]}
  optim.lr: {loguniform: [5.0e-5, 5.0e-4]}
  trainer.grad_accum: {int: [1, 4]}
  optim.warmup_steps: {int: {low: 0, high: 100, step: 10}}
  lora.dropout: 0.05                                       # a plain value = fixed
"""


def write(tmp_path: Path, text: str, name: str = "criteria.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def spec(tmp_path: Path) -> SearchSpec:
    return load_search_space(write(tmp_path, EXAMPLE))


def minimal(**changes: Any) -> str:
    """A small valid file as YAML text, with top-level entries replaced (None removes one)."""
    doc: dict[str, Any] = {
        "objectives": [{"metric": "val/amr", "mode": "max"}],
        "num_samples": 4,
        "scheduler": {"type": "asha", "max_t": 100, "grace_period": 10},
        "space": {"optim.lr": {"loguniform": [1e-5, 1e-3]}},
    }
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return yaml.safe_dump(doc, sort_keys=False)


def check_active(spec_or_space: SearchSpec | Space, overrides: dict[str, Any]) -> None:
    """`overrides` holds exactly the keys active under its own choices, each value inside its distribution."""
    space = spec_or_space.space if isinstance(spec_or_space, SearchSpec) else spec_or_space
    expected: list[str] = []

    def walk(s: Space) -> None:
        for p in s.params:
            expected.append(p.key)
            assert p.key in overrides, p.key
            v, d = overrides[p.key], p.dist
            if isinstance(d, Fixed):
                assert v == d.value
            elif isinstance(d, Uniform | LogUniform):
                assert isinstance(v, float) and d.low <= v <= d.high
            elif isinstance(d, IntRange):
                assert isinstance(v, int) and d.low <= v <= d.high and (v - d.low) % d.step == 0
            else:
                matches = [o for o in d.options if o.value == v and type(o.value) is type(v)]
                assert len(matches) == 1, (p.key, v)
                walk(matches[0].space)

    walk(space)
    assert list(overrides) == expected  # only active keys, in file order


# ------------------------------------------------------------------------------------------------------ parsing


def test_parse_example(spec: SearchSpec, tmp_path: Path) -> None:
    assert spec.name == "criteria"
    assert spec.path == tmp_path / "criteria.yaml"
    assert spec.objectives == (Objective("val/amr", "max"),)
    assert (spec.metric, spec.mode) == ("val/amr", "max")
    assert spec.num_samples == 48 and spec.max_concurrent_trials is None and spec.seed == 0
    assert spec.scheduler == Scheduler("asha", "train/step", 2000, 200, 3)
    assert spec.resources == TrialResources(1, True, 4, 1)
    assert spec.base_overrides == ("trainer.max_steps=2000",)

    params = {p.key: p.dist for p in spec.space.params}
    align = params["criterion@criteria.align"]
    assert isinstance(align, Choice) and align.conditional
    assert [o.value for o in align.options] == ["kl", "mse", "mass"]
    kl = {p.key: p.dist for p in align.options[0].space.params}
    assert kl == {"criteria.align.weight": LogUniform(0.05, 2.0), "criteria.align.smoothing": Uniform(0.0, 0.2)}
    assert align.options[2].space.params == ()
    assert [o.value for o in params["criteria.align.layers"].options] == ["early", "middle", "late", "all", [-2, -1]]
    assert params["optim.lr"] == LogUniform(5e-5, 5e-4)
    assert params["trainer.grad_accum"] == IntRange(1, 4)
    assert params["optim.warmup_steps"] == IntRange(0, 100, 10)
    assert params["lora.dropout"] == Fixed(0.05)

    space_keys = spec.keys()  # a tuple of SpaceKey (not a dict view)
    keys = [(k.key, k.requires, k.name) for k in space_keys]
    assert keys[:4] == [
        ("criterion@criteria.align", (), "criterion@criteria.align"),
        (
            "criteria.align.weight",
            (("criterion@criteria.align", "kl"),),
            "criterion@criteria.align=kl|criteria.align.weight",
        ),
        (
            "criteria.align.smoothing",
            (("criterion@criteria.align", "kl"),),
            "criterion@criteria.align=kl|criteria.align.smoothing",
        ),
        (
            "criteria.align.weight",
            (("criterion@criteria.align", "mse"),),
            "criterion@criteria.align=mse|criteria.align.weight",
        ),
    ]
    assert len({name for _, _, name in keys}) == len(keys)  # Optuna names are unique
    assert not any("/" in name for _, _, name in keys)  # Ray's unflatten_dict splits on '/'


def test_defaults_and_nested_choices(tmp_path: Path) -> None:
    text = minimal(
        scheduler=None,
        resources={"use_gpu": False},
        space={
            "model/backbone@model": {
                "choice": {
                    "big": {"opt.kind": {"choice": {"a": {"opt.a": {"int": [1, 3]}}, "b": None}}},
                    "small": None,
                }
            },
            "+extra.flag": True,
        },
    )
    spec = load_search_space(write(tmp_path, text, "my-search.yaml"))
    assert spec.name == "my-search"  # default: the file stem
    assert spec.scheduler.type == "fifo"
    assert spec.resources == TrialResources(1, False, 4, 0)
    space_keys = spec.keys()
    assert [(k.key, k.name) for k in space_keys] == [
        ("model/backbone@model", "model%2Fbackbone@model"),
        ("opt.kind", "model%2Fbackbone@model=big|opt.kind"),
        ("opt.a", "model%2Fbackbone@model=big|opt.kind=a|opt.a"),
        ("+extra.flag", "+extra.flag"),
    ]


# ------------------------------------------------------------------------------------------------------- errors

ERROR_CASES = [
    ("unknown_top", minimal(search_alg="tpe"), "search_alg", "unknown key"),
    ("unknown_scheduler", minimal(scheduler={"type": "asha", "max_t": 9, "patience": 2}), "scheduler.patience", ""),
    ("unknown_resources", minimal(resources={"gpus": 1}), "resources.gpus", "unknown key"),
    ("unknown_objective", minimal(objectives=[{"metric": "m", "direction": "max"}]), "objectives[0].direction", ""),
    ("bad_mode", minimal(objectives=[{"metric": "m", "mode": "maximize"}]), "objectives[0].mode", "max or min"),
    ("no_objectives", minimal(objectives=[]), "objectives", "non-empty"),
    (
        "asha_multi",
        minimal(objectives=[{"metric": "a", "mode": "max"}, {"metric": "b", "mode": "min"}]),
        "scheduler.type",
        "fifo",
    ),
    ("asha_no_max_t", minimal(scheduler={"type": "asha"}), "scheduler.max_t", "required"),
    ("bad_scheduler", minimal(scheduler={"type": "hyperband"}), "scheduler.type", "asha or fifo"),
    ("grace", minimal(scheduler={"type": "asha", "max_t": 10, "grace_period": 20}), "scheduler.grace_period", ""),
    ("num_samples", minimal(num_samples=0), "num_samples", ">= 1"),
    ("num_samples_type", minimal(num_samples="many"), "num_samples", "integer"),
    ("gpu_mismatch", minimal(resources={"use_gpu": False, "gpus_per_worker": 1}), "resources.gpus_per_worker", ""),
    ("base_not_list", minimal(base_overrides="trainer.max_steps=5"), "base_overrides", "list"),
    ("base_no_eq", minimal(base_overrides=["a=1", "trainer.max_steps"]), "base_overrides[1]", "key=value"),
    ("base_not_str", minimal(base_overrides=[{"a": 1}]), "base_overrides[0]", "key=value"),
    ("bad_key_space", minimal(space={"optim lr": 0.1}), "space[optim lr]", "override path"),
    ("bad_key_dots", minimal(space={"optim..lr": 0.1}), "space[optim..lr]", "override path"),
    ("bad_key_eq", minimal(space={"a=b": 0.1}), "space[a=b]", "override path"),
    ("unknown_dist", minimal(space={"optim.lr": {"normal": [0, 1]}}), "space[optim.lr].normal", "unknown distribution"),
    ("two_dists", minimal(space={"optim.lr": {"uniform": [0, 1], "int": [0, 1]}}), "space[optim.lr]", "one of"),
    ("empty_choice", minimal(space={"lora.rank": {"choice": []}}), "space[lora.rank].choice", "empty"),
    ("empty_choice_map", minimal(space={"lora.rank": {"choice": {}}}), "space[lora.rank].choice", "empty"),
    ("low_gt_high", minimal(space={"x.y": {"uniform": [1.0, 0.5]}}), "space[x.y].uniform", "low 1.0 > high 0.5"),
    ("int_low_gt_high", minimal(space={"x.y": {"int": [5, 1]}}), "space[x.y].int", "low 5 > high 1"),
    ("log_low_zero", minimal(space={"optim.lr": {"loguniform": [0.0, 1.0]}}), "space[optim.lr].loguniform.low", "> 0"),
    ("non_numeric", minimal(space={"x.y": {"uniform": ["a", 1]}}), "space[x.y].uniform.low", "number"),
    ("bool_bound", minimal(space={"x.y": {"uniform": [0, True]}}), "space[x.y].uniform.high", "number"),
    ("int_float_bound", minimal(space={"x.y": {"int": [1.5, 4]}}), "space[x.y].int.low", "integer"),
    ("int_unknown", minimal(space={"x.y": {"int": {"low": 1, "high": 4, "q": 2}}}), "space[x.y].int.q", "unknown"),
    ("int_step", minimal(space={"x.y": {"int": {"low": 0, "high": 7, "step": 2}}}), "space[x.y].int", "multiple"),
    (
        "int_log_step",
        minimal(space={"x.y": {"int": {"low": 1, "high": 9, "step": 2, "log": True}}}),
        "space[x.y].int",
        "",
    ),
    ("bounds_len", minimal(space={"x.y": {"uniform": [0, 1, 2]}}), "space[x.y].uniform", "[low, high]"),
    ("same_option", minimal(space={"x.y": {"choice": [1, True]}}), "space[x.y].choice[true]", "same option"),
    ("empty_space", minimal(space={}), "space", "empty"),
    (
        "nested",
        minimal(
            space={"criterion@criteria.align": {"choice": {"kl": {"criteria.align.weight": {"loguniform": [-1, 2]}}}}}
        ),
        "space[criterion@criteria.align=kl][criteria.align.weight].loguniform.low",
        "> 0",
    ),
    (
        "nested_unknown_dist",
        minimal(space={"c@x": {"choice": {"a.b": {"x.w": {"beta": [1, 2]}}}}}),
        "space[c@x=a.b][x.w].beta",
        "unknown distribution",
    ),
    (
        "set_twice",
        minimal(space={"x.w": 1.0, "c@x": {"choice": {"a": {"x.w": {"uniform": [0, 1]}}, "b": None}}}),
        "space[c@x=a][x.w]",
        "set twice",
    ),
    ("in_base", minimal(base_overrides=["optim.lr=0.1"]), "space[optim.lr]", "base_overrides[0]"),
    ("name", minimal(name="a b/c"), "name", "folder-safe"),
]


@pytest.mark.parametrize(("text", "key", "reason"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_errors_name_file_and_key(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SearchSpaceError) as info:
        load_search_space(path)
    assert str(info.value).startswith(f"{path}: {key}: "), str(info.value)
    assert reason in info.value.reason
    assert (info.value.file, info.value.key) == (str(path), key)


@pytest.mark.parametrize(
    "text",
    ["space: {a: [1, 2}\n", "objectives: []\nobjectives: []\n", "space:\n  x.y: 1\n  x.y: 2\n"],
    ids=["unbalanced", "duplicate_top", "duplicate_space_key"],
)
def test_yaml_errors(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SearchSpaceError, match=rf"^{path}: line \d+, column \d+: YAML does not parse"):
        load_search_space(path)


def test_error_pickles(tmp_path: Path) -> None:
    err = SearchSpaceError(tmp_path / "s.yaml", "space[x]", "bad")
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) == f"{tmp_path / 's.yaml'}: space[x]: bad"


def test_floats_like_omegaconf(tmp_path: Path) -> None:
    # PyYAML alone reads 5e-5 as a string; Hydra configs (OmegaConf) read it as a float, and so must we.
    spec = load_search_space(write(tmp_path, minimal(space=None) + "space:\n  optim.lr: {loguniform: [5e-5, 1e-3]}\n"))
    assert spec.space.params[0].dist == LogUniform(5e-5, 1e-3)


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


# --------------------------------------------------------------------------------------------- override strings


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ([1, 2], "[1,2]"),
        ([-2, -1], "[-2,-1]"),
        (None, "null"),
        (True, "true"),
        (False, "false"),
        (5e-05, "5e-05"),
        (0.1, "0.1"),
        (2.0, "2.0"),
        (1 / 3, repr(1 / 3)),
        (16, "16"),
        ("early", "early"),
        ("llava-1.5-7b", "llava-1.5-7b"),
        ("a b", "'a b'"),
        ("true", "'true'"),
        ("Null", "'Null'"),
        ("1", "'1'"),
        ("x,y", "'x,y'"),
        ("it's", '"it\'s"'),
        ("", "''"),
        ([None, "a b", [True]], "[null,'a b',[true]]"),
        ({"k": 1, "l": [1, 2]}, "{k:1,l:[1,2]}"),
    ],
)
def test_format_override(value: Any, text: str) -> None:
    assert format_override("a.b", value) == f"a.b={text}"


@pytest.mark.parametrize(
    "value",
    ["a\\b", "a\\", "x'y\"z", "a\\'b", "${x}", "a=b", "-x", "nan", [1, "a b", None, [True, 2.5]], 1e300, -0.0, 5e-05],
)
def test_format_override_reads_back_in_hydra(value: Any) -> None:
    parser = pytest.importorskip("hydra.core.override_parser.overrides_parser").OverridesParser.create()
    parsed = parser.parse_override(format_override("k", value))
    assert parsed.key_or_group == "k"
    assert parsed.value() == value
    if isinstance(value, float):
        assert math.copysign(1, parsed.value()) == math.copysign(1, value)


# --------------------------------------------------------------------------------------- validate_against config

GROUP = {
    "kl": {"name": "kl", "weight": 1.0, "smoothing": 0.0},
    "mse": {"name": "mse", "weight": 1.0},
    "mass": {"name": "mass"},
    "v1.5": {"name": "v15", "weight": 0.5},
}
BASE = {
    "criteria": {"align": {"name": "kl", "weight": 1.0, "smoothing": 0.0, "layers": "late", "query_offset": 0}},
    "lora": {"rank": 8, "dropout": "???"},
    "optim": {"lr": 1e-4, "warmup_steps": 0},
    "trainer": {"max_steps": 10, "grad_accum": 1},
}


def fake_compose(overrides: list[str]) -> Any:
    """Hydra in miniature: `criterion@criteria.align=<option>` swaps the group node (keeping layers/query_offset,
    which the real config sets outside the group); any other override must name an existing key (struct mode)."""
    cfg = OmegaConf.create(copy.deepcopy(BASE))
    OmegaConf.set_struct(cfg, True)
    for override in overrides:
        key, _, text = override.partition("=")
        value = yaml.safe_load(text)
        if key == "criterion@criteria.align":
            if value not in GROUP:
                raise ValueError(f"Could not find 'criterion/{value}'")
            keep = {k: cfg.criteria.align[k] for k in ("layers", "query_offset")}
            with open_dict(cfg):
                cfg.criteria.align = {**GROUP[value], **keep}
        else:
            OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def test_validate_against_accepts_the_example(spec: SearchSpec) -> None:
    calls: list[list[str]] = []

    def compose(overrides: list[str]) -> Any:
        calls.append(overrides)
        return fake_compose(overrides)

    validate_against(spec, compose)
    assert calls[0] == ["trainer.max_steps=2000"]
    assert ["trainer.max_steps=2000", "criterion@criteria.align=mse"] in calls
    assert ["trainer.max_steps=2000", "criteria.align.layers=[-2,-1]"] in calls  # list options compose too


def space_file(tmp_path: Path, space: dict[str, Any]) -> SearchSpec:
    return load_search_space(write(tmp_path, minimal(space=space, base_overrides=["trainer.max_steps=5"])))


def test_validate_against_unknown_key(tmp_path: Path) -> None:
    spec = space_file(tmp_path, {"optim.lr": {"uniform": [0.1, 0.2]}, "optim.bogus": {"int": [1, 2]}})
    with pytest.raises(SearchSpaceError, match=r": space\[optim\.bogus\]: 'optim\.bogus' is not in the config"):
        validate_against(spec, fake_compose)


def test_validate_against_unknown_option(tmp_path: Path) -> None:
    spec = space_file(tmp_path, {"criterion@criteria.align": {"choice": ["kl", "focal"]}})
    with pytest.raises(SearchSpaceError, match=r": space\[criterion@criteria\.align\]: option focal does not compose"):
        validate_against(spec, fake_compose)


def test_validate_against_fixed_group_value(tmp_path: Path) -> None:
    validate_against(space_file(tmp_path, {"criterion@criteria.align": "mse"}), fake_compose)
    spec = space_file(tmp_path, {"criterion@criteria.align": "focal"})
    with pytest.raises(SearchSpaceError, match=r": space\[criterion@criteria\.align\]: value 'focal' does not compose"):
        validate_against(spec, fake_compose)


def test_validate_against_key_missing_under_one_option(tmp_path: Path) -> None:
    space = {
        "criterion@criteria.align": {
            "choice": {
                "kl": {"criteria.align.smoothing": {"uniform": [0, 0.1]}},
                "v1.5": {"criteria.align.weight": 0.3},
            }
        }
    }
    validate_against(space_file(tmp_path, space), fake_compose)  # dots in option names compose fine
    space["criterion@criteria.align"]["choice"]["mse"] = {"criteria.align.smoothing": 0.1}
    with pytest.raises(SearchSpaceError) as info:
        validate_against(space_file(tmp_path, space), fake_compose)
    assert info.value.key == "space[criterion@criteria.align=mse][criteria.align.smoothing]"
    assert "composed with criterion@criteria.align=mse" in info.value.reason


def test_validate_against_outer_key_lost_by_an_option(tmp_path: Path) -> None:
    # `weight` exists in the default (kl) config, but the `mass` option drops it: a key set next to the choice must
    # survive every option.
    spec = space_file(tmp_path, {"criterion@criteria.align": {"choice": ["kl", "mass"]}, "criteria.align.weight": 2.0})
    with pytest.raises(SearchSpaceError) as info:
        validate_against(spec, fake_compose)
    assert info.value.key == "space[criteria.align.weight]"
    assert "composed with criterion@criteria.align=mass" in info.value.reason


def test_validate_against_base_and_missing_values(tmp_path: Path) -> None:
    # A ??? value is a key that exists (OmegaConf.select alone would call it absent).
    validate_against(space_file(tmp_path, {"lora.dropout": {"uniform": [0, 0.1]}}), fake_compose)
    bad = load_search_space(write(tmp_path, minimal(base_overrides=["trainer.nope=1"])))
    with pytest.raises(SearchSpaceError, match=r": base_overrides: the base overrides does not compose"):
        validate_against(bad, fake_compose)
