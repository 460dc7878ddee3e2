"""Hydra config → `RunSpec`: plain, picklable values for the Ray Train workers (only entry points see `cfg`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from raysal import storage
from raysal.attention.head_scores import heads_file, localization_heads
from raysal.criteria.protocol import AttentionSelection, Criterion
from raysal.loop.divergence import DivergenceConfig
from raysal.loop.fit import FitConfig
from raysal.loop.step import validate_criteria
from raysal.metrics.pope import METRICS, SETTINGS
from raysal.model.build import lora_target_regex, resolve_dtype
from raysal.orchestration.train.errors import ConfigError
from raysal.search.space import shared_gpu_reason

log = logging.getLogger(__name__)
_LORA_ONLY = frozenset({"rank", "alpha", "dropout", "targets", "vision"})
# shared criterion knobs
_KNOBS = frozenset({"weight", "layers", "heads", "top_k", "query_offset", "per_layer", "smoothing"})


@dataclass
class RunSpec:
    name: str
    storage_path: str  # absolute local path or a URI (s3://...)
    seed: int
    model: dict[str, Any]
    lora: dict[str, Any]  # apply_lora's arguments; {"enabled": False, ...}: full finetuning (`lora=none`)
    criteria: list[Criterion]  # instantiated criterion objects
    fit: FitConfig
    batch_size: int
    data: dict[str, Any]
    scaling: dict[str, Any]
    objective: dict[str, str]
    wandb: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config, for W&B and the run folder

    @property
    def full_finetune(self) -> bool:
        return self.lora.get("enabled", True) is False

    @property
    def strategy(self) -> str:
        return str(self.scaling.get("strategy", "ddp"))

    @property
    def run_dir(self) -> str:
        """The run folder, ``<storage_path>/<name>`` (a local path or a URI): Ray Train's checkpoints, the probes,
        run_config.json, fail_reason.txt; the heartbeat's key."""
        return storage.join(self.storage_path, self.name)


def _get(c: dict, key: str) -> Any:
    node: Any = c
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{key}: missing from the config")
        node = node[part]
    return node


def _number(c: dict, key: str, kind: type, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False, optional: bool = False) -> Any:  # fmt: skip
    """The value at ``key``, checked: an int (or a float for ``kind=float``) within [low, high] (open ends where
    asked); None only when ``optional``."""
    v = _get(c, key)
    if v is None and optional:
        return None
    ok_type = isinstance(v, int) if kind is int else isinstance(v, int | float)
    if isinstance(v, bool) or not ok_type:
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"{key}={v!r}: must be {what}{' or null' if optional else ''}")
    if low is not None and (v <= low if low_open else v < low):
        raise ConfigError(f"{key}={v}: must be {'>' if low_open else '>='} {low}")
    if high is not None and (v >= high if high_open else v > high):
        raise ConfigError(f"{key}={v}: must be {'<' if high_open else '<='} {high}")
    return v


def _choice(c: dict, key: str, options: tuple[str, ...]) -> str:
    v = _get(c, key)
    if v not in options:
        raise ConfigError(f"{key}={v!r}: must be one of {', '.join(options)}")
    return v


def objective_metrics(criteria: list[Criterion], trainer: dict[str, Any] | None = None) -> set[str]:
    """Metrics a run reports at every evaluation: what `trainer.objective.metric` and a search's objectives may
    name. ``trainer`` (the run's ``trainer`` config): POPE's ``val/pope/<setting>/<metric>`` while
    ``trainer.pope.images`` > 0, the readout's ``val/rec_acc50`` / ``val/rec_miou`` while ``trainer.readout.images``
    > 0 (the counts ``n`` are not objectives)."""
    val = {f"val/{k}" for k in ("lm_loss", "amr", "ap", "nss", "pointing")}
    pope = (trainer or {}).get("pope") or {}
    if pope.get("images"):
        val |= {f"val/pope/{s}/{m}" for s in pope.get("settings") or SETTINGS for m in METRICS if m != "n"}
    if trainer and (trainer.get("readout") or {}).get("images"):
        val |= {"val/rec_acc50", "val/rec_miou"}
    return val | {"train/loss", "train/grad_norm"} | {f"train/loss/{c.name}" for c in criteria}


def _bool(c: dict, key: str) -> bool:
    v = _get(c, key)
    if not isinstance(v, bool):
        raise ConfigError(f"{key}={v!r}: must be true or false")
    return v


