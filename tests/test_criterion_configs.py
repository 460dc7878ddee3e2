"""Every criterion has one YAML in configs/criterion/ that instantiates it; every YAML key is a real field."""

import dataclasses
import importlib
import pkgutil
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

import raysal.criteria

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
