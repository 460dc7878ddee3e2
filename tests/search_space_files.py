"""Search-space files for the search tests: a full example, a minimal valid file, and a check that sampled
overrides are exactly the active keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from raysal.search.space import (
    Fixed,
    IntRange,
    LogUniform,
    SearchSpec,
    Space,
    Uniform,
)

EXAMPLE = """\
name: criteria                    # search name (W&B group, folder name); default: the file stem
objectives:                       # one or more; ASHA only with exactly one
  - {metric: val/amr, mode: max}
  # - {metric: val/lm_loss, mode: min}
num_samples: 48
max_concurrent_trials: null       # null: derived later from cluster resources
seed: 0                           # sampler seed
scheduler:                        # type asha | fifo
  type: asha
  time_attr: train/step
  max_t: 2000
  grace_period: 200
  reduction_factor: 3
resources:                        # per trial
  num_workers: 1
  use_gpu: true
  cpus_per_worker: 4
  gpus_per_worker: 1
base_overrides:                   # Hydra overrides applied to every trial
  - trainer.max_steps=2000
space:                            # keys are Hydra override paths
  criterion@criteria.align:       # options carry their own sub-spaces (conditional parameters)
    choice:
      kl:
        criteria.align.weight: {loguniform: [0.05, 2.0]}
        criteria.align.smoothing: {uniform: [0.0, 0.2]}
      mse:
        criteria.align.weight: {loguniform: [0.1, 10.0]}
      mass: {}
  criteria.align.layers: {choice: [early, middle, late, all, [-2, -1]]}
  criteria.align.query_offset: {choice: [0, -1]}
  lora.rank: {choice: [8, 16, 64]}
  optim.lr: {loguniform: [5.0e-5, 5.0e-4]}
  trainer.grad_accum: {int: [1, 4]}
  optim.warmup_steps: {int: {low: 0, high: 100, step: 10}}
  lora.dropout: 0.05                                       # a plain value = fixed
"""


def write(tmp_path: Path, text: str, name: str = "criteria.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def minimal(**changes: Any) -> str:
    """A small valid file as YAML text, with top-level entries replaced (None removes one)."""
    doc: dict[str, Any] = {
        "objectives": [{"metric": "val/amr", "mode": "max"}],
        "num_samples": 4,
        "scheduler": {"type": "asha", "max_t": 100, "grace_period": 10},
        "space": {"optim.lr": {"loguniform": [1e-5, 1e-3]}},
    }
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return yaml.safe_dump(doc, sort_keys=False)


def check_active(spec_or_space: SearchSpec | Space, overrides: dict[str, Any]) -> None:
    """`overrides` holds exactly the keys active under its own choices, each value inside its distribution."""
    space = spec_or_space.space if isinstance(spec_or_space, SearchSpec) else spec_or_space
    expected: list[str] = []

    def walk(s: Space) -> None:
        for p in s.params:
            expected.append(p.key)
            assert p.key in overrides, p.key
            v, d = overrides[p.key], p.dist
            if isinstance(d, Fixed):
                assert v == d.value
            elif isinstance(d, Uniform | LogUniform):
                assert isinstance(v, float) and d.low <= v <= d.high
            elif isinstance(d, IntRange):
                assert isinstance(v, int) and d.low <= v <= d.high and (v - d.low) % d.step == 0
            else:
                matches = [o for o in d.options if o.value == v and type(o.value) is type(v)]
                assert len(matches) == 1, (p.key, v)
                walk(matches[0].space)

    walk(space)
    assert list(overrides) == expected  # only active keys, in file order