def check_finetune(c: dict) -> None:
    """LoRA's values, or full finetuning's (``lora=none``), and a sharding strategy that suits them."""
    full = c["lora"].get("enabled", True) is False if isinstance(c.get("lora"), dict) else False
    if not full:
        if "enabled" in c["lora"]:
            _bool(c, "lora.enabled")
        _number(c, "lora.rank", int, low=1)
        _number(c, "lora.alpha", float, low=0, low_open=True)
        _number(c, "lora.dropout", float, low=0, high=1, high_open=True)
        if "vision" in c["lora"]:
            _bool(c, "lora.vision")
        targets = _get(c, "lora.targets")
        try:
            lora_target_regex(targets)
        except ValueError as e:
            raise ConfigError(f"lora.targets={targets!r}: {e}") from None
        _bool(c, "lora.train_projector")
    else:
        unused = sorted(set(c["lora"]) & _LORA_ONLY)
        if unused:  # an experiment's LoRA settings (experiment=demo sets lora.rank) under lora=none
            log.info("lora=none (full finetuning): the LoRA settings %s are unused", unused)
        extra = sorted(set(c["lora"]) - _LORA_ONLY - {"enabled", "train_projector", "train_vision"})
        if extra:
            raise ConfigError(f"lora.{extra[0]}: not a setting of full finetuning (lora=none: train_projector, "
                              "train_vision)")  # fmt: skip
        _bool(c, "lora.train_projector")
        _bool(c, "lora.train_vision")
    strategy = _choice(c, "scaling.strategy", ("ddp", "fsdp"))
    if strategy == "fsdp" and not full:
        raise ConfigError(
            "scaling.strategy=fsdp with LoRA: FSDP shards full finetuning (lora=none); a LoRA trial's weights and "
            "optimiser fit each GPU, so use scaling.strategy=ddp"
        )


def resolve_localization_heads(c: dict, criteria: list[Criterion], slots: list[str]) -> None:
    """``heads: localization`` → the ``top_k`` best (layer, head) pairs of the model's heads.json (written by
    ``python -m raysal.heads`` under ``finder.out``), in place; the criterion then reads just those heads."""
    for slot, x in zip(slots, criteria, strict=True):
        if not isinstance(x, AttentionSelection) or x.heads != "localization":
            continue
        where = f"criteria.{slot}"
        top_k = x.top_k
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"{where}.top_k={top_k!r}: must be an integer >= 1")
        name = str(_get(c, "model.name_or_path"))
        try:
            x.heads = localization_heads(heads_file(str(_get(c, "finder.out")), name), top_k, name)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{where}.heads=localization: {e}") from None
        log.info("%s.heads=localization: the top %d heads %s", where, top_k, x.heads)


def check_connector_stage(c: dict, criteria: list[Criterion]) -> None:
    """The connector-only stage trains the connector on captions: the LM loss alone, one replica per worker."""
    if [x.name for x in criteria] != ["lm"]:
        raise ConfigError(
            f"trainer.stage=connector trains on captions only (the lm criterion), got {[x.name for x in criteria]}: "
            "remove the alignment criterion (~criterion@criteria.align)"
        )
    if _get(c, "scaling.strategy") != "ddp":
        raise ConfigError("trainer.stage=connector: the connector alone trains; use scaling.strategy=ddp")
    log.info("trainer.stage=connector: only the connector trains; the lora settings are unused")


