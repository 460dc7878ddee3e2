"""What each rank of the 2-process tests in `test_distributed.py` runs (gloo on CPU, ``mp.spawn``): top-level
functions, so that spawned processes can import them. Rank 0 writes what the test compares to ``out``."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from raysal.attention.capture import CAPTURE_IMPL, CapturePlan, enable_capture
from raysal.attention.selection import resolve_heads, resolve_layers
from raysal.batch import PixelNorm
from raysal.criteria.kl import KLCriterion
from raysal.criteria.lm import LMCriterion
from raysal.loop.evaluate import evaluate
from raysal.loop.fit import FitConfig, fit
from raysal.loop.step import NonFiniteLossError
from raysal.model.build import load_model, load_processor, model_info, prepare_full_finetune
from raysal.model.shard import shard_model
from raysal.preprocess.batches import batch_factory, load_encoded

CRITERIA = [LMCriterion(), KLCriterion(weight=0.5, layers="late")]
FIT = {"max_steps": 6, "lr": 3e-3, "eval_every": 3, "grad_accum": 2, "seed": 3, "warmup_steps": 1}


def spawn(fn: Any, world: int, *args: Any) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` processes joined by a gloo process group.

    The rendezvous is a file (no TCP port picked here and bound later by a child, which another process may take in
    between). Each rank's stderr goes to its own log with `faulthandler` on, so a rank that dies by a signal (a C++
    abort in a collective) leaves the Python stacks of its threads; the error raised here carries every rank's log.
    A rank killed by a signal *after* it finished ``fn`` and the last barrier (a crash in the process group's
    teardown, not in what the test checks) is reported as a warning with its log, its results kept."""
    import tempfile
    import warnings

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="raysal-spawn-") as tmp:
        try:
            mp.spawn(_entry, args=(world, tmp, fn, args), nprocs=world, join=True)
        except mp.ProcessExitedException as e:
            logs = _logs(Path(tmp), world)
            if e.signal_name and all(Path(tmp, f"done{r}").exists() for r in range(world)):
                warnings.warn(f"a rank died by {e.signal_name} after every rank finished its work:\n{logs}",
                              stacklevel=2)  # fmt: skip
                return
            raise RuntimeError(f"{fn.__name__}: rank {e.error_index} {e}; what each rank printed:\n{logs}") from e
        except mp.ProcessRaisedException as e:
            raise RuntimeError(f"{fn.__name__}: {e}\nwhat each rank printed:\n{_logs(Path(tmp), world)}") from e


def _logs(tmp: Path, world: int, tail: int = 6000) -> str:
    parts = []
    for rank in range(world):
        log = tmp / f"rank{rank}.log"
        text = log.read_text(errors="replace") if log.exists() else "(no log)"
        parts.append(f"--- rank {rank} (last {tail} characters) ---\n{text[-tail:]}")
    return "\n".join(parts)


def _entry(rank: int, world: int, tmp: str, fn: Any, args: tuple) -> None:
    import faulthandler

    log = open(Path(tmp, f"rank{rank}.log"), "w", buffering=1)  # noqa: SIM115 (open for the process's life)
    os.dup2(log.fileno(), 2)  # C++ messages (gloo, "terminate called ...") too
    sys.stderr = log
    faulthandler.enable(log, all_threads=True)
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    # a collective that waits for a rank that stopped fails after 2 minutes instead of hanging the test run
    store = f"file://{Path(tmp, 'rendezvous')}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world, timeout=timedelta(minutes=2))
    try:
        fn(rank, world, *args)
        dist.barrier()  # no rank tears the group down while another still writes or waits in a collective
        Path(tmp, f"done{rank}").touch()
    finally:
        dist.destroy_process_group()
    # Done: leave without the interpreter's teardown, where a C++ thread still joinable when its static owner is
    # destroyed aborts the process ("terminate called without an active exception", seen 1 in ~30 runs on CPU)
    sys.stdout.flush()
    log.flush()
    os._exit(0)


def full_model(tiny: str, fsdp: bool) -> torch.nn.Module:
    model = prepare_full_finetune(load_model(tiny, dtype="float32", gradient_checkpointing=True))
    if fsdp:
        return shard_model(model, device=torch.device("cpu"), mixed_precision=False)
    return torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)


def data(tiny: str, shards: str, rank: int, world: int, *, train: int, val: int, batch: int, one_rank: bool = False):
    """This rank's training and validation parts (``one_rank``: rank 0 holds all the validation set)."""
    proc = load_processor(tiny)
    pad, px = proc.tokenizer.pad_token_id, PixelNorm.from_processor(proc)
    tr = load_encoded(shards, "train2017", proc, limit=train)[rank::world]
    va = load_encoded(shards, "val2017", proc, limit=val)
    va = (va if rank == 0 else []) if one_rank else va[rank::world]
    return batch_factory(tr, batch, pad, px, seed=1), lambda: batch_factory(va, batch, pad, px, shuffle=False)(0)


