"""The finalists' stage of a search: which runs confirm a finalist, and the matched control of each.

A search chooses its finalists on the selection hold-out with one training seed each, and with its LM-only control
trained at the default learning rate, LoRA and targets while the trials searched them. What the confirmation
compares instead is one configuration with and without its alignment criteria, over seeds:

* the finalist's *arms*: its config at ``S`` training seeds — the first is the search's own run (reused, not
  trained again), the others are the same overrides with ``seed=<s>``;
* one *matched control* per seed: the finalist's config with the control's overrides applied (every sampled key
  the control's overrides address removed: `criterion@criteria.align` and its `criteria.align.*` values for the
  default control), the same seed — so the same learning rate, LoRA, targets, steps, initialisation and data order.

Plain Python: the orchestration turns each `Arm` into a Tune trial (`raysal.orchestration.tune.finalists`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from raysal.search.optuna_params import params_to_overrides
from raysal.search.override_text import format_override

FINALIST, MATCHED_CONTROL = "finalist", "matched-control"
ARM_KEY = "raysal_arm"  # the Tune config key of a finalists'-stage trial: the `Arm` as a dict


@dataclass(frozen=True)
class Arm:
    """One run of the finalists' stage: ``role`` of ``finalist`` (a search trial's id) at training ``seed``;
    ``overrides``: its sampled/matched overrides, the seed included (the search's base overrides go before them);
    ``reuse``: the search trial whose run this arm is (the finalist at the search's seed), else None (trained)."""

    finalist: str
    role: str  # FINALIST | MATCHED_CONTROL
    seed: int
    overrides: tuple[str, ...]
    reuse: str | None = None

    @property
    def key(self) -> str:
        return f"{self.finalist}/{self.role}/seed{self.seed}"

    def as_config(self) -> dict[str, Any]:
        return {**asdict(self), "overrides": list(self.overrides)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Arm:
        return cls(str(config["finalist"]), str(config["role"]), int(config["seed"]), tuple(config["overrides"]),
                   config.get("reuse"))  # fmt: skip


def _target(override: str) -> str:
    """The config path an override addresses: ``~criterion@criteria.align`` → ``criteria.align``,
    ``criteria.align.weight=2`` → ``criteria.align.weight``, ``+x.y=1`` → ``x.y``."""
    key = override.lstrip("~+").split("=", 1)[0]
    return key.split("@", 1)[1] if "@" in key else key


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + ".")


def matched_overrides(params: Mapping[str, Any], control: Sequence[str]) -> list[str]:
    """The finalist's sampled overrides (``params``: its Tune config) with the control's applied: every sampled key
    under a path the control's overrides address is dropped, then the control's overrides follow."""
    roots = [_target(o) for o in control]
    sampled = params_to_overrides(params)
    kept = [format_override(k, v) for k, v in sampled.items() if not any(_under(_target(k), r) for r in roots)]
    return [*kept, *control]


def finalist_overrides(params: Mapping[str, Any]) -> list[str]:
    return [format_override(k, v) for k, v in params_to_overrides(params).items()]


def arms(finalists: Sequence[tuple[str, Mapping[str, Any]]], control: Sequence[str], seeds: int,
         first_seed: int) -> list[Arm]:  # fmt: skip
    """Every run of the stage for ``finalists`` ((search trial id, its Tune config), best first): per finalist, its
    ``seeds`` seeds from ``first_seed`` (the search's: that arm reuses the search trial), and a matched control
    per seed. Finalist arms first, seed by seed, so that a stage cut short has the pairs it needs soonest."""
    out: list[Arm] = []
    for trial_id, params in finalists:
        mine, matched = finalist_overrides(params), matched_overrides(params, control)
        for s in range(first_seed, first_seed + seeds):
            seed = format_override("seed", s)
            out.append(Arm(trial_id, FINALIST, s, (*mine, seed), trial_id if s == first_seed else None))
            out.append(Arm(trial_id, MATCHED_CONTROL, s, (*matched, seed)))
    return out
