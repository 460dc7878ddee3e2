"""Hydra config → `RunSpec`: plain, picklable values for the Ray Train workers (only entry points see `cfg`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from raysal.loop.fit import FitConfig
from raysal.loop.step import validate_criteria


@dataclass
class RunSpec:
    name: str
    storage_path: str  # absolute local path or a URI (s3://...)
    seed: int
    model: dict[str, Any]
    lora: dict[str, Any]
    criteria: list[Any]  # instantiated criterion objects
    fit: FitConfig
    batch_size: int
    data: dict[str, Any]
    scaling: dict[str, Any]
    objective: dict[str, str]
    wandb: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config, for W&B and the run folder


def absolute_storage(path: str) -> str:
    """Ray needs absolute local paths; URIs (s3://, gs://) pass through."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def spec_from_cfg(cfg: DictConfig) -> RunSpec:
    """Validate once, here, with the key named; then the workers trust the spec."""
    c = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(c, dict)
    criteria_cfg = c.get("criteria") or {}
    if not criteria_cfg:
        raise ValueError("criteria: no criterion configured (criteria.base must be lm or cal)")
    criteria = []
    for slot, node in criteria_cfg.items():
        if not isinstance(node, dict) or "_target_" not in node:
            raise ValueError(f"criteria.{slot}: expected a criterion config with _target_, got {node!r}")
        try:
            criteria.append(instantiate(node))
        except Exception as e:  # hydra wraps the real reason; surface it with the key
            raise ValueError(f"criteria.{slot}: cannot instantiate {node['_target_']}: {e}") from e
    validate_criteria(criteria)
    t, o, ev = c["trainer"], c["optim"], c["trainer"]["eval"]
    fit = FitConfig(
        max_steps=t["max_steps"], lr=o["lr"], projector_lr=o.get("projector_lr"), weight_decay=o["weight_decay"],
        warmup_steps=o["warmup_steps"], min_lr_ratio=o["min_lr_ratio"], grad_accum=t["grad_accum"],
        max_grad_norm=t["max_grad_norm"], eval_every=t["eval_every"], bf16=t["bf16"], seed=c["seed"],
        keep_checkpoints=1, eval_layers=ev["layers"], eval_heads=ev["heads"], eval_query_offset=ev["query_offset"],
        eval_theta=ev["theta"],
    )  # fmt: skip
    if t["batch_size"] < 1:
        raise ValueError(f"trainer.batch_size must be >= 1, got {t['batch_size']}")
    if t["objective"]["mode"] not in ("max", "min"):
        raise ValueError(f"trainer.objective.mode must be max or min, got {t['objective']['mode']!r}")
    if c["scaling"]["num_workers"] < 1:
        raise ValueError(f"scaling.num_workers must be >= 1, got {c['scaling']['num_workers']}")
    return RunSpec(
        name=str(c["name"]),
        storage_path=absolute_storage(str(c["storage_path"])),
        seed=int(c["seed"]),
        model=c["model"],
        lora=c["lora"],
        criteria=criteria,
        fit=fit,
        batch_size=int(t["batch_size"]),
        data=c["data"],
        scaling=c["scaling"],
        objective=t["objective"],
        wandb=c["wandb"],
        config=c,
    )
