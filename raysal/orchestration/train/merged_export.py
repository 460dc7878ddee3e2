"""A run's or a search's best checkpoint as a plain ``from_pretrained`` folder, for evaluation harnesses that load
transformers models and nothing else (lmms-eval's ``llava_hf``): `python -m raysal.export`.

LoRA: the base model (``model.name_or_path``, with ``model.connector_init`` when the run had one) plus the
checkpoint's peft adapter (and the projector it trained), merged with peft's ``merge_and_unload`` in float32 — the
merged linears are ``W + B·A·(alpha/r)``, the same function as base + adapter. Full finetuning: the checkpoint's
``model/`` as it is. The processor (tokenizer, image processor, chat template) is saved beside it. Refused with
the reason where a merged folder would not be the model that was trained: an ALIGN connector is raysal's own module,
no transformers class loads it.

Beside the weights: ``raysal_export.json`` (which run, checkpoint and metrics) and ``train_image_ids.txt``, every
image id of the training data the run drew from (the training split less its hold-out), one per line, sorted: POPE's
COCO val2014 images are largely inside COCO train2017, on which COCONut is built, so an overlap with a benchmark's
image list is one ``comm -12`` away.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import ray.train
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText

from raysal import storage
from raysal.data.holdout import holdout_for
from raysal.data.shards import shard_paths
from raysal.loop.checkpoint import ADAPTER, MODEL
from raysal.model.build import QWEN, load_model, load_processor, pixel_limits
from raysal.model.chat_template import accept_string_content
from raysal.orchestration.train.checkpoint_fetch import fetch_folder, folders

log = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"  # <run folder>/run_config.json: the run's resolved config, written by rank 0
EXPORT_INFO = "raysal_export.json"
TRAIN_IDS = "train_image_ids.txt"


class ExportError(RuntimeError):
    """What cannot be exported, and why (one line for the user)."""


@dataclass(frozen=True)
class Exported:
    name: str  # best | control | the run's name
    trial_id: str | None
    folder: str  # where it was written
    lmms_eval: str  # lmms-eval's --model and --model_args for it


# lmms-eval's model class for each family; device_map must be given (its default, "", transformers 5 refuses)
LMMS_EVAL = {"llava": "llava_hf", "llava_next": "llava_hf", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl"}


def lmms_eval_args(model_type: str, folder: str, processor: Any) -> str:
    """``--model … --model_args …`` that evaluate ``folder`` as raysal trained it. Qwen: the pixel limits the run
    resized with, which lmms-eval's Qwen classes would otherwise replace by their own (200,704 and 1,605,632
    pixels: another image grid than the one trained on); they take no dtype (bfloat16 is fixed)."""
    if model_type not in QWEN:
        return f"--model {LMMS_EVAL[model_type]} --model_args pretrained={folder},dtype=bfloat16,device_map=cuda:0"
    size = processor.image_processor.size  # {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return (f"--model {LMMS_EVAL[model_type]} --model_args pretrained={folder},device_map=cuda:0,"
            f"min_pixels={size['shortest_edge']},max_pixels={size['longest_edge']}")  # fmt: skip


def run_config(run_dir: str) -> dict[str, Any]:
    path = storage.join(run_dir, RUN_CONFIG)
    if not storage.is_file(path):
        raise ExportError(f"{run_dir}: no {RUN_CONFIG} (a run made before raysal recorded its config: re-run it)")
    return storage.read_json(path)


def best_checkpoint(run_dir: str, metric: str, mode: str) -> tuple[Any, dict[str, float]]:
    """The run's best checkpoint by ``metric`` (what Ray kept), and the metrics it was reported with."""
    result = ray.train.Result.from_path(run_dir)
    ckpt = result.get_best_checkpoint(metric, mode) if result.best_checkpoints else None
    if ckpt is None:
        raise ExportError(f"{run_dir}: no checkpoint reported {metric}")
    metrics = next(m for c, m in result.best_checkpoints if c.path == ckpt.path)
    return ckpt, metrics


def judged_checkpoint(run_dir: str) -> tuple[Any, dict[str, float]]:
    """A search trial's judged checkpoint — its last, at the full budget: the one its verdict compared and
    confirmed — and the metrics it was reported with."""
    result = ray.train.Result.from_path(run_dir)
    if result.checkpoint is None:
        raise ExportError(f"{run_dir}: no checkpoint")
    metrics = next((m for c, m in result.best_checkpoints if c.path == result.checkpoint.path), result.metrics)
    return result.checkpoint, metrics or {}


def train_image_ids(data: dict[str, Any]) -> list[int]:
    """Every image id the run's training data holds: the training split, less the selection and confirmation
    hold-outs when it validates on the same split."""
    keep = holdout_for(data, "train")
    fs, files = shard_paths(data["shards"], data["train_split"])
    ids: set[int] = set()
    for f in files:
        for i in pq.read_table(f, filesystem=fs, columns=["image_id"]).column("image_id").to_pylist():
            if keep.keeps(i):
                ids.add(int(i))
    return sorted(ids)


