"""Checkpoints a restored run continues from exactly: trainable weights (+ a loadable peft adapter), optimizer,
scheduler, position in the data, RNG states.

Layout of a checkpoint folder::

    adapter/        peft ``save_pretrained`` output (what users load; absent for a non-peft model)
    state.pt        trainable parameters, optimizer, scheduler, step/epoch/micro-batch, RNG states
    history.jsonl   every metrics row the run reported up to this checkpoint (one JSON object per line): a resumed
                    run re-logs the rows its W&B run lost to a kill (W&B keeps the steps it already has)
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

STATE = "state.pt"
ADAPTER = "adapter"
HISTORY = "history.jsonl"


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro: int = 0  # micro-batches of `epoch` already consumed
    first_lm_loss: float | None = None  # the starting model's LM loss (divergence guard), kept across resumes


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
) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / HISTORY).write_text("".join(json.dumps(row) + "\n" for row in history))
    if hasattr(model, "peft_config"):
        model.save_pretrained(path / ADAPTER)
    state = {
        "trainable": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "progress": asdict(progress),
        "rng": _rng_state(),
    }
    tmp = path / (STATE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path / STATE)  # atomic: a preempted save never leaves a half-written state.pt
    return path


def load_checkpoint(
    path: Path | str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> Progress:
    file = Path(path) / STATE
    if not file.exists():
        raise FileNotFoundError(f"{file}: not a raysal checkpoint (no {STATE})")
    state = torch.load(file, map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    missing = sorted(set(state["trainable"]) - set(params))
    if missing:
        raise KeyError(f"{file}: checkpoint has parameters the model lacks (different LoRA config?): {missing[:3]}")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
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
