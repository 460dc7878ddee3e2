"""A `TorchTrainer` for one run, and exporting its best checkpoint's adapter."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray.train
from ray.train.torch import TorchTrainer

from raysal import storage
from raysal.loop.checkpoint import ADAPTER, CONNECTOR, MODEL
from raysal.orchestration.train.checkpoint_fetch import fetch_folder, folders
from raysal.orchestration.train.data import run_datasets
from raysal.orchestration.train.shipped import data_config, spec_config, train_loop
from raysal.orchestration.train.spec import RunSpec


def build_trainer(spec: RunSpec, *, callbacks: Sequence[Any] = (), datasets: dict[str, Any] | None = None,
                  after_fit: Any = None) -> TorchTrainer:  # fmt: skip
    """The run's `TorchTrainer`; ``datasets``: its "train" and "val" already encoded (a search's, encoded once for
    every trial: `raysal.orchestration.tune.shared_data`), else the run's own pipelines (`run_datasets`);
    ``after_fit``: rank 0's last act with the trained model (`spec_config`)."""
    s = spec.scaling
    resources = {"CPU": s["cpus_per_worker"]}
    if s["use_gpu"]:
        resources["GPU"] = s["gpus_per_worker"]
    return TorchTrainer(
        train_loop,  # imports nothing heavy: the run's controller only passes it on
        train_loop_config=spec_config(spec, after_fit),
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
        datasets=datasets or run_datasets(spec.data, spec.model["name_or_path"], model=spec.model),
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