def _label(checkpoint: Any) -> str:
    """A ``ray.train.Checkpoint``'s path, or the storage location it was given as."""
    return str(getattr(checkpoint, "path", checkpoint))


def merged_model(config: dict[str, Any], checkpoint: Any, work: Path) -> Any:
    """The checkpoint's model as one transformers model (float32): base + adapter merged, or the saved model."""
    m = config["model"]
    if m.get("connector", "mlp") != "mlp":
        raise ExportError(
            f"model.connector={m['connector']}: the ALIGN connector is raysal's own module, which no transformers "
            "class loads: a merged folder would not be the trained model (evaluate it with raysal's loader)"
        )
    have = folders(checkpoint)
    if MODEL in have:  # full finetuning: the model itself
        local = fetch_folder(checkpoint, MODEL, work / MODEL).local
        return AutoModelForImageTextToText.from_pretrained(local, dtype=torch.float32)
    if ADAPTER not in have:
        raise ExportError(f"{_label(checkpoint)}: no {ADAPTER}/ or {MODEL}/ in it (a connector-only stage?)")
    adapter = fetch_folder(checkpoint, ADAPTER, work / ADAPTER).local
    base = load_model(m["name_or_path"], dtype="float32", device="cpu", connector="mlp",
                      connector_init=m.get("connector_init"))  # fmt: skip
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()


def export_one(
    run_dir: str, checkpoint: Any, metrics: dict[str, float], out: str, *, trial_id: str | None
) -> tuple[str, str]:
    """Write one merged folder to ``out`` (a local path or a URI) → ``out`` and lmms-eval's arguments for it."""
    config = run_config(run_dir)
    with tempfile.TemporaryDirectory(prefix="raysal-export-") as tmp:
        work = Path(tmp)
        model = merged_model(config, checkpoint, work)
        folder = work / "merged"
        model.save_pretrained(folder)
        processor = load_processor(config["model"]["name_or_path"], **pixel_limits(config["model"]))
        # evaluation harnesses (lmms-eval's llava_hf) render string contents with the tokenizer's template
        processor.chat_template = accept_string_content(processor.chat_template)
        processor.tokenizer.chat_template = accept_string_content(processor.tokenizer.chat_template or
                                                                  processor.chat_template)  # fmt: skip
        processor.save_pretrained(folder)
        (folder / TRAIN_IDS).write_text("".join(f"{i}\n" for i in train_image_ids(config["data"])))
        lmms = lmms_eval_args(model.config.model_type, out, processor)
        info = {"run": run_dir, "trial_id": trial_id, "checkpoint": _label(checkpoint),
                "base": config["model"]["name_or_path"], "metrics": metrics, "lmms_eval": lmms}  # fmt: skip
        (folder / EXPORT_INFO).write_text(json.dumps(info, indent=2, default=str))
        storage.replace_dir(folder, out)
    log.info("exported %s to %s", run_dir, out)
    return out, lmms


def export(source: str, out: str) -> list[Exported]:
    """A search folder (``summary.json`` in it): its best trial and its control, each at its judged checkpoint
    (its last: what the verdict compared and confirmed), as ``out/best`` and ``out/control`` — the control being the
    best's matched control at the search's seed when the finalists' stage ran (the same config without the
    alignment criteria), else the search's LM-only control. A run folder: its best checkpoint by
    ``trainer.objective``, as ``out``."""
    summary_file = storage.join(source, "summary.json")
    if storage.is_file(summary_file):
        summary = storage.read_json(summary_file)
        best, control = (summary.get("best") or {}).get("trial_id"), summary.get("control")
        matched = [a for a in (summary.get("confirmation") or {}).get("arms") or []
                   if a["finalist"] == best and a["role"] == "matched-control"]  # fmt: skip
        if matched:
            control = min(matched, key=lambda a: a["seed"])["run"]
        if best is None:
            raise ExportError(f"{source}: the search has no best trial ({summary.get('warning') or 'none ranked'})")
        trials = storage.join(source, "trials")
        if not storage.is_dir(trials):
            trials = summary.get("trials_dir") or trials
        done = []
        for name, trial in (("best", best), ("control", control)):
            if trial is None:
                log.warning("%s: no LM-only control in this search: only the best is exported", source)
                continue
            run_dir = storage.join(trials, trial)
            ckpt, metrics = judged_checkpoint(run_dir)
            done.append(Exported(name, trial, *export_one(run_dir, ckpt, metrics, storage.join(out, name),
                                                          trial_id=trial)))  # fmt: skip
        return done
    config = run_config(source)
    objective = config["trainer"]["objective"]
    ckpt, metrics = best_checkpoint(source, objective["metric"], objective["mode"])
    return [Exported(config.get("name") or "run", None, *export_one(source, ckpt, metrics, out, trial_id=None))]
