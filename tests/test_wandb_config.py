"""A trial's W&B config: the whole run config under the override names a user types, one key per quantity whatever
branch of the space sampled it, the control with its real values, no Ray or Train-run bookkeeping."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from entrypoint_runs import space_file

from raysal.orchestration.tune.wandb_config import flat_config, trial_wandb_config
from raysal.search.optuna_params import CONTROL_KEY
from raysal.search.sampling import define_by_run
from raysal.search.space_file import load_search_space

BASE = ["experiment=demo", "trainer.max_steps=6"]


def _params(tmp_path: Path, option: str) -> dict:
    """Optuna's params of a trial of the test space that picked ``option`` (what Tune hands the trainable)."""
    spec = load_search_space(space_file(tmp_path, 1, "wb"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(50):
        trial = study.ask()
        define_by_run(spec)(trial)
        if trial.params["criterion@criteria.align"] == option:
            return trial.params
    raise AssertionError(f"no trial picked {option}")


def test_flat_config_joins_keys_and_keeps_lists():
    assert flat_config({"optim": {"lr": 1e-3, "betas": [0.9, 0.99]}, "a": {}}) == {
        "optim.lr": 1e-3, "optim.betas": [0.9, 0.99], "a": {}
    }  # fmt: skip


def test_a_sampled_weight_is_one_key_whatever_branch_and_the_base_values_are_there(tmp_path):
    params = _params(tmp_path, "kl")
    assert any("|" in k for k in params), params  # Optuna's own names are per branch
    config, tags = trial_wandb_config(params, trial_id="abc12345", base=BASE, control=(), trials_dir=str(tmp_path))
    assert tags == []
    assert config["criterion@criteria.align"] == "kl"
    weight = next(v for k, v in params.items() if k.endswith("|criteria.align.weight"))
    assert config["criteria.align.weight"] == pytest.approx(weight)
    assert config["optim.lr"] == pytest.approx(params["optim.lr"])
    assert config["trainer.max_steps"] == 6 and config["lora.rank"] > 0  # the base config's values, not sampled
    assert not [k for k in config if "|" in k or "=" in k], "no Optuna-internal names"
    bookkeeping = {"date", "hostname", "node_ip", "pid", "trial_log_path", "name", "storage_path"}
    assert not bookkeeping & set(config) and not [k for k in config if k.startswith("wandb.")]


def test_the_control_has_its_real_values_and_its_tag(tmp_path):
    config, tags = trial_wandb_config({CONTROL_KEY: True}, trial_id="c0", base=BASE,
                                      control=("~criterion@criteria.align",), trials_dir=str(tmp_path))  # fmt: skip
    assert tags == ["control"]
    assert config["criterion@criteria.align"] is None  # removed: the LM-only control
    assert "criteria.align.weight" not in config and "criteria.align._target_" not in config
    assert config["optim.lr"] > 0 and config["lora.rank"] > 0 and config["trainer.max_steps"] == 6


def test_the_control_values_leave_out_what_its_overrides_removed():
    from raysal.orchestration.tune.wandb_config import control_values

    values = control_values(BASE, ("~criterion@criteria.align",))
    assert values["optim.lr"] > 0 and values["lora.rank"] > 0 and values["criterion@criteria.align"] is None
    assert not [k for k in values if k.startswith("criteria.align.")], "no settings of the criterion it lacks"


def test_judged_runs_get_their_tags_in_a_file_wandb_sync_merges(tmp_path, monkeypatch):
    """Offline, a trial's run is resumed for a moment with its final tags (best, excluded:<metric>): one more file
    of the same run id, which `wandb sync` merges into the run."""
    import wandb
    from wandb_records import read_run

    from raysal.orchestration.train.wandb_run import tag_runs

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = wandb.init(project="p", group="g", id="t1", name="t1", mode="offline", dir=str(tmp_path))
    run.log({"train/step": 2, "val/amr": 1.0}, step=2)
    run.finish()
    assert tag_runs({"t1": ["best", "excluded:val/lm_loss"]}, project="p", entity=None, group="g", mode="offline",
                    directory=tmp_path, mirror_to=str(tmp_path)) == 1  # fmt: skip
    runs = [read_run(p) for p in sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))]
    assert [r["id"] for r in runs] == ["t1", "t1"] and runs[0]["history"]
    assert set(runs[1]["tags"]) == {"best", "excluded:val/lm_loss"} and runs[1]["group"] == "g"
