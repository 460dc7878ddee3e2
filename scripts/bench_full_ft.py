"""Full finetuning sharded with FSDP2 (`raysal.model.shard`): one step's memory and time per rank, against the
memory model's full-finetuning prediction (`scripts/memory_model.py` `predict_full`).

    python scripts/bench_full_ft.py --preset cpu-small --world 2 --json docs/bench_full_ft_cpu.json   # CPU, gloo
    python scripts/bench_full_ft.py --preset llava-1.5-7b --layers 8 --device cuda --json out.json      # one GPU

The CPU runs spawn ``--world`` gloo ranks on this machine; a GPU run uses the GPUs torchrun gives it (world 1
on a single lent GPU: sharding over one rank still gathers, reduces and steps as N ranks do, on 1/N of the work).
``--layers`` cuts a 7B preset's decoder depth so that full finetuning fits one GPU; the shapes per layer stay
the 7B ones. Memory is measured over what is live before the step (weights and AdamW moments, the "resident"
part of the model): CUDA's ``max_memory_allocated`` on a GPU, the profiler's live-tensor peak on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_attention import PRESETS, build, make_batch, methods
from memory_model import Shapes, predict_full
from peak_memory import tensor_peak

from raysal.attention.capture import enable_capture
from raysal.loop.step import plan_step, train_step
from raysal.model.build import model_info, param_groups, prepare_full_finetune
from raysal.model.shard import shard_model


def run_rank(rank: int, world: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo" if device.type == "cpu" else "nccl", rank=rank, world_size=world)
    try:
        result = measure(world, args, device)
        if rank == 0:
            print(json.dumps(result))
            if args.json:
                args.json.write_text(json.dumps(result, indent=2))
        dist.barrier()  # no rank tears the group down while another still works
    finally:
        dist.destroy_process_group()


def measure(world: int, args: argparse.Namespace, device: torch.device) -> dict:
    preset = PRESETS[args.preset]
    if args.layers:
        preset = replace(preset, text={**preset.text, "num_hidden_layers": args.layers})
    if args.batch:
        preset = replace(preset, batch=args.batch)
    mixed = device.type == "cuda"
    torch.manual_seed(0)
    model = build(preset, device, torch.float32)  # fp32 master weights; bf16 compute through FSDP on a GPU
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = shard_model(prepare_full_finetune(model), device=device, mixed_precision=mixed)
    enable_capture(model)
    criteria = methods(preset.text["num_hidden_layers"])[args.method]
    plan = plan_step(criteria, model_info(model))
    batch, n_image = make_batch(preset, device, torch.float32)
    opt = torch.optim.AdamW(param_groups(model, 1e-5), lr=1e-5)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if mixed else None
    model.train()

    losses: dict[str, float] = {}

    def step() -> None:
        losses.update(train_step(model, batch, criteria, plan, step=0, autocast=autocast))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # the AdamW moments exist from here on: part of the resident state
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        measured, resident = torch.cuda.max_memory_allocated() - before, before
    else:
        resident = sum(t.numel() * t.element_size() for t in _live(model, opt))
        measured = tensor_peak(step)
    t = preset.text
    vision = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n) * world  # sharded: ×N
    projector = sum(p.numel() for n, p in model.named_parameters() if "multi_modal_projector" in n) * world
    shapes = Shapes(preset.batch, batch["input_ids"].shape[1], n_image, int(batch["grounded_pos"].shape[1]),
                    t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["num_attention_heads"],
                    t["num_key_value_heads"], t["vocab_size"], dtype_bytes=2 if mixed else 4)  # fmt: skip
    pred = predict_full(shapes, world, args.method, vision=vision, projector=projector, mixed=mixed)
    return {
        "preset": args.preset, "layers": t["num_hidden_layers"], "batch_per_rank": preset.batch, "world": world,
        "method": args.method, "device": torch.cuda.get_device_name() if mixed else "cpu",
        "date": date.today().isoformat(),
        "median_s": statistics.median(times), "reps": args.reps, "tokens_per_rank": int(batch["input_ids"].numel()),
        "tokens_per_s_per_rank": int(batch["input_ids"].numel()) / statistics.median(times),
        "step_bytes": measured, "resident_bytes": resident, "predicted": pred, "losses": losses,
        "step_error": pred["step"] / measured - 1, "resident_error": pred["resident"] / resident - 1,
    }  # fmt: skip


def _live(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """This rank's resident tensors: its parameter shards and AdamW moments (local shards of DTensors)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                local.append(v.to_local() if hasattr(v, "to_local") else v)
    return local


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    ap.add_argument("--method", default="capture_kl_2layers", choices=["plain_sdpa", "capture_kl_2layers"])
    ap.add_argument("--world", type=int, default=None, help="ranks (CPU: spawned here; GPU: all visible GPUs)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (a 7B preset cut to fit)")
    ap.add_argument("--batch", type=int, default=None, help="samples per rank (default: the preset's)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    world = args.world or (torch.cuda.device_count() if args.device == "cuda" else 2)
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if world == 1:
        run_rank(0, 1, args, port)
    else:
        mp.spawn(run_rank, args=(world, args, port), nprocs=world, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
