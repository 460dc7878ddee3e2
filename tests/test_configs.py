"""Every shipped config combination composes and passes the entry points' validation (no Ray, no model)."""

import pytest

from raysal.orchestration.train.compose import CONFIG_DIR, compose_cfg
from raysal.orchestration.train.spec import spec_from_cfg

GROUP_OPTIONS = {
    "model": [
        "llava-1.5-7b",
        "llava-v1.6-mistral-7b",
        "qwen2.5-vl-7b",
        "qwen3-vl-8b",
        "tiny",
        "tiny-next",
        "tiny-captioned",
        "tiny-next-captioned",
        "tiny-qwen2.5-vl",
        "tiny-qwen3-vl",
    ],
    "data": ["coconut", "synthetic", "demo"],
    "criterion@criteria.base": ["lm", "cal"],
    "criterion@criteria.align": ["kl", "mse", "mass", "bce_dice", "seed_kl"],
    "lora": ["default", "llava", "none"],
    "optim": ["adamw"],
    "trainer": ["default"],
    "scaling": ["gpu", "cpu"],
    "wandb": ["default"],
}


CRITERIA = {"lm", "cal", "kl", "mse", "mass", "bce_dice", "seed_kl", "maskembed"}


def test_every_option_file_is_listed():
    from pathlib import Path

    for group, options in GROUP_OPTIONS.items():
        folder = "criterion" if group.startswith("criterion") else group
        assert sorted(p.stem for p in Path(CONFIG_DIR, folder).glob("*.yaml")) == sorted(
            set(options)
            # maskembed is added beside the others (criterion@criteria.vision=maskembed: tests/test_maskembed.py)
            | (CRITERIA if folder == "criterion" else set())
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
    shared = ["scaling.num_workers=2", "scaling.use_gpu=true"]
    with pytest.raises(ValueError, match=r"scaling.gpus_per_worker: 0.5 GPU per worker with 2 workers .*NCCL"):
        spec_from_cfg(compose_cfg([*shared, "scaling.gpus_per_worker=0.5"]))  # two ranks may share a GPU
    assert spec_from_cfg(compose_cfg([*shared, "scaling.gpus_per_worker=0.6"])).scaling["gpus_per_worker"] == 0.6
    assert spec_from_cfg(compose_cfg(["scaling.use_gpu=true", "scaling.gpus_per_worker=0.25"]))  # one worker: fine


def test_full_finetuning_and_sharding_strategy():
    spec = spec_from_cfg(compose_cfg(["experiment=demo", "lora=none", "scaling.strategy=fsdp"]))
    assert spec.full_finetune and spec.strategy == "fsdp"  # the demo's LoRA settings are unused, not an error
    assert spec.lora["train_projector"] is True and spec.lora["train_vision"] is False
    assert not spec_from_cfg(compose_cfg([])).full_finetune and spec_from_cfg(compose_cfg([])).strategy == "ddp"
    with pytest.raises(ValueError, match=r"scaling.strategy=fsdp with LoRA.*use scaling.strategy=ddp"):
        spec_from_cfg(compose_cfg(["scaling.strategy=fsdp"]))
    with pytest.raises(ValueError, match=r"scaling.strategy='zero3': must be one of ddp, fsdp"):
        spec_from_cfg(compose_cfg(["lora=none", "scaling.strategy=zero3"]))
    with pytest.raises(ValueError, match=r"lora.train_vison: not a setting of full finetuning"):
        spec_from_cfg(compose_cfg(["lora=none", "+lora.train_vison=true"]))
    with pytest.raises(ValueError, match=r"lora.train_vision='yes': must be true or false"):
        spec_from_cfg(compose_cfg(["lora=none", "lora.train_vision=yes"]))


BAD_SPACES = {
    "unknown key": ("space:\n  lora.rnak: {choice: [8, 16]}\n", "lora.rnak"),
    "empty choice": ("space:\n  lora.rank: {choice: []}\n", "lora.rank"),
    "low > high": ("space:\n  optim.lr: {loguniform: [1.0e-3, 1.0e-5]}\n", "optim.lr"),
    "unknown criterion": (
        "space:\n  criterion@criteria.align: {choice: {kl: {}, klx: {}}}\n",
        "criterion@criteria.align",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_bad_search_space_fails_before_any_trial(case, tmp_path, capsys, monkeypatch):
    import raysal.tune

    def no_search(*args, **kwargs):
        raise AssertionError("the search must not start")

    monkeypatch.setattr(raysal.tune, "_search", no_search)
    body, key = BAD_SPACES[case]
    path = tmp_path / "bad.yaml"
    path.write_text("objectives: [{metric: val/amr, mode: max}]\nnum_samples: 2\n" + body)
    assert raysal.tune.main([str(path), "experiment=demo"]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and key in err, err


def test_shipped_search_spaces_validate_against_the_configs():
    from raysal.search.space_file import load_search_space
    from raysal.search.validate_space import validate_against

    for name in ("criteria", "lora", "regime", "methods"):
        for profile in (None, "demo"):
            spec = load_search_space(f"search_spaces/{name}.yaml", profile)
            validate_against(spec, compose_cfg)


def test_the_lm_only_control_composes_with_the_demo():
    """`~criterion@criteria.align` under experiment=demo (which sets criteria.align.layers) is the LM-only control:
    the leftover knob settings of the removed slot are unused, not an error."""
    from raysal.orchestration.train.spec import spec_from_cfg

    spec = spec_from_cfg(compose_cfg(["experiment=demo", "~criterion@criteria.align"]))
    assert [c.name for c in spec.criteria] == ["lm"]
