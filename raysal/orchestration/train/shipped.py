"""What a Ray Train run ships through its controller — the worker function, its config, the datasets' split — in a
module that imports nothing heavy.

Ray Train V2 hands them to a controller actor first, which unpickles them only to pass them on; defined beside the
worker (`raysal.orchestration.train.worker`) or the trainer, they made every run's controller import torch,
transformers, peft and raysal's core (~7 CPU-seconds a run, measured: a sixth of a demo trial on two cores), and the
run's `RunSpec` the criteria it holds. Here the controller unpickles this module and bytes; the workers unpickle the
spec and import the core.
"""

from __future__ import annotations

import pickle
from typing import Any

from ray.data import ExecutionOptions, ExecutionResources
from ray.train import DataConfig


def spec_config(spec: Any, after_fit: Any = None) -> dict[str, bytes]:
    """The Train run's ``train_loop_config``: its `RunSpec` and ``after_fit`` (what rank 0 does with the trained
    model before the run ends: `raysal.orchestration.train.confirm.ConfirmAtEnd`), pickled."""
    return {"spec": pickle.dumps((spec, after_fit))}


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's worker function: `raysal.orchestration.train.worker.train_loop_per_worker` on the spec."""
    from raysal.orchestration.train.worker import train_loop_per_worker  # the workers' imports, not the controller's

    spec, after_fit = pickle.loads(config["spec"])
    train_loop_per_worker({"spec": spec, "after_fit": after_fit})


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
