"""A `TorchTrainer` for one run, and exporting its best checkpoint's adapter."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray.train
from ray.data import ExecutionOptions, ExecutionResources
from ray.train import DataConfig
from ray.train.torch import TorchTrainer

from raysal.loop.checkpoint import ADAPTER
from raysal.orchestration.data import run_datasets
from raysal.orchestration.spec import RunSpec
from raysal.orchestration.storage import is_uri
from raysal.orchestration.worker import train_loop_per_worker


def build_trainer(spec: RunSpec, *, callbacks: Sequence[Any] = ()) -> TorchTrainer:
    s = spec.scaling
    resources = {"CPU": s["cpus_per_worker"]}
    if s["use_gpu"]:
        resources["GPU"] = s["gpus_per_worker"]
    data_config = DataConfig(datasets_to_split=["train"])  # every worker evaluates the whole val set
    if s.get("data_cpus"):
        # cap Ray Data's CPUs per run so that concurrent trials do not starve each other
        limits = ExecutionOptions(resource_limits=ExecutionResources(cpu=s["data_cpus"]))
        data_config = DataConfig(datasets_to_split=["train"], execution_options=limits)
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
            # not raised, so it is never retried)
            failure_config=ray.train.FailureConfig(
                max_failures=spec.config["trainer"]["max_failures"],
                controller_failure_limit=spec.config["trainer"]["max_failures"],
            ),
        ),
        datasets=run_datasets(spec.data, spec.model["name_or_path"], num_workers=s["num_workers"]),
        dataset_config=data_config,
    )


def export_adapter(checkpoint: ray.train.Checkpoint, dest: str, metrics: dict[str, Any]) -> str:
    """Copy a checkpoint's peft adapter to ``dest`` (local path or URI) with ``best.json`` beside it."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "ckpt"
        checkpoint.to_directory(str(local))
        out = Path(tmp) / "export"
        shutil.copytree(local / ADAPTER, out)
        (out / "best.json").write_text(json.dumps({"checkpoint": checkpoint.path, "metrics": metrics}, indent=2))
        if is_uri(dest):
            pyarrow.fs.copy_files(str(out), dest)
        else:
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(out, dest)
    return dest
