"""What a trial's W&B run holds as its config: the whole run config the trial trained with, flat, under the Hydra
override names a user types, so that a search is one comparable sweep in W&B.

Tune's trial config is the searcher's: Optuna's internal parameter names, one per branch of a conditional space
(``criterion@criteria.align=mse|criteria.align.weight``), only the sampled values, and ``{raysal_control: true}`` for
the control. W&B's parallel coordinates and its sweep tables need one key per quantity whatever branch set it
(``criteria.align.weight``), the values each trial did not sample (``optim.lr`` of the base config) and the control
with its real values. So the run config is composed here as the trial composes it (`trial_run_overrides`), resolved
and flattened to dotted keys; each config-group choice the trial made (``criterion@criteria.align``) is its own key
(``None`` where the override removed the group, as the LM-only control does). The Train run's own bookkeeping
(its ``name``, ``storage_path`` and ``wandb`` settings: the search logs it, not the run) is left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml
from omegaconf import OmegaConf

from raysal.orchestration.train.compose import compose_cfg
from raysal.orchestration.tune.summary import trial_overrides
from raysal.orchestration.tune.trial import trial_run_overrides
from raysal.search.finalists import ARM_KEY, Arm
from raysal.search.optuna_params import CONTROL_KEY

LEFT_OUT = ("name", "storage_path", "wandb")  # the Train run's bookkeeping: its W&B run is the search's


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-4}}`` → ``{"optim.lr": 1e-4}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flat_config(value, name))
        else:
            out[name] = value
    return out


def _choices(overrides: list[str], flat: dict[str, Any]) -> dict[str, Any]:
    """The config-group choices among the overrides (``criterion@criteria.align=kl``, ``~criterion@…``): a key of
    their own, the value as Hydra reads it; the leaf overrides are already in ``flat``."""
    out: dict[str, Any] = {}
    for o in overrides:
        key, _, value = o.partition("=")
        if key.startswith("~"):
            out[key[1:]] = None
            continue
        key = key.lstrip("+")
        if key not in flat and not any(k.startswith(f"{key}.") for k in flat):
            out[key] = yaml.safe_load(value) if value else None
    return out


def trial_run_config(overrides: list[str], choice_overrides: list[str]) -> dict[str, Any]:
    """The flat W&B config of a run composed from ``overrides``; ``choice_overrides``: the ones a user chose (the
    search's base, the trial's sampled values or the control's), whose group choices get their own keys."""
    resolved = OmegaConf.to_container(compose_cfg(overrides), resolve=True)
    flat = {k: v for k, v in flat_config(resolved).items() if k.split(".", 1)[0] not in LEFT_OUT}
    return {**flat, **_choices(choice_overrides, flat)}


def control_values(base: list[str], control: tuple[str, ...]) -> dict[str, Any]:
    """{override key: value} of the LM-only control's run config, less what its overrides removed (``~group@pkg``:
    the settings left under ``pkg`` train nothing): the values its study trial records (`fixed_values`)."""
    overrides = [*base, *control]
    config = trial_run_config(overrides, overrides)
    removed = [o[1:].rsplit("@", 1)[-1] for o in control if o.startswith("~")]
    return {k: v for k, v in config.items() if not any(k == r or k.startswith(f"{r}.") for r in removed)}


def trial_wandb_config(
    trial_config: Mapping[str, Any], *, trial_id: str, base: list[str], control: tuple[str, ...], trials_dir: str,
    pins: tuple[str, ...] = (),
) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    """(config, tags) of a trial's W&B run: the whole run config it trains with (as `run_trial` composes it), and
    its tags: ``control`` for the LM-only control; for a run of the finalists' stage its role (``finalist`` or
    ``matched-control``), ``seed:<s>`` and ``finalist:<trial id>``."""
    chosen = trial_overrides(base, dict(trial_config), control)
    config = trial_run_config(trial_run_overrides(base, dict(trial_config), control, trial_id, trials_dir, pins),
                              chosen)  # fmt: skip
    if ARM_KEY in trial_config:
        arm = Arm.from_config(trial_config[ARM_KEY])
        return config, [arm.role, f"seed:{arm.seed}", f"finalist:{arm.finalist}"]
    return config, (["control"] if trial_config.get(CONTROL_KEY) else [])
