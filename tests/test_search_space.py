"""Search-space files: parsing, errors that name the file and key, and Hydra override text."""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import pytest
from search_space_files import EXAMPLE, minimal, write

from raysal.search.override_text import format_override
from raysal.search.space import (
    Choice,
    Fixed,
    IntRange,
    LogUniform,
    Objective,
    Scheduler,
    SearchSpaceError,
    SearchSpec,
    TrialResources,
    Uniform,
)
from raysal.search.space_file import load_search_space


@pytest.fixture
def spec(tmp_path: Path) -> SearchSpec:
    return load_search_space(write(tmp_path, EXAMPLE))


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
    (
        "shared_gpu",  # NCCL: "Duplicate GPU detected" (ray-project/ray#48012)
        minimal(resources={"num_workers": 2, "use_gpu": True, "cpus_per_worker": 4, "gpus_per_worker": 0.5}),
        "resources.gpus_per_worker",
        "two ranks of the trial on one GPU",
    ),
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


def test_regime_file_per_option_resources_and_profile_control() -> None:
    """search_spaces/regime.yaml: each regime carries its own scaling; a profile may replace the control."""
    root = Path(__file__).resolve().parents[1] / "search_spaces" / "regime.yaml"
    cluster, demo = load_search_space(root), load_search_space(root, "demo")
    (regime,) = [p.dist for p in cluster.space.params if p.key == "lora"]
    assert isinstance(regime, Choice)
    fixed = {opt.value: {q.key: q.dist.value for q in opt.space.params if isinstance(q.dist, Fixed)}
             for opt in regime.options}  # fmt: skip
    assert fixed["none"]["scaling.strategy"] == "fsdp" and fixed["none"]["scaling.num_workers"] == 4
    assert fixed["default"]["scaling.strategy"] == "ddp" and fixed["default"]["scaling.num_workers"] == 1
    assert cluster.resources.num_workers == 4  # the largest trial's: default concurrency never over-books GPUs
    assert "optim.lr=2.0e-5" in cluster.control.overrides and "optim.lr=5.0e-3" in demo.control.overrides
    assert cluster.control.lm_tolerance == demo.control.lm_tolerance == 0.02  # merged key-wise


def test_a_config_group_set_to_none_is_removed() -> None:
    from raysal.orchestration.train.compose import compose_cfg

    assert format_override("criterion@criteria.vision", None) == "~criterion@criteria.vision"
    assert format_override("+criterion@criteria.extra", None) == "~criterion@criteria.extra"
    assert format_override("optim.projector_lr", None) == "optim.projector_lr=null"  # a value, not a group
    cfg = compose_cfg(["experiment=demo", format_override("criterion@criteria.vision", None)])
    assert "vision" not in cfg.criteria