def eval_model(tiny: str, fsdp: bool) -> tuple[torch.nn.Module, CapturePlan]:
    """The tiny model as an evaluation sees it (the capture implementation; FSDP-sharded for ``fsdp``) and the
    all-layers × all-heads protocol."""
    model = load_model(tiny, dtype="float32")
    if fsdp:
        model = shard_model(prepare_full_finetune(model), device=torch.device("cpu"), mixed_precision=False)
    enable_capture(model)
    model.set_attn_implementation({"text_config": CAPTURE_IMPL})
    info = model_info(model)
    return model, CapturePlan(resolve_layers("all", info.n_layers), resolve_heads("all", info.n_heads), 0)


def evaluate_parts(rank: int, world: int, tiny: str, shards: str, out: str, fsdp: bool, one_rank: bool) -> None:
    """This rank's part of 7 validation samples (batches of 3: 2 batches on rank 0, 1 on rank 1; ``one_rank``:
    all 3 on rank 0, none on rank 1, which runs a training batch in step), summed."""
    train, val = data(tiny, shards, rank, world, train=4, val=7, batch=3, one_rank=one_rank)
    model, protocol = eval_model(tiny, fsdp)
    got = evaluate(model, val(), protocol, sharded=True, lockstep=fsdp, filler=next(train(0)) if one_rank else None)
    if rank == 0:
        Path(out).write_text(json.dumps(got))


def extras_parts(rank: int, world: int, tiny: str, shards: str, out: str, fsdp: bool) -> None:
    """POPE and the readout over the train split's images (more of them with 3 things), each rank its part (5 POPE
    images, 3 readout images: the ranks hold unequal parts), the sums added; rank 0 writes what it got."""
    from raysal.data.pope_set import select_pope
    from raysal.loop.pope_eval import pope_scores
    from raysal.loop.readout_eval import readout_scores
    from raysal.probes.probe_set import select_probes
    from raysal.probes.readout_items import readout_items

    proc = load_processor(tiny)
    model, protocol = eval_model(tiny, fsdp)
    pope = select_pope(shards, "train2017", images=5)
    items = readout_items(select_probes(shards, "train2017", images=3, phrases=10**6), proc)
    got = {**pope_scores(model, proc, pope, device="cpu", sharded=True, lockstep=fsdp),
           **readout_scores(model, proc, items, protocol, device="cpu", sharded=True, lockstep=fsdp)}  # fmt: skip
    if rank == 0:
        Path(out).write_text(json.dumps(got))


def finetune(rank: int, world: int, tiny: str, shards: str, out: str) -> None:
    """Full finetuning with DDP, with FSDP (checkpoints every 3 steps), and FSDP resumed from its step-3
    checkpoint in a fresh model, each rank from its part fetched (``fetched{rank}.json``: what it fetched): the
    reports of each, and the final weights gathered on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    root = Path(out)
    train, val = data(tiny, shards, rank, world, train=16, val=6, batch=2)

    def run(name: str, fsdp: bool, **kw: Any) -> None:
        torch.manual_seed(0)
        model = full_model(tiny, fsdp)
        reports: list[dict] = []
        ckpt = root / name if fsdp or rank == 0 else None
        fit(model, CRITERIA, train, val, FitConfig(**FIT), report=lambda m, p: reports.append(m),
            checkpoint_dir=ckpt, **kw)  # fmt: skip
        core = getattr(model, "module", model)
        full = get_model_state_dict(core, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            (root / f"{name}.json").write_text(json.dumps(reports))
            torch.save({k: v for k, v in full.items()}, root / f"{name}.pt")

    run("ddp", fsdp=False)
    run("fsdp", fsdp=True)
    dist.barrier()
    # each rank resumes from what it fetched alone (state.pt, its shard; history on rank 0), as `worker.py` does
    from raysal.orchestration.train.checkpoint_fetch import fetch_for_resume

    got = fetch_for_resume(str(root / "fsdp" / "step_0000003"), root / f"fetched{rank}", rank=rank, world_size=world)
    (root / f"fetched{rank}.json").write_text(json.dumps(got.files))
    run("resumed", fsdp=True, resume_from=got.local)


@dataclass
class RankOneInf:
    """A criterion that is infinite on rank 1 only (a bad batch on one worker)."""

    weight: float = 1.0
    name: str = "rank1_inf"
    needs: ClassVar[frozenset[str]] = frozenset({"logits"})
    replaces_lm: ClassVar[bool] = False

    def __call__(self, x: Any) -> torch.Tensor:
        zero = x.logits.float().mean() * 0
        return zero + float("inf") if dist.get_rank() == 1 else zero


def one_rank_diverges(rank: int, world: int, tiny: str, shards: str, out: str) -> None:
    """FSDP full finetuning where rank 1's loss is not finite: every rank must stop (none left in a collective)."""
    train, val = data(tiny, shards, rank, world, train=8, val=4, batch=2)
    model = full_model(tiny, fsdp=True)
    try:
        fit(model, [LMCriterion(), RankOneInf()], train, val, FitConfig(max_steps=2, eval_every=1))
        reason = "no error"
    except NonFiniteLossError as e:
        reason = str(e)
    Path(out, f"rank{rank}.txt").write_text(reason)
