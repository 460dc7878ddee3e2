"""A search: what `search_spaces/*.yaml` describes once loaded and checked (`space_file.load_search_space`).

Keys are Hydra override paths, so every trial replays with `python -m raysal.train <overrides>`. A `choice` may
map each option to its own sub-space (conditional parameters). The Optuna sampler is `sampling.py`, the Optuna
names `optuna_params.py`, the override text `override_text.py`, the check against the composed Hydra config
`validate_space.py`.

The search modules import neither ray, hydra nor wandb: the Tune driver uses them, but they are tested alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysal.search.guards import Guard
from raysal.search.optuna_params import CONTROL_KEY, param_name, params_to_overrides
from raysal.search.override_text import format_override, format_value


class SearchSpaceError(ValueError):
    """A search-space file is wrong; the message is always `<file>: <key path>: <reason>`."""

    def __init__(self, file: str | Path, key: str, reason: str) -> None:
        # All three go to args so the error survives pickling (Ray ships exceptions between processes).
        super().__init__(str(file), key, reason)
        self.file, self.key, self.reason = str(file), key, reason

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.reason}"


@dataclass(frozen=True)
class Objective:
    metric: str
    mode: str  # "max" | "min"


@dataclass(frozen=True)
class Scheduler:
    type: str  # "asha" | "fifo"
    time_attr: str = "train/step"  # a worker-reported step: Tune's training_iteration restarts on resume
    max_t: int = 100  # Tune's ASHA defaults; a file with `type: asha` must give max_t itself
    grace_period: int = 1
    reduction_factor: int = 3


def shared_gpu_reason(*, gpus: float, workers: int) -> str:
    """Why at most half a GPU per worker with several workers is refused: Ray may put two ranks of the trial on one
    GPU, and NCCL refuses two ranks of one process group on one GPU ("Duplicate GPU detected", ray-project/ray#48012).
    """
    return (
        f"{gpus:g} GPU per worker with {workers} workers lets Ray put two ranks of the trial on one GPU, which "
        'NCCL refuses ("Duplicate GPU detected"); give each worker more than half a GPU, or use one worker'
    )


@dataclass(frozen=True)
class TrialResources:
    num_workers: int = 1
    use_gpu: bool = True
    cpus_per_worker: float = 4
    gpus_per_worker: float = 1


@dataclass(frozen=True)
class Fixed:
    value: Any


@dataclass(frozen=True)
class Uniform:
    low: float
    high: float


@dataclass(frozen=True)
class LogUniform:
    low: float
    high: float


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    step: int = 1
    log: bool = False


@dataclass(frozen=True)
class Option:
    value: Any
    space: Space  # empty for a plain option


@dataclass(frozen=True)
class Choice:
    options: tuple[Option, ...]
    conditional: bool  # written as a mapping option → sub-space


Distribution = Fixed | Uniform | LogUniform | IntRange | Choice


@dataclass(frozen=True)
class Param:
    key: str  # Hydra override key
    dist: Distribution


@dataclass(frozen=True)
class SpaceKey:
    """One override key that a trial can set, the choices that enable it, and its Optuna param name."""

    key: str
    requires: tuple[tuple[str, Any], ...]  # ((choice key, option), ...) from the top down; () = always set
    name: str


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]

    def keys(self) -> tuple[SpaceKey, ...]:
        return tuple(walk_keys(self, ()))


@dataclass(frozen=True)
class Control:
    """The LM-only control trial: run first, with the search's full budget (never stopped early); the best trial is
    the one with the best objective among trials whose val/lm_loss is within ``lm_tolerance`` of the control's.
    ``guards``: the margins that matter, decided at the confirmation (`Finalists`); ``screening``: the search's own
    margins, on its smaller evaluation (None: the guards' own)."""

    overrides: tuple[str, ...] = ("~criterion@criteria.align",)
    lm_tolerance: float = 0.02
    guards: tuple[Guard, ...] = ()  # more metrics a trial must not lose against the control (`raysal.search.guards`)
    screening: tuple[Guard, ...] | None = None

    @property
    def screening_guards(self) -> tuple[Guard, ...]:
        return self.guards if self.screening is None else self.screening


@dataclass(frozen=True)
class Finalists:
    """After the search: the ``top_k`` best eligible trials trained again to the full budget with ``seeds``
    training seeds in all (the search's own run is the first), each seed beside a matched control — the
    finalist's config with the control's overrides applied (the alignment criteria removed), the same seed — and
    each finalist confirmed, or not, on the confirmation hold-out (`raysal.search.confirm`)."""

    top_k: int = 1
    seeds: int = 3


@dataclass(frozen=True)
class SearchSpec:
    name: str
    path: Path
    objectives: tuple[Objective, ...]
    num_samples: int
    max_concurrent_trials: int | None  # None: derived from cluster resources by the driver
    seed: int | None
    scheduler: Scheduler
    resources: TrialResources
    base_overrides: tuple[str, ...]
    space: Space
    control: Control | None = Control()
    finalists: Finalists | None = Finalists()  # None: the search's best is exported unconfirmed
    # the Optuna study's database (SQLAlchemy URL); None: a SQLite file kept in the search folder
    optuna_storage: str | None = None

    @property
    def metric(self) -> str | list[str]:
        """What OptunaSearch takes: a string for one objective, a list for several."""
        metrics = [o.metric for o in self.objectives]
        return metrics[0] if len(metrics) == 1 else metrics

    @property
    def mode(self) -> str | list[str]:
        modes = [o.mode for o in self.objectives]
        return modes[0] if len(modes) == 1 else modes

    def keys(self) -> tuple[SpaceKey, ...]:
        """Every override key that can appear, with the choice path that enables it (for validation)."""
        return self.space.keys()

    def trial_overrides(self, params: Mapping[str, Any]) -> list[str]:
        """The full Hydra override list of a trial, from the Optuna params Tune hands the trainable."""
        if params.get(CONTROL_KEY) and self.control is not None:
            return [*self.base_overrides, *self.control.overrides]
        return [*self.base_overrides, *(format_override(k, v) for k, v in params_to_overrides(params).items())]


def walk_keys(space: Space, requires: tuple[tuple[str, Any], ...]) -> Iterator[SpaceKey]:
    for p in space.params:
        yield SpaceKey(p.key, requires, param_name(requires, p.key))
        if isinstance(p.dist, Choice):
            for opt in p.dist.options:
                yield from walk_keys(opt.space, (*requires, (p.key, opt.value)))


def key_where(requires: tuple[tuple[str, Any], ...], key: str) -> str:
    """Where a key sits in the file, for error messages: `space[choice=option][key]`."""
    return "space" + "".join(f"[{k}={format_value(v)}]" for k, v in requires) + f"[{key}]"


def compatible(a: tuple[tuple[str, Any], ...], b: tuple[tuple[str, Any], ...]) -> bool:
    """Whether two choice paths can both be active in one trial: they are exclusive only where one choice picks
    different options (equal prefixes mean the same scope, so an equal key there is the same choice)."""
    for (ka, va), (kb, vb) in zip(a, b, strict=False):
        if ka != kb:
            return True
        if format_value(va) != format_value(vb):
            return False
    return True
