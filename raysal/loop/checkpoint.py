"""Checkpoints a restored run continues from exactly: trainable weights (+ a loadable peft adapter), optimizer,
scheduler, position in the data, RNG states.

Layout of a checkpoint folder::

    adapter/        LoRA: peft ``save_pretrained`` output (what users load)
    connector/      the connector-only stage: the connector's weights (``model.connector_init`` loads them)
    model/          full finetuning: the whole model, ``save_pretrained`` (what users load with ``from_pretrained``)
    state.pt        scheduler, step/epoch/micro-batch, RNG states, the number of ranks that wrote it; trainable
                    parameters and optimizer unless sharded
    sharded/        an FSDP model's trainable parameters and optimizer state, one file per rank
                    (``torch.distributed.checkpoint``); every rank writes its own part, in parallel
    eval_records.json  the per-item records of the evaluation this checkpoint follows (`raysal.metrics.records`):
                    what its val/ metrics are computed from, kept as long as the checkpoint (a paired comparison
                    with the control resamples them)
    history.jsonl   every metrics row the run reported up to this checkpoint (one JSON object per line): a resumed
                    run re-logs the rows its W&B run lost to a kill (W&B keeps the steps it already has)

Sharded models use distributed checkpointing rather than a state dict gathered on rank 0: for full finetuning of
a 7B model the fp32 weights and AdamW moments are ~84 GB, which one process would have to gather into host memory
and write alone at every checkpoint; here each rank writes its 1/N in parallel, and a run may resume on a different
number of workers (DCP reshards on load). Only the loadable ``model/`` is gathered (the fp32 weights: 28 GB for
7B), for users and for export.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from raysal.distributed import is_sharded, rank, world_size
from raysal.metrics.records import RECORDS_FILE, ItemRecords
from raysal.model.build import save_connector

STATE = "state.pt"
ADAPTER = "adapter"
MODEL = "model"
CONNECTOR = "connector"
SHARDED = "sharded"
HISTORY = "history.jsonl"


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro: int = 0  # micro-batches of `epoch` already consumed
    first_lm_loss: float | None = None  # the starting model's LM loss (divergence guard), kept across resumes
    train_seconds: float = 0.0  # wall time in training steps (data waits included) up to the checkpoint, all resumes
    eval_seconds: float = 0.0  # wall time in evaluations (main metrics, POPE, readout, probes), all resumes


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    path: Path | str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress,
    history: list[dict[str, float]] = (),
    *,
    connector: str | None = None,
    records: ItemRecords | None = None,
) -> Path:
    """Write a checkpoint (``connector``: the connector-only stage of that connector kind: ``connector/`` is what
    it exports, not the whole model). A sharded (FSDP) model: every rank calls this (collective), each into its own
    folder or a shared one; rank 0 writes everything but the other ranks' shards. Otherwise rank 0 alone calls
    it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    main, sharded = rank() == 0, is_sharded(model)
    if sharded:
        model_sd, optim_sd = get_sharded_state(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / SHARDED))
    if connector is not None:
        if rank() == 0:
            save_connector(model, path / CONNECTOR, connector)
    elif hasattr(model, "peft_config"):
        model.save_pretrained(path / ADAPTER)
    else:
        save_full_model(model, path / MODEL)
    if not main:
        return path
    (path / HISTORY).write_text("".join(json.dumps(row) + "\n" for row in history))
    if records is not None:
        (path / RECORDS_FILE).write_text(records.to_json())
    state = {
        "scheduler": scheduler.state_dict(),
        "progress": asdict(progress),
        "rng": _rng_state(),
        "sharded": sharded,
        # the ranks that wrote sharded/: a resume on as many fetches only its own shards (`checkpoint_fetch`)
        "world_size": world_size(),
    }
    if not sharded:
        state.update(trainable=trainable_state(model), optimizer=optimizer.state_dict())
    tmp = path / (STATE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path / STATE)  # atomic: a preempted save never leaves a half-written state.pt
    return path


def get_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """An FSDP model's trainable parameters and optimizer state as sharded DTensor state dicts (no gathering)."""
    return get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))


def save_full_model(model: torch.nn.Module, dest: Path) -> None:
    """The whole model, loadable with ``from_pretrained``. Sharded: gathered to rank 0's host memory (every rank
    takes part), and written by rank 0 with the original class's name in ``config.json``."""
    if not is_sharded(model):
        if rank() == 0:
            model.save_pretrained(dest)
        return

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank() != 0:
        return
    # fully_shard swaps the class for a generated subclass (FSDPLlava...): name the class users load
    base = next(c for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))
    model.save_pretrained(dest, state_dict=full)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["architectures"] = [base.__name__]
    (dest / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _read_state(path: Path | str) -> tuple[Path, dict]:
    file = Path(path) / STATE
    if not file.exists():
        raise FileNotFoundError(f"{file}: not a raysal checkpoint (no {STATE})")
    return file, torch.load(file, map_location="cpu", weights_only=False)


def _copy_trainable(file: Path, state: dict, model: torch.nn.Module) -> None:
    """An unsharded checkpoint's trainable parameters into ``model`` (the same names)."""
    params = dict(model.named_parameters())
    missing = sorted(set(state["trainable"]) - set(params))
    if missing:
        raise KeyError(f"{file}: checkpoint has parameters the model lacks (different LoRA config?): {missing[:3]}")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)


def load_weights(path: Path | str, model: torch.nn.Module) -> int:
    """A checkpoint's trained weights into an unsharded ``model`` built as the run built it (an evaluation of a
    saved model: no optimizer, no scheduler, one process) → the step it was saved at. A sharded (FSDP)
    checkpoint's ``sharded/`` is read into the plain model (DCP reshards on load)."""
    file, state = _read_state(path)
    if state.get("sharded"):
        options = StateDictOptions(ignore_frozen_params=True, strict=False)
        model_sd = get_model_state_dict(model, options=options)
        dcp.load({"model": model_sd}, checkpoint_id=str(Path(path) / SHARDED))
        set_model_state_dict(model, model_sd, options=options)
    else:
        _copy_trainable(file, state, model)
    return int(state["progress"]["step"])


def load_checkpoint(
    path: Path | str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> Progress:
    """Every rank calls this with the same checkpoint (a sharded model: collective)."""
    file, state = _read_state(path)
    sharded = bool(state.get("sharded"))
    if sharded != is_sharded(model):
        have, want = ("sharded (FSDP)", "unsharded") if sharded else ("unsharded", "sharded (FSDP)")
        raise ValueError(f"{file}: a {have} checkpoint cannot resume a {want} model (same scaling.strategy)")
    if sharded:
        model_sd, optim_sd = get_sharded_state(model, optimizer)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(Path(path) / SHARDED))
        # not strict: the frozen weights (vision tower) are the base model's, never saved
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))  # fmt: skip
    else:
        _copy_trainable(file, state, model)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return Progress(**state["progress"])


def load_history(path: Path | str) -> list[dict[str, float]]:
    """The metrics rows saved with a checkpoint (none for a checkpoint written before histories were kept)."""
    file = Path(path) / HISTORY
    if not file.exists():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
