"""A `TorchTrainer` for one run, and exporting its best checkpoint's adapter."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray.train
from ray.data import ExecutionOptions, ExecutionResources
from ray.train import DataConfig
from ray.train.torch import TorchTrainer

from raysal import storage
from raysal.loop.checkpoint import ADAPTER, CONNECTOR, MODEL
from raysal.orchestration.train.checkpoint_fetch import fetch_folder, folders
from raysal.orchestration.train.data import run_datasets
from raysal.orchestration.train.spec import RunSpec
from raysal.orchestration.train.worker import train_loop_per_worker


class ShardedValidation(DataConfig):
    """Each worker gets its own part of both datasets. "train" is split into equal parts (every rank must run the
    same number of steps: up to ``num_workers - 1`` rows of an epoch are left out, as DistributedSampler's
    drop_last); "val" into parts that together hold every row (``equal=False``): the evaluation adds its sums over
    the ranks (`raysal.loop.evaluate`), so N workers report exactly what one worker would, for 1/N of the work."""

    def __init__(self, execution_options: ExecutionOptions | None = None) -> None:
        super().__init__(datasets_to_split=["train"], execution_options=execution_options)

    def configure(self, datasets: dict[str, Any], world_size: int, worker_handles: Any, worker_node_ids: Any,
                  **kwargs: Any) -> list[dict[str, Any]]:  # fmt: skip
        out = super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
        if "val" in datasets and world_size > 1:
            val = datasets["val"].copy(datasets["val"])
            val.context.execution_options = self._resolve_execution_options("val")  # what the base class sets
            for i, part in enumerate(val.streaming_split(world_size, equal=False)):
                out[i]["val"] = part
        return out


def data_config(scaling: dict[str, Any]) -> ShardedValidation:
    """How the run's datasets reach its workers: split per rank, Ray Data's CPUs capped by ``scaling.data_cpus``
    (so that concurrent trials do not starve each other), in a fixed order."""
    if not scaling.get("data_cpus"):
        return ShardedValidation()  # the DataContext's options (`run_datasets`: preserve_order)
    # options given here replace the DataContext's: preserve_order again, or a resumed run's epoch would come in
    # another order than the one its checkpoint counted micro-batches of
    limits = ExecutionOptions(resource_limits=ExecutionResources(cpu=scaling["data_cpus"]), preserve_order=True)
    return ShardedValidation(execution_options=limits)


def build_trainer(spec: RunSpec, *, callbacks: Sequence[Any] = ()) -> TorchTrainer:
    s = spec.scaling
    resources = {"CPU": s["cpus_per_worker"]}
    if s["use_gpu"]:
        resources["GPU"] = s["gpus_per_worker"]
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        scaling_config=ray.train.ScalingConfig(
            num_workers=s["num_workers"], use_gpu=s["use_gpu"], resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=spec.name,
            storage_path=spec.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=spec.config["trainer"]["keep_checkpoints"],
                checkpoint_score_attribute=spec.objective["metric"],
                checkpoint_score_order=spec.objective["mode"],
            ),
            callbacks=list(callbacks),
            # a lost worker or node: restore the latest checkpoint and go on, no human (a diverged run is reported,
            # not raised, so it is never retried). Ray Train counts a failure of the workers while they train
            # against max_failures; a worker group that cannot start — its placement group not ready within
            # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (nodes still autoscaling, a preempted node coming back), or
            # a worker dying as it starts — against controller_failure_limit, the only controller errors it
            # retries. Retried without limit: waiting for resources is no failure, and a search bounds the wait
            # itself (trainer.wait_timeout_s, `raysal.orchestration.tune.stall`).
            failure_config=ray.train.FailureConfig(
                max_failures=spec.config["trainer"]["max_failures"],
                controller_failure_limit=-1,
            ),
        ),
        datasets=run_datasets(spec.data, spec.model["name_or_path"], model=spec.model),
        dataset_config=data_config(s),
    )


def export_best(checkpoint: ray.train.Checkpoint, parent: str, metrics: dict[str, Any]) -> tuple[str, str]:
    """Copy a checkpoint's loadable result to ``parent`` (local path or URI) with ``best.json`` beside it: LoRA's peft
    adapter as ``best_adapter/``, a fully finetuned model as ``best_model/``, a connector-only stage's connector as
    ``best_connector/`` → (key, path): the key names which."""
    # listed, then only that folder fetched: sharded/ (FSDP: weights + AdamW moments, 84 GB for 7B) is not exported
    have = folders(checkpoint)
    kind = next((k for k in (ADAPTER, MODEL, CONNECTOR) if k in have), None)
    if kind is None:
        raise FileNotFoundError(f"{checkpoint.path}: no {ADAPTER}/, {MODEL}/ or {CONNECTOR}/ in the checkpoint")
    key = f"best_{kind}"
    dest = storage.join(parent, key)
    with tempfile.TemporaryDirectory() as tmp:
        out = fetch_folder(checkpoint, kind, Path(tmp) / "export").local
        (out / "best.json").write_text(json.dumps({"checkpoint": checkpoint.path, "metrics": metrics}, indent=2))
        storage.replace_dir(out, dest)
        # a resumed search whose best changed regime: another kind's export is no longer the best
        for other in {ADAPTER, MODEL, CONNECTOR} - {kind}:
            storage.delete_dir(storage.join(parent, f"best_{other}"))
    return key, dest
