"""The training loop: AdamW, warmup + cosine, gradient accumulation, clipping, bf16 autocast on CUDA, periodic
evaluation, checkpoints, and a ``report(metrics, checkpoint_dir)`` callable.

``report`` is how the same loop runs under Ray Train (it wraps ``ray.train.report``), in a plain process, and in
tests. Metrics are namespaced: ``train/loss``, ``train/loss/<criterion>``, ``train/lr``, ``val/lm_loss``,
``val/amr``, ``val/ap``, ``val/nss``, ``val/pointing``; what the run has cost so far, across resumes:
``cost/train_s`` and ``cost/eval_s`` (wall seconds of this rank in training steps and in evaluations).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raysal.attention.capture import CAPTURE_IMPL, CapturePlan, enable_capture
from raysal.attention.selection import resolve_heads, resolve_layers
from raysal.criteria.protocol import AttachesModules, Criterion
from raysal.distributed import all_reduce_sum, is_sharded, world_size
from raysal.loop.checkpoint import Progress, load_checkpoint, load_history, save_checkpoint
from raysal.loop.divergence import DivergenceConfig, DivergenceGuard
from raysal.loop.evaluate import evaluate
from raysal.loop.schedule import make_scheduler
from raysal.loop.step import plan_step, train_step
from raysal.metrics.records import ItemRecords
from raysal.model.build import ModelInfo, model_info, param_groups

Report = Callable[[dict[str, float], Path | None], None]
# (unwrapped model, its ModelInfo, the evaluation protocol, step, autocast context) → None
AfterEval = Callable[[torch.nn.Module, ModelInfo, CapturePlan, int, contextlib.AbstractContextManager], None]
# more validation metrics (POPE, the localisation readout): called on every rank, returns the whole set's values
# and adds the items they are computed from to the evaluation's records
ExtraEval = Callable[[torch.nn.Module, CapturePlan, contextlib.AbstractContextManager, ItemRecords], dict[str, float]]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


@dataclass(frozen=True)
class FitConfig:
    max_steps: int
    lr: float = 2e-4
    projector_lr: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    eval_every: int = 100
    bf16: bool = True  # autocast to bf16 on CUDA; ignored on CPU
    seed: int = 0
    keep_checkpoints: int | None = None  # local checkpoints kept (None: all; Ray Train keeps its own copies)
    # the fixed evaluation protocol: the same for every trial of a search
    eval_layers: str | list[int] = "all"
    eval_heads: str | list[int] = "all"
    eval_query_offset: int = 0
    eval_theta: float = 0.5
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    connector_stage: str | None = None  # the connector-only stage of this connector kind: checkpoints save connector/
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.grad_accum < 1 or self.eval_every < 1:
            raise ValueError("max_steps, grad_accum and eval_every must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fit(
    model: torch.nn.Module,
    criteria: Sequence[Criterion],
    train_batches: Callable[[int], Iterable[dict]],
    val_batches: Callable[[], Iterable[dict]] | None,
    cfg: FitConfig,
    *,
    report: Report | None = None,
    checkpoint_dir: Path | str | None = None,
    resume_from: Path | str | None = None,
    device: torch.device | str = "cpu",
    after_eval: AfterEval | None = None,
    extra_eval: ExtraEval | None = None,
) -> dict[str, float]:
    """Train until ``cfg.max_steps`` optimizer steps; returns the last reported metrics.

    ``train_batches(epoch)`` must yield the same batches in the same order for the same epoch (seeded shuffling):
    a resumed run skips the micro-batches its checkpoint already consumed. Several ranks (torch.distributed up):
    each rank's ``train_batches`` and ``val_batches`` are its disjoint part (the same number of training batches
    on every rank); the evaluation's sums are added over the ranks, so every rank reports the whole set's metrics.
    An FSDP model (`raysal.model.shard`): every rank passes a ``checkpoint_dir`` (its shards go there).
    ``after_eval(model, info, protocol, step, autocast)`` runs after each evaluation with the unwrapped model in
    the capture attention implementation (the probe heatmaps): rank 0 alone, unless the model is sharded, when
    every rank must run its forwards. ``extra_eval(model, protocol, autocast)`` → more validation metrics
    (un-namespaced, reported as ``val/<name>``), on every rank after each evaluation. Raises `DivergedError`
    (non-finite loss, or a model that stopped learning: `raysal.loop.divergence`).
    """
    device = torch.device(device)
    core = unwrap(model)  # DDP (Ray Train, several workers) hides the HF/peft model behind .module
    sharded = is_sharded(core)  # FSDP: forwards are collectives, checkpoints are written by every rank
    info = model_info(core)
    plan = plan_step(criteria, info)  # per-run facts, resolved once
    protocol = CapturePlan(
        resolve_layers(cfg.eval_layers, info.n_layers),
        resolve_heads(cfg.eval_heads, info.n_heads),
        cfg.eval_query_offset,
    )
    train_attn = "eager" if plan.eager else CAPTURE_IMPL
    enable_capture(core)
    for c in criteria:  # modules a criterion trains (maskembed's decoder); the worker attached them before wrapping
        if isinstance(c, AttachesModules):
            c.attach(core)

    optimizer = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.projector_lr, cfg.weight_decay))
    scheduler = make_scheduler(optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    history: list[dict[str, float]] = []  # every reported row, saved with each checkpoint
    if resume_from is not None:
        progress = load_checkpoint(resume_from, core, optimizer, scheduler)
        history = load_history(resume_from)
    else:
        torch.manual_seed(cfg.seed)
        progress = Progress()
    autocast = _autocast(device, cfg.bf16)
    guard = DivergenceGuard(cfg.divergence, int(core.config.text_config.vocab_size))
    guard.first_lm_loss = progress.first_lm_loss
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    sums: dict[str, float] = defaultdict(float)
    n_micro, pending, t_last = 0, 0, time.perf_counter()
    last: dict[str, float] = {}
    last_batch: dict | None = None  # FSDP: what a rank with no validation batch runs while the others evaluate

    def boundary() -> dict[str, float]:
        nonlocal n_micro, t_last
        t_eval = time.perf_counter()
        progress.train_seconds += t_eval - t_last
        metrics = {f"train/{k}": v / max(n_micro, 1) for k, v in sums.items()}
        metrics.update(
            {"train/step": float(progress.step), "train/epoch": float(progress.epoch),
             "train/lr": optimizer.param_groups[0]["lr"],
             "train/sec_per_step": (time.perf_counter() - t_last) / max(n_micro / cfg.grad_accum, 1)}
        )  # fmt: skip
        records = None
        if val_batches is not None:
            core.set_attn_implementation({"text_config": CAPTURE_IMPL})
            records = ItemRecords()
            val = evaluate(core, val_batches(), protocol, device=device, autocast=autocast, theta=cfg.eval_theta,
                           sharded=world_size() > 1, lockstep=sharded, filler=last_batch, records=records)  # fmt: skip
            if extra_eval is not None:
                val.update(extra_eval(core, protocol, autocast, records))
            if after_eval is not None:
                after_eval(core, info, protocol, progress.step, autocast)
            core.set_attn_implementation({"text_config": train_attn})
            metrics.update({f"val/{k}": v for k, v in val.items()})
            guard.after_eval(progress.step, val["lm_loss"])
        progress.eval_seconds += time.perf_counter() - t_eval
        metrics.update({"cost/train_s": progress.train_seconds, "cost/eval_s": progress.eval_seconds})
        path = None
        progress.first_lm_loss = guard.first_lm_loss
        history.append(metrics)
        if ckpt_root is not None:
            path = save_checkpoint(
                ckpt_root / f"step_{progress.step:07d}", core, optimizer, scheduler, progress, history,
                connector=cfg.connector_stage, records=records,
            )  # fmt: skip
            _prune(ckpt_root, cfg.keep_checkpoints)
        if report is not None:
            report(metrics, path)
        sums.clear()
        n_micro, t_last = 0, time.perf_counter()
        return metrics

    model.train()
    core.set_attn_implementation({"text_config": train_attn})
    optimizer.zero_grad(set_to_none=True)
    while progress.step < cfg.max_steps:
        seen = 0
        for i, batch in enumerate(train_batches(progress.epoch)):
            seen += 1
            if i < progress.micro:
                continue  # consumed before the checkpoint this run resumed from
            batch = {k: v.to(device) for k, v in batch.items()}
            last_batch = batch if sharded else None
            m = train_step(
                model, batch, criteria, plan, step=progress.step, loss_scale=1 / cfg.grad_accum, autocast=autocast
            )
            fresh = guard.first_lm_loss is None
            guard.after_micro_batch(m)
            if fresh and guard.first_lm_loss is not None and world_size() > 1:
                # the starting LM loss the divergence checks compare with: the same on every rank, or one rank
                # could stop while the others wait for it in a collective
                guard.first_lm_loss = all_reduce_sum([guard.first_lm_loss], device)[0] / world_size()
            for k, v in m.items():
                sums[k] += v
            n_micro += 1
            pending += 1
            progress.micro = i + 1
            if pending < cfg.grad_accum:
                continue
            total = torch.nn.utils.clip_grad_norm_(  # max_norm inf: only measures (the divergence guard reads it)
                [p for g in optimizer.param_groups for p in g["params"]], cfg.max_grad_norm or float("inf")
            )
            norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)  # FSDP: a DTensor
            sums["grad_norm"] += norm * cfg.grad_accum  # averaged per micro-batch in `boundary`
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            pending = 0
            progress.step += 1
            guard.after_step(progress.step, norm)
            if progress.step % cfg.eval_every == 0 or progress.step == cfg.max_steps:
                last = boundary()
            if progress.step >= cfg.max_steps:
                break
        else:
            if seen == 0:
                raise RuntimeError(f"train_batches({progress.epoch}) yielded no batch")
            progress.epoch += 1
            progress.micro = 0
    return last


def _prune(root: Path, keep: int | None) -> None:
    if keep is None:
        return
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
