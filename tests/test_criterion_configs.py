"""Every criterion has one YAML in configs/criterion/ that instantiates it; every YAML key is a real field."""

import dataclasses
import importlib
import pkgutil
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

import raysal.criteria
from raysal.criteria.protocol import (
    AttachesModules,
    AttentionSelection,
    Criterion,
    HooksForward,
    LayerSelection,
    missing_selection,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "criterion"


def criterion_classes():
    found = {}
    for mod in pkgutil.iter_modules(raysal.criteria.__path__):
        module = importlib.import_module(f"raysal.criteria.{mod.name}")
        for obj in vars(module).values():
            if dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__ and hasattr(obj, "needs"):
                found[obj.__name__] = obj
    return found


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_yaml_instantiates_its_criterion(path):
    cfg = OmegaConf.load(path)
    crit = instantiate(cfg)
    assert crit.name == path.stem, "the file name is the criterion name (train/loss/<name>)"
    fields = {f.name for f in dataclasses.fields(crit)}
    assert set(cfg) - {"_target_"} <= fields
    assert cfg.weight == crit.weight


def test_every_criterion_class_has_a_yaml():
    targets = {OmegaConf.load(p)["_target_"].rsplit(".", 1)[1] for p in CONFIGS.glob("*.yaml")}
    assert set(criterion_classes()) == targets


def test_every_criterion_is_a_criterion_and_offers_what_its_needs_ask_for():
    """raysal/criteria/protocol.py is the contract: every shipped criterion is a `Criterion`; the attention ones
    carry their selection; maskembed's decoder is attached and works inside the forward."""
    offers = {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        crit = instantiate(OmegaConf.load(path))
        assert isinstance(crit, Criterion), path.stem
        assert missing_selection(crit) is None, path.stem
        kinds = (LayerSelection, AttentionSelection, AttachesModules, HooksForward)
        offers[crit.name] = {k.__name__ for k in kinds if isinstance(crit, k)}
    selection = {"LayerSelection", "AttentionSelection"}
    assert all(offers[n] == selection for n in ("kl", "mse", "mass", "bce_dice"))
    assert offers["seed_kl"] == {"LayerSelection"}
    assert offers["maskembed"] == {"AttachesModules", "HooksForward"}
    assert offers["lm"] == offers["cal"] == set()
