"""Confirmation: a saved model evaluated on images no choice was made on (the winner's curse made visible).

A search picks its best trial on the selection hold-out, so the best's figures there are biased upward (the
maximum of many noisy estimates; Cawley & Talbot 2010). The confirmation hold-out (``data.confirm_holdout``: the
other end of the image-id hash, never trained on, never selected on; `raysal.data.holdout.Holdout`) is evaluated
once the choice is made: for a search the best trial's best checkpoint and the control's latest, for a single run
its best checkpoint — the same protocol, POPE and read-out as every evaluation, per-item records kept
(`raysal.metrics.records`) so the best and the control compare paired there too.

The evaluation runs as one Ray task with a Train worker's resources (one process: a saved model is evaluated,
not trained), and its result goes to ``<run>/confirmation.json`` through the storage layer: a resumed search or a
repeated call finds it there for the same checkpoint and does not evaluate again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import ray
import torch

from raysal import storage
from raysal.attention.capture import CAPTURE_IMPL, CapturePlan, enable_capture
from raysal.attention.selection import resolve_heads, resolve_layers
from raysal.batch import PixelNorm
from raysal.criteria.protocol import AttachesModules
from raysal.data.decode import decode_row
from raysal.data.holdout import holdout_for
from raysal.data.shards import shard_paths
from raysal.loop.checkpoint import load_weights
from raysal.loop.evaluate import evaluate
from raysal.metrics.records import ItemRecords
from raysal.model.build import load_processor, model_info, pixel_limits
from raysal.orchestration.train.assets import ensure_data, ensure_model
from raysal.orchestration.train.checkpoint_fetch import fetch_for_resume
from raysal.orchestration.train.spec import RunSpec
from raysal.orchestration.train.val_extras import val_extras
from raysal.orchestration.train.worker import trainable_model
from raysal.preprocess.batches import batch_factory, encode_row

log = logging.getLogger(__name__)

CONFIRM_FILE = "confirmation.json"  # <run>/confirmation.json: {checkpoint, step, images, metrics, records}


def confirm_fraction(data: dict[str, Any]) -> float:
    return float(data.get("confirm_holdout") or 0.0)


def confirmation_samples(data: dict[str, Any], processor: Any) -> list[dict]:
    """The confirmation hold-out's samples, encoded, in image-id order, capped at ``data.val_max_images``."""
    keep = holdout_for(data, "confirm")
    fs, files = shard_paths(data["shards"], data["val_split"])  # a local folder or a URI
    rows = [r for f in files for r in pq.read_table(f, filesystem=fs).to_pylist() if keep.keeps(int(r["image_id"]))]
    rows.sort(key=lambda r: int(r["image_id"]))
    cap = data.get("val_max_images")
    return [encode_row(decode_row(r), processor, data["prompt"]) for r in rows[:cap]]


@dataclass(frozen=True)
class Asked:
    """What a confirmation evaluates beside the grounding metrics and the LM loss: the POPE ``settings`` (None: all
    three) and the localisation readout; a search asks what it decides on (its guards)."""

    settings: tuple[str, ...] | None = None
    readout: bool = True


def evaluate_checkpoint(spec: RunSpec, checkpoint: Any, asked: Asked = Asked()) -> dict[str, Any]:
    """On this process (a Ray task): ``checkpoint`` (a ``ray.train.Checkpoint`` of the run ``spec``) loaded into the
    run's model and evaluated on the confirmation hold-out → {checkpoint, step, images, metrics (``val/...``),
    records (JSON), asked, eval_s (the evaluation's wall seconds)}."""
    t0 = time.perf_counter()
    device = torch.device("cuda" if spec.scaling["use_gpu"] and torch.cuda.is_available() else "cpu")
    ensure_model(spec.model)
    ensure_data(spec.data)
    processor = load_processor(spec.model["name_or_path"], **pixel_limits(spec.model))
    model = trainable_model(spec, device)
    for criterion in spec.criteria:  # modules a criterion trained (maskembed's decoder) are part of the weights
        if isinstance(criterion, AttachesModules):
            criterion.attach(model)
    with tempfile.TemporaryDirectory() as tmp:
        fetch_for_resume(checkpoint, Path(tmp), rank=0, world_size=1)
        step = load_weights(tmp, model)
    return evaluate_model(spec, model, processor, device, asked, step=step, checkpoint=storage.name(checkpoint.path),
                          t0=t0)  # fmt: skip


