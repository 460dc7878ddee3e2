"""A search space checked against a composed config (`validate_against`) before any trial starts."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf, open_dict
from search_space_files import EXAMPLE, minimal, write

from raysal.search.space import (
    SearchSpaceError,
    SearchSpec,
)
from raysal.search.space_file import load_search_space
from raysal.search.validate_space import validate_against


@pytest.fixture
def spec(tmp_path: Path) -> SearchSpec:
    return load_search_space(write(tmp_path, EXAMPLE))


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