def check_values(c: dict) -> None:
    """Every number the run uses, checked with its key named (the types Hydra cannot check for us)."""
    _number(c, "seed", int)
    check_finetune(c)
    _number(c, "optim.lr", float, low=0, low_open=True)
    _number(c, "optim.projector_lr", float, low=0, low_open=True, optional=True)
    _number(c, "optim.weight_decay", float, low=0)
    _number(c, "optim.warmup_steps", int, low=0)
    _number(c, "optim.min_lr_ratio", float, low=0, high=1)
    for key in ("max_steps", "batch_size", "grad_accum", "eval_every", "keep_checkpoints"):
        _number(c, f"trainer.{key}", int, low=1)
    _number(c, "trainer.max_grad_norm", float, low=0, low_open=True, optional=True)
    _number(c, "trainer.max_failures", int, low=0)
    _number(c, "trainer.stall_timeout_s", float, low=0, low_open=True, optional=True)
    _number(c, "trainer.wait_timeout_s", float, low=0, low_open=True, optional=True)
    _number(c, "trainer.divergence.lm_loss_of_uniform", float, low=0, low_open=True, optional=True)
    _number(c, "trainer.divergence.lm_loss_factor", float, low=1, low_open=True, optional=True)
    _number(c, "trainer.divergence.zero_grad_steps", int, low=1, optional=True)
    _number(c, "trainer.divergence.grad_norm_limit", float, low=0, low_open=True, optional=True)
    _number(c, "trainer.probes.images", int, low=0)
    _number(c, "trainer.probes.phrases", int, low=1)
    _number(c, "trainer.pope.images", int, low=0)
    _number(c, "trainer.pope.confirm_images", int, low=0)
    asked = _get(c, "trainer.pope.settings")
    if (
        not isinstance(asked, list)
        or not asked
        or any(s not in SETTINGS for s in asked)
        or len(set(asked)) < len(asked)
    ):
        raise ConfigError(f"trainer.pope.settings={asked!r}: must list some of {', '.join(SETTINGS)}, each once")
    _number(c, "trainer.readout.images", int, low=0)
    _choice(c, "trainer.objective.mode", ("max", "min"))
    _choice(c, "trainer.eval.query_offset", (0, -1))
    _number(c, "trainer.eval.theta", float, low=0, high=1, low_open=True)
    _number(c, "scaling.num_workers", int, low=1)
    _number(c, "scaling.cpus_per_worker", float, low=0, low_open=True)
    _number(c, "scaling.gpus_per_worker", float, low=0)
    if _get(c, "scaling.use_gpu") and not _get(c, "scaling.gpus_per_worker"):
        raise ConfigError("scaling.gpus_per_worker=0 with scaling.use_gpu=true: a GPU worker needs a GPU share")
    workers, gpus = _get(c, "scaling.num_workers"), _get(c, "scaling.gpus_per_worker")
    if _get(c, "scaling.use_gpu") and workers > 1 and gpus <= 0.5:
        raise ConfigError(f"scaling.gpus_per_worker: {shared_gpu_reason(gpus=gpus, workers=workers)}")
    _number(c, "data.encode_cpus", float, low=0, low_open=True)
    _bool(c, "data.encode_once")
    _number(c, "data.val_holdout", float, low=0, high=1, high_open=True)
    _number(c, "data.confirm_holdout", float, low=0, high=1, high_open=True)
    _number(c, "data.confirm_min_images", int, low=1)
    _number(c, "data.val_max_images", int, low=1, optional=True)
    _number(c, "data.val_min_images", int, low=1)
    _choice(c, "model.padding_side", ("left", "right"))
    _number(c, "model.min_pixels", int, low=1, optional=True)
    _number(c, "model.max_pixels", int, low=1, optional=True)
    try:
        resolve_dtype(str(_get(c, "model.dtype")), "cpu")
    except ValueError as e:
        raise ConfigError(f"model.dtype: {e}") from None
    check_connector(c)


