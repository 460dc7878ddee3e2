"""The few collectives the core loop needs, over torch.distributed's default group (gloo on CPU, NCCL on GPU).

Plain torch: Ray Train (or ``torchrun``, or a test's ``mp.spawn``) sets the process group up; outside one, every
function here is the single-process identity, so the loop has one code path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_sum(values: Sequence[float], device: torch.device | str) -> list[float]:
    """Σ over ranks of each value, in float64 (metric sums stay exact to float64 whatever the order of ranks).
    ``device``: where the collective runs (NCCL needs CUDA tensors)."""
    if world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)  # (n,)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a model whose parameters are DTensors (FSDP2 ``fully_shard``): its forward runs collectives, so
    every rank must run the same number of forwards, and its state must be gathered or saved shard by shard."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
