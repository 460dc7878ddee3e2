"""FSDP2 sharding of a LLaVA / LLaVA-NeXT model across the ranks of the default process group.

One ``fully_shard`` unit per language decoder layer (its parameters are gathered just for its forward and its
backward, and resharded after), and the root: embeddings, norm, lm_head, projector and the vision tower (CLIP-L,
0.3 B parameters: 0.6 GB gathered in bf16). The vision tower is not a unit of its own: transformers collects its
hidden states (LLaVA reads layer −2) with hooks that FSDP's wrapped module class defeats. Parameters, gradients
and AdamW state are split over the ranks: full finetuning of a 7B model (~112 GB of fp32 weights, gradients and
optimiser state) fits 4 × 80 GB.

Works on CPU with gloo (the tests) and on CUDA with NCCL; the attention capture and non-reentrant activation
checkpointing run inside each layer's forward, where its parameters are whole, so they need nothing special.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from raysal.model.build import decoder_layers


def shard_model(model: torch.nn.Module, *, device: torch.device, mixed_precision: bool) -> torch.nn.Module:
    """Shard ``model`` in place over all ranks (the process group must be up); returns it.

    ``mixed_precision`` (CUDA): compute in bf16 on gathered bf16 copies, reduce gradients in fp32, keep the sharded
    fp32 weights as the optimiser's master copy — load the model in float32 for it.
    """
    if not dist.is_initialized():
        raise RuntimeError("shard_model: torch.distributed is not initialised (FSDP needs a process group)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model
