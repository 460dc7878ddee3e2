"""The Ray Train worker function: builds the model, wraps the core loop's ``report`` around ``ray.train.report``.

Every rank trains on its part of "train" and evaluates its part of "val"; the evaluation adds its sums over the
ranks, so rank 0's metrics (the only ones Tune sees) are the whole set's. Rank 0 logs to W&B and writes the
checkpoints — with FSDP (``scaling.strategy=fsdp``) every rank writes its shards, and Ray merges the ranks'
folders into one checkpoint.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from raysal import storage
from raysal.attention.capture import CapturePlan
from raysal.batch import PixelNorm, to_device
from raysal.criteria.protocol import AttachesModules
from raysal.data.holdout import holdout_for
from raysal.loop.checkpoint import load_history
from raysal.loop.divergence import DivergedError
from raysal.loop.fit import AfterEval, Report, fit
from raysal.model.build import (
    ModelInfo,
    apply_lora,
    load_model,
    load_processor,
    pixel_limits,
    prepare_connector_stage,
    prepare_full_finetune,
)
from raysal.model.shard import shard_model
from raysal.orchestration.train.assets import ensure_data, ensure_model
from raysal.orchestration.train.checkpoint_fetch import fetch_for_resume
from raysal.orchestration.train.data import iter_collated
from raysal.orchestration.train.fail_reason import write_reason
from raysal.orchestration.train.heartbeat import start_heartbeat
from raysal.orchestration.train.merged_export import RUN_CONFIG
from raysal.orchestration.train.placement_groups import record_placement_group
from raysal.orchestration.train.probe_files import wandb_media, write_probe_set, write_step
from raysal.orchestration.train.spec import RunSpec
from raysal.orchestration.train.val_extras import val_extras
from raysal.orchestration.train.wandb_run import STEP, init_wandb, mirror_wandb, relog, run_id
from raysal.probes.phrase_maps import phrase_maps
from raysal.probes.probe_set import select_probes
from raysal.search.cost import EVAL_S, TRAIN_S, hours

log = logging.getLogger(__name__)

FAIL_REASON = "fail_reason"  # key of the last result of a run that stopped itself (diverged)
Batches = Iterator[dict]  # device batches (`raysal.batch`)


def wandb_dir(spec: RunSpec) -> Path:
    """Where rank 0's W&B writes: ``wandb.dir``, else the run folder when it is on a local filesystem, else this
    node's cache (W&B needs a local disk; `mirror_wandb` copies the run to the run folder on storage)."""
    if spec.wandb.get("dir"):
        return Path(spec.wandb["dir"])
    local = storage.local_path(spec.run_dir)
    if local is not None:
        return local
    return Path(spec.config["cache_dir"]).expanduser() / "wandb" / spec.name


