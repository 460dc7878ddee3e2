"""Compose the Hydra config outside ``@hydra.main`` (the Tune driver and its trials use overrides lists)."""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from raysal import storage

# `${storage_join:${storage_path},heads}`: a location under the storage path that keeps a URI's ?options last
# (`${storage_path}/heads` would put `/heads` after `&scheme=http`)
OmegaConf.register_new_resolver("storage_join", lambda base, *parts: storage.join(str(base), *map(str, parts)),
                                replace=True)  # fmt: skip

CONFIG_DIR = os.environ.get("RAYSAL_CONFIGS", str(Path(__file__).resolve().parents[3] / "configs"))


def compose_cfg(overrides: list[str], config_dir: str = CONFIG_DIR) -> DictConfig:
    """The config ``python -m raysal.train <overrides>`` would run with."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        return compose("config", overrides=list(overrides))