def check_connector(c: dict) -> None:
    """The connector kind, its saved start, and what trains it."""
    kind = _choice(c, "model.connector", ("mlp", "align"))
    stage = _choice(c, "trainer.stage", ("finetune", "connector"))
    init = _get(c, "model.connector_init")
    if init is not None and not storage.is_dir(str(init)):
        raise ConfigError(f"model.connector_init={init}: no such folder (a connector/ of a connector-only stage)")
    if stage == "connector" or kind != "align":
        return  # the connector-only stage trains (and saves) the connector whatever the lora group says
    if c["lora"].get("enabled", True) is False:
        raise ConfigError(
            "model.connector=align with lora=none: the exported model/ would load with the checkpoint's MLP "
            "projector (transformers knows no ALIGN connector); use LoRA (lora.train_projector=true) with align"
        )
    if init is None and not _get(c, "lora.train_projector"):
        raise ConfigError(
            "model.connector=align with lora.train_projector=false: a fresh ALIGN connector is random and would stay "
            "frozen; set lora.train_projector=true, or align it first (trainer.stage=connector) and start from it "
            "(model.connector_init)"
        )


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain values (what the workers receive and run_config.json records), with
    ``finder.out`` made absolute here, where the command was typed: a trial or worker resolves a relative path on
    its own node."""
    c = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(c, dict)
    if isinstance(c.get("finder"), dict) and c["finder"].get("out"):
        c["finder"]["out"] = storage.absolute(str(c["finder"]["out"]))
    return c


def instantiate_criteria(c: dict) -> tuple[list[Criterion], list[str]]:
    """Each ``criteria.<slot>`` instantiated from its ``_target_`` → (criteria, their slots); an instantiation error
    names the slot and the real reason (Hydra wraps it)."""
    criteria_cfg = c.get("criteria") or {}
    if not criteria_cfg:
        raise ConfigError("criteria: no criterion configured (criteria.base must be lm or cal)")
    criteria: list[Criterion] = []
    slots: list[str] = []
    for slot, node in criteria_cfg.items():
        if isinstance(node, dict) and "_target_" not in node and all(k in _KNOBS for k in node):
            # the slot's criterion was removed (`~criterion@criteria.align`, the LM-only control) while an
            # experiment still sets its knobs (experiment=demo: `criteria.align.layers: all`): nothing to run
            log.info("criteria.%s: no criterion selected; its settings %s are unused", slot, node)
            continue
        if not isinstance(node, dict) or "_target_" not in node:
            raise ConfigError(f"criteria.{slot}: expected a criterion config with _target_, got {node!r}")
        try:
            criteria.append(instantiate(node))
            slots.append(str(slot))
        except Exception as e:  # hydra wraps the real reason; surface it with the key
            reason = " ".join(str(e.__cause__ or e).split())
            raise ConfigError(f"criteria.{slot}: cannot instantiate {node['_target_']}: {reason}") from e
    return criteria, slots


def check_maskembed(c: dict, criteria: list[Criterion]) -> None:
    """MaskEmbed trains the vision tower's LoRA adapters against the same tower with them off: it needs them."""
    if any(x.name == "maskembed" for x in criteria) and not (
        c["lora"].get("enabled", True) is not False and c["lora"].get("vision") is True
    ):
        raise ConfigError(
            "criteria (maskembed): needs a trainable student vision tower: LoRA with lora.vision=true (its frozen "
            "teacher is the same tower with the adapters off)"
        )


def check_objective(c: dict, criteria: list[Criterion]) -> None:
    """``trainer.objective.metric`` is one the run reports, or checkpoints would be ranked on nothing."""
    metric = _get(c, "trainer.objective.metric")
    reported = objective_metrics(criteria, c["trainer"])
    if metric not in reported:
        raise ConfigError(f"trainer.objective.metric={metric!r}: not a reported metric (one of {sorted(reported)})")


def fit_config(c: dict) -> FitConfig:
    """The core loop's settings from the checked config (a run keeps one local checkpoint: Ray Train keeps its own
    copies)."""
    t, o, ev = c["trainer"], c["optim"], c["trainer"]["eval"]
    return FitConfig(
        max_steps=t["max_steps"], lr=o["lr"], projector_lr=o.get("projector_lr"), weight_decay=o["weight_decay"],
        warmup_steps=o["warmup_steps"], min_lr_ratio=o["min_lr_ratio"], grad_accum=t["grad_accum"],
        max_grad_norm=t["max_grad_norm"], eval_every=t["eval_every"], bf16=t["bf16"], seed=c["seed"],
        keep_checkpoints=1, eval_layers=ev["layers"], eval_heads=ev["heads"], eval_query_offset=ev["query_offset"],
        eval_theta=ev["theta"], divergence=DivergenceConfig(**t["divergence"]),
        connector_stage=c["model"]["connector"] if t["stage"] == "connector" else None,
    )  # fmt: skip


def spec_from_cfg(cfg: DictConfig) -> RunSpec:
    """Validate once, here, with the key named; then the workers trust the spec. Raises `ConfigError`."""
    c = plain_config(cfg)
    criteria, slots = instantiate_criteria(c)
    resolve_localization_heads(c, criteria, slots)
    try:
        validate_criteria(criteria)
    except ValueError as e:
        raise ConfigError(f"criteria: {e}") from None
    check_values(c)
    if c["trainer"]["stage"] == "connector":
        check_connector_stage(c, criteria)
    check_maskembed(c, criteria)
    check_objective(c, criteria)
    return RunSpec(
        name=str(c["name"]),
        storage_path=storage.absolute(str(c["storage_path"])),
        seed=int(c["seed"]),
        model=c["model"],
        lora=c["lora"],
        criteria=criteria,
        fit=fit_config(c),
        batch_size=int(c["trainer"]["batch_size"]),
        data=c["data"],
        scaling=c["scaling"],
        objective=c["trainer"]["objective"],
        wandb=c["wandb"],
        config=c,
    )