def evaluate_model(spec: RunSpec, model: torch.nn.Module, processor: Any, device: torch.device, asked: Asked, *,
                   step: int, checkpoint: str, t0: float | None = None) -> dict[str, Any]:  # fmt: skip
    """A model of the run ``spec`` (its weights those of ``checkpoint``, the folder's name) on the confirmation
    hold-out: what `evaluate_checkpoint` returns."""
    t0 = time.perf_counter() if t0 is None else t0
    info = model_info(model)
    protocol = CapturePlan(resolve_layers(spec.fit.eval_layers, info.n_layers),
                           resolve_heads(spec.fit.eval_heads, info.n_heads), spec.fit.eval_query_offset)  # fmt: skip
    enable_capture(model)
    model.set_attn_implementation({"text_config": CAPTURE_IMPL})
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and spec.fit.bf16
                else contextlib.nullcontext())  # fmt: skip
    samples = confirmation_samples(spec.data, processor)
    if not samples:
        raise ValueError(f"data.confirm_holdout={confirm_fraction(spec.data):g} holds out no image of split "
                         f"{spec.data['val_split']!r}")  # fmt: skip
    batches = batch_factory(samples, spec.batch_size, processor.tokenizer.pad_token_id,
                            PixelNorm.from_processor(processor), shuffle=False,
                            padding_side=spec.model.get("padding_side", "right"), device=device)  # fmt: skip
    records = ItemRecords()
    metrics = evaluate(model, batches(0), protocol, device=device, autocast=autocast, theta=spec.fit.eval_theta,
                       records=records)  # fmt: skip
    extra = val_extras(spec, processor, device, sharded=False, lockstep=False, write=False, part="confirm",
                       settings=asked.settings, readout=asked.readout)  # fmt: skip
    if extra is not None:
        metrics.update(extra(model, protocol, autocast, records))
    return {"checkpoint": checkpoint, "step": step, "images": len(samples),
            "metrics": {f"val/{k}": v for k, v in metrics.items()}, "records": json.loads(records.to_json()),
            "asked": asdict(asked), "eval_s": time.perf_counter() - t0}  # fmt: skip


@dataclass(frozen=True)
class ConfirmAtEnd:
    """What rank 0 of a run of the finalists' stage does once it trained to its budget: its model, still in memory,
    evaluated on the confirmation hold-out into ``<run>/confirmation.json`` — the run's last checkpoint's
    evaluation, which `confirm_all` then finds instead of loading the model again in a task of its own."""

    asked: Asked

    def __call__(self, spec: RunSpec, model: torch.nn.Module, processor: Any, device: torch.device) -> None:
        if confirm_fraction(spec.data) <= 0:
            return
        name = f"checkpoint_{spec.fit.max_steps:07d}"  # the run's last report's folder (`worker.reporter`)
        path = storage.join(spec.run_dir, CONFIRM_FILE)
        if storage.exists(path):
            kept = storage.read_json(path)
            if kept.get("checkpoint") == name and kept.get("asked") == _plain(self.asked):
                return  # a resumed run that had confirmed before it was cut
        result = evaluate_model(spec, model, processor, device, self.asked, step=spec.fit.max_steps, checkpoint=name)
        storage.write_json(path, result)


def _task(spec: RunSpec) -> Any:
    """`evaluate_checkpoint` as a Ray task with one Train worker's resources (CPUs, and a GPU when it trains on one)."""
    s = spec.scaling
    return ray.remote(num_cpus=s["cpus_per_worker"], num_gpus=s["gpus_per_worker"] if s["use_gpu"] else 0,
                      max_retries=2)(evaluate_checkpoint)  # fmt: skip


def on_ray(spec: RunSpec, checkpoint: Any, asked: Asked = Asked()) -> dict[str, Any]:
    return ray.get(_task(spec).remote(spec, checkpoint, asked))


def _kept(spec: RunSpec, checkpoint: Any, asked: Asked) -> dict[str, Any] | None:
    """The run's confirmation.json when it holds this checkpoint's evaluation of ``asked``."""
    path = storage.join(spec.run_dir, CONFIRM_FILE)
    if not storage.exists(path):
        return None
    kept = storage.read_json(path)
    same = kept.get("checkpoint") == storage.name(checkpoint.path)
    return kept if same and kept.get("asked", _plain(Asked())) == _plain(asked) else None


def _plain(asked: Asked) -> dict[str, Any]:
    """As confirmation.json records it (JSON: a list for the settings tuple)."""
    return json.loads(json.dumps(asdict(asked)))


def confirm(spec: RunSpec, checkpoint: Any, *, run: Callable[..., dict] = on_ray,
            asked: Asked = Asked()) -> dict[str, Any] | None:  # fmt: skip
    """``checkpoint`` of the run ``spec`` on the confirmation hold-out, evaluated once (``<run>/confirmation.json``
    kept and reused for the same checkpoint and ``asked``) → what `evaluate_checkpoint` returns; None when
    ``data.confirm_holdout`` is 0. ``run``: how the evaluation runs (`on_ray`)."""
    if confirm_fraction(spec.data) <= 0:
        return None
    kept = _kept(spec, checkpoint, asked)
    if kept is not None:
        return kept
    result = run(spec, checkpoint, asked)
    storage.write_json(storage.join(spec.run_dir, CONFIRM_FILE), result)
    return result


def confirm_all(jobs: list[tuple[RunSpec, Any]], asked: Asked = Asked()) -> list[dict[str, Any]]:
    """`confirm` for several (run, checkpoint) at once: the evaluations not kept from an earlier call run side by
    side, as many Ray tasks as the cluster holds (the finalists' stage: every seed of a finalist and of its
    matched control) → their results, in order."""
    results: list[dict[str, Any] | None] = [_kept(spec, ckpt, asked) for spec, ckpt in jobs]
    pending = {i: _task(spec).remote(spec, ckpt, asked) for i, (spec, ckpt) in enumerate(jobs) if results[i] is None}
    for i, ref in pending.items():
        results[i] = ray.get(ref)
        storage.write_json(storage.join(jobs[i][0].run_dir, CONFIRM_FILE), results[i])
    return [r for r in results if r is not None]


def records_of(confirmation: dict[str, Any]) -> ItemRecords:
    return ItemRecords.from_json(json.dumps(confirmation["records"]))
