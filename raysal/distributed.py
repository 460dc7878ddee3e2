"""The few collectives the core loop needs, over torch.distributed's default group (gloo on CPU, NCCL on GPU).

Plain torch: Ray Train (or ``torchrun``, or a test's ``mp.spawn``) sets the process group up; outside one, every
function here is the single-process identity, so the loop has one code path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


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


T = TypeVar("T")


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank: the per-item evaluation records, a few KB
    per rank. Outside a process group: ``[obj]``."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def my_part(items: Sequence[T], *, sharded: bool, lockstep: bool) -> Iterator[tuple[T, bool]]:
    """(item, counted) for this rank's part of ``items`` (every ``world``-th, from its rank) when ``sharded``, all of
    them otherwise. ``lockstep`` (an FSDP model: every forward is a collective): as many rounds on every rank, a rank
    with fewer items repeating one, uncounted, so the collectives stay paired."""
    world, me = (world_size(), rank()) if sharded or lockstep else (1, 0)
    part = list(items[me::world])
    rounds = -(-len(items) // world) if lockstep else len(part)
    for i in range(rounds):
        if i < len(part):
            yield part[i], True
        elif items:
            yield (part[-1] if part else items[0]), False


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a model whose parameters are DTensors (FSDP2 ``fully_shard``): its forward runs collectives, so
    every rank must run the same number of forwards, and its state must be gathered or saved shard by shard."""
    return any(isinstance(p, DTensor) for p in model.parameters())