def probe_hook(
    spec: RunSpec, processor: Any, padding: str, device: torch.device, run: Any, *, write: bool = True
) -> AfterEval | None:
    """Rank 0's heatmaps of the probe set after every evaluation (`raysal.probes`), written to the run folder and,
    for a single run, logged to its W&B run (a search's driver logs a trial's from the run folder). ``write``
    False: the other ranks of an FSDP model, whose forwards must accompany rank 0's (collectives); they compute the
    same probes and write nothing."""
    n, d = spec.config["trainer"]["probes"], spec.data
    if not n["images"]:
        return None
    probes = select_probes(d["shards"], d["val_split"], holdout=holdout_for(d, "select"), images=n["images"],
                           phrases=n["phrases"])  # fmt: skip
    if not probes:
        log.warning("no validation image has a grounded phrase: the run shows no probe heatmaps")
        return None
    if write:
        write_probe_set(spec.run_dir, probes)

    def after_eval(
        model: torch.nn.Module, info: ModelInfo, protocol: CapturePlan, step: int, autocast: AbstractContextManager
    ) -> None:
        maps = phrase_maps(model, processor, probes, protocol, prompt=d["prompt"], padding_side=padding,
                           device=device, autocast=autocast, theta=spec.fit.eval_theta)  # fmt: skip
        if not write:
            return
        rows, pictures = write_step(spec.run_dir, step, maps)
        if run is not None:
            run.log(wandb_media(rows, pictures), step=step)

    return after_eval


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's worker function: one rank of the run ``config["spec"]`` (a `RunSpec`), from its set-up to its
    last report; then ``config["after_fit"]`` (spec, model, processor, device), if any, on rank 0 of a run that
    reached its budget (not sharded: a model FSDP splits is evaluated by the caller)."""
    spec: RunSpec = config["spec"]
    after_fit = config.get("after_fit")
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    # first: the search's watchdog sees a worker group set up, not one waiting for resources
    beating = start_heartbeat(spec.run_dir) if rank == 0 else None
    device = ray.train.torch.get_device()
    torch.manual_seed(spec.seed)
    # first-use assets on this worker's node (the driver's preflight made them on its own): the tiny model before
    # it loads, the synthetic shards before the probe set reads them
    ensure_model(spec.model)
    ensure_data(spec.data)
    processor = load_processor(spec.model["name_or_path"], **pixel_limits(spec.model))
    fsdp = spec.strategy == "fsdp"
    model = wrapped_model(trainable_model(spec, device), spec, device)
    train_batches, val_batches = batch_sources(spec, processor, device)
    run = open_run_folder(spec) if rank == 0 else None
    padding = spec.model.get("padding_side", "right")
    after_eval = probe_hook(spec, processor, padding, device, run, write=rank == 0) if rank == 0 or fsdp else None
    extra_eval = val_extras(spec, processor, device, sharded=world_size > 1, lockstep=fsdp, write=rank == 0)
    with tempfile.TemporaryDirectory() as local:
        resume_dir = resume_folder(Path(local) / "resume", rank, world_size, run)
        if beating is not None:  # set up (assets, model download, checkpoint fetch): the stall clock runs from here
            beating.training()
        try:
            fit(
                model, spec.criteria, train_batches, val_batches, spec.fit, report=reporter(spec, run),
                checkpoint_dir=Path(local) / "checkpoints" if rank == 0 or fsdp else None, resume_from=resume_dir,
                device=device, after_eval=after_eval, extra_eval=extra_eval,
            )  # fmt: skip
            if after_fit is not None and rank == 0 and not fsdp:
                after_fit(spec, getattr(model, "module", model), processor, device)
        except DivergedError as e:
            report_divergence(spec, e, rank, run)
    if run is not None:
        run.finish()
        save_wandb(spec)


def trainable_model(spec: RunSpec, device: torch.device) -> torch.nn.Module:
    """The base model on ``device`` with what the run trains switched on: the connector alone (a connector-only
    stage), every weight (full finetuning) or LoRA adapters."""
    dtype = spec.model["dtype"]
    if spec.full_finetune and dtype == "auto":
        dtype = "float32"  # full finetuning keeps fp32 master weights; the GPU computes in bf16 (autocast / FSDP)
    model = load_model(
        spec.model["name_or_path"], dtype=dtype, device=device,
        gradient_checkpointing=spec.model["gradient_checkpointing"], connector=spec.model.get("connector", "mlp"),
        connector_init=spec.model.get("connector_init"),
    )  # fmt: skip
    if spec.fit.connector_stage is not None:
        return prepare_connector_stage(model)
    if spec.full_finetune:
        return prepare_full_finetune(
            model, train_projector=spec.lora["train_projector"], train_vision=spec.lora["train_vision"]
        )
    return apply_lora(model, **{k: v for k, v in spec.lora.items() if k != "enabled"})


def wrapped_model(model: torch.nn.Module, spec: RunSpec, device: torch.device) -> torch.nn.Module:
    """``model`` ready for several workers: FSDP shards it (``scaling.strategy=fsdp``), DDP replicates it. The
    modules a criterion trains (maskembed's decoder) are attached first, so that they train, synchronise and
    checkpoint with the rest."""
    for criterion in spec.criteria:
        if isinstance(criterion, AttachesModules):
            criterion.attach(model)
    if spec.strategy == "fsdp":
        if device.type == "cuda":
            torch.cuda.set_device(device)  # the device mesh and NCCL use the current device
        return shard_model(model, device=device, mixed_precision=device.type == "cuda" and spec.fit.bf16)
    return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})


def batch_sources(
    spec: RunSpec, processor: Any, device: torch.device
) -> tuple[Callable[[int], Batches], Callable[[], Batches]]:
    """This rank's parts of "train" and "val" as the loop takes them: ``train_batches(epoch)`` shuffled by a seed of
    the run and the epoch (the order a resumed run skips through), ``val_batches()`` in order."""
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    pad_id = processor.tokenizer.pad_token_id
    padding = spec.model.get("padding_side", "right")
    pixels = PixelNorm.from_processor(processor)

    def train_batches(epoch: int) -> Batches:
        seed = spec.seed * 1000 + epoch
        return iter_collated(train_shard, spec.batch_size, pad_id, padding, device=device, pixels=pixels,
                             shuffle_seed=seed)  # fmt: skip

    host: list[list[dict]] = []  # the validation part collated once, on the host (pixels as uint8)

    def val_batches() -> Batches:
        # the same images at every evaluation: encoded once (Ray Data would run the pipeline again, its encode
        # actor's start-up included, for every evaluation), replayed from host memory — ~0.5 MB an image for
        # LLaVA-1.5, ~2 MB for LLaVA-NeXT's anyres tiles: 250 MB-1 GB for 500 validation images
        if not host:
            host.append(list(iter_collated(val_shard, spec.batch_size, pad_id, padding, device=torch.device("cpu"),
                                           pixels=None)))  # fmt: skip
        return (to_device(b, device, pixels) for b in host[0])

    return train_batches, val_batches


def open_run_folder(spec: RunSpec) -> Any:
    """Rank 0's part of the run folder, written before training: the placement group's id (for the search's
    janitor) and run_config.json (what `python -m raysal.export` rebuilds the base model and the training image
    list from). → the W&B run, or None when W&B is off."""
    record_placement_group(spec.run_dir)
    storage.write_json(storage.join(spec.run_dir, RUN_CONFIG), spec.config)
    return init_wandb(spec.wandb, spec.name, wandb_dir(spec), spec.config)


def save_wandb(spec: RunSpec) -> None:
    """The W&B run's local files, copied to the run folder (a spot node takes its disk with it)."""
    try:
        mirror_wandb(wandb_dir(spec), run_id(spec.name), spec.run_dir)
    except Exception as e:  # storage down for a moment: the next evaluation copies again
        log.warning("could not copy the W&B run to %s: %s", spec.run_dir, e)


def reporter(spec: RunSpec, run: Any) -> Report:
    """The loop's ``report``: the metrics to W&B (rank 0), then ``ray.train.report`` with this rank's checkpoint
    folder; after a checkpoint, the W&B files follow it to the run folder."""

    sc = spec.scaling
    workers, gpus = int(sc["num_workers"]), float(sc["gpus_per_worker"]) if sc.get("use_gpu") else 0.0

    def report(metrics: dict[str, float], path: Path | None) -> None:
        metrics = {**metrics, **hours(metrics[TRAIN_S], metrics[EVAL_S], workers, gpus)}
        if run is not None:
            run.log(metrics, step=int(metrics[STEP]))
        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if path is not None else None
        # collective: every rank calls it at the same boundary. Named by step, the same on every rank: with FSDP
        # each rank reports its shards and Ray merges same-named folders (its default name is a per-rank clock)
        name = f"checkpoint_{int(metrics[STEP]):07d}" if path is not None else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        if run is not None and path is not None:
            save_wandb(spec)

    return report


def resume_folder(local: Path, rank: int, world_size: int, run: Any) -> Path | None:
    """The local folder this rank resumes from, or None for a fresh run: of Ray's latest checkpoint, this rank's
    part only (state.pt, its shards; the history on rank 0), not the whole checkpoint. The history's rows that a
    kill took before W&B wrote them are logged again."""
    restored = ray.train.get_checkpoint()
    if restored is None:
        return None
    fetched = fetch_for_resume(restored, local, rank=rank, world_size=world_size)
    if run is not None:
        relog(run, load_history(fetched.local))
    return fetched.local


def report_divergence(spec: RunSpec, error: DivergedError, rank: int, run: Any) -> None:
    """A diverged run is reported, not raised: Ray Train would retry a raised error from the last checkpoint
    (FailureConfig) and diverge again. The driver reads the reason from the run folder (`fail_reason.py`)."""
    reason = f"diverged: {error}"
    if rank == 0:
        write_reason(spec.run_dir, reason)
    if run is not None:
        run.summary["fail_reason"] = reason
    ray.train.report({FAIL_REASON: reason})  # for Tune's last result and the trial's W&B run
