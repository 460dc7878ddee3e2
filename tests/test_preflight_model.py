"""A hub model is checked before Ray starts from its config.json alone (the cache, else the hub: never the weights),
so a layer or head it does not have is one error line at the start, not a failure in every trial."""

from __future__ import annotations

import logging

import pytest
from transformers import AutoConfig

from raysal.model.tiny import write_tiny
from raysal.orchestration.train.compose import compose_cfg
from raysal.orchestration.train.errors import ConfigError
from raysal.orchestration.train.preflight import check_model
from raysal.orchestration.train.spec import spec_from_cfg

HUB = "llava-hf/llava-1.5-7b-hf"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The hub as transformers sees it: a hub id resolves to a (tiny) LLaVA config; the calls are recorded."""
    saved = write_tiny(tmp_path / "tiny", "llava")
    real, calls = AutoConfig.from_pretrained, []

    def from_pretrained(name, *args, **kwargs):
        calls.append((str(name), kwargs))
        return real(saved, *args, **kwargs) if str(name) == HUB else real(name, *args, **kwargs)

    monkeypatch.setattr(AutoConfig, "from_pretrained", from_pretrained)
    return calls


def _spec(*overrides: str):
    return spec_from_cfg(compose_cfg(["experiment=demo", f"model.name_or_path={HUB}", "model.tiny=null", *overrides]))


def test_a_hub_models_layers_are_checked_from_its_config(hub):
    check_model(_spec())  # the tiny config has 4 layers x 4 heads: the demo's criteria fit
    with pytest.raises(ConfigError, match=rf"criteria \(kl\): .*99.*\({HUB}\)"):
        check_model(_spec("criteria.align.layers=[99]"))
    assert hub and all(name == HUB and not kwargs.get("local_files_only") for name, kwargs in hub), hub


def test_an_unreachable_hub_is_a_warning_and_the_trials_check(monkeypatch, caplog):
    def offline(name, *args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(AutoConfig, "from_pretrained", offline)
    with caplog.at_level(logging.WARNING):
        check_model(_spec("criteria.align.layers=[99]"))
    assert "cannot read its config from the Hugging Face hub here" in caplog.text
