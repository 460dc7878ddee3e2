"""Every shipped config combination composes and passes the entry points' validation (no Ray, no model)."""

import pytest

from raysal.orchestration.compose import CONFIG_DIR, compose_cfg
from raysal.orchestration.spec import spec_from_cfg

GROUP_OPTIONS = {
    "model": ["llava-1.5-7b", "llava-v1.6-mistral-7b", "tiny", "tiny-next"],
    "data": ["coconut", "synthetic"],
    "criterion@criteria.base": ["lm", "cal"],
    "criterion@criteria.align": ["kl", "mse", "mass", "bce_dice", "seed_kl"],
    "lora": ["default", "llava"],
    "optim": ["adamw"],
    "trainer": ["default"],
    "scaling": ["gpu", "cpu"],
    "wandb": ["default"],
}


def test_every_option_file_is_listed():
    from pathlib import Path

    for group, options in GROUP_OPTIONS.items():
        folder = "criterion" if group.startswith("criterion") else group
        assert sorted(p.stem for p in Path(CONFIG_DIR, folder).glob("*.yaml")) == sorted(
            set(options)
            | ({"lm", "cal", "kl", "mse", "mass", "bce_dice", "seed_kl"} if folder == "criterion" else set())
        )


@pytest.mark.parametrize("experiment", [None, "demo"])
@pytest.mark.parametrize(("group", "option"), [(g, o) for g, opts in GROUP_OPTIONS.items() for o in opts])
def test_each_option_composes(group, option, experiment):
    overrides = [f"{group}={option}"] + ([f"experiment={experiment}"] if experiment else [])
    spec = spec_from_cfg(compose_cfg(overrides))
    names = {c.name for c in spec.criteria}
    if group.startswith("criterion"):
        assert option in names
    assert spec.fit.max_steps >= 1 and spec.batch_size >= 1


def test_defaults_are_the_real_setup():
    spec = spec_from_cfg(compose_cfg([]))
    assert spec.model["name_or_path"] == "llava-hf/llava-1.5-7b-hf"
    assert spec.data["synthetic"] is None and spec.scaling["use_gpu"] is True
    assert [c.name for c in spec.criteria] == ["lm", "kl"]
    assert spec.objective == {"metric": "val/amr", "mode": "max"}


def test_lora_only_control_and_bad_values():
    spec = spec_from_cfg(compose_cfg(["~criterion@criteria.align"]))
    assert [c.name for c in spec.criteria] == ["lm"]
    with pytest.raises(ValueError, match="replace the LM loss"):
        spec_from_cfg(compose_cfg(["criterion@criteria.align=cal"]))
    with pytest.raises(ValueError, match=r"trainer.objective.mode"):
        spec_from_cfg(compose_cfg(["trainer.objective.mode=up"]))
    with pytest.raises(ValueError, match="max_steps"):
        spec_from_cfg(compose_cfg(["trainer.max_steps=0"]))
