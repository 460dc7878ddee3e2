"""The confirmation hold-out (issue 30): a band of image ids never trained on and never selected on, and a saved
checkpoint evaluated there with its per-item records."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import ray.train
import torch

from raysal.data.holdout import Holdout, holdout_for, holdout_fraction_of
from raysal.data.pope_set import select_pope
from raysal.data.shards import shard_paths
from raysal.loop.checkpoint import Progress, save_checkpoint
from raysal.metrics.records import ItemRecords, grounding_metrics, pope_metrics_of, readout_metrics
from raysal.orchestration.train.compose import compose_cfg
from raysal.orchestration.train.merged_export import train_image_ids
from raysal.probes.probe_set import select_probes


def _ids(shards: str, split: str) -> list[int]:
    fs, files = shard_paths(shards, split)
    return [
        int(i) for f in files for i in pq.read_table(f, filesystem=fs, columns=["image_id"])["image_id"].to_pylist()
    ]


def test_one_split_is_cut_into_training_selection_and_confirmation(single_split):
    data = {"shards": str(single_split), "train_split": "train2017", "val_split": "train2017", "val_holdout": 0.05,
            "confirm_holdout": 0.05}  # fmt: skip
    ids = _ids(str(single_split), "train2017")
    train, select, confirm = (set(filter(holdout_for(data, p).keeps, ids)) for p in ("train", "select", "confirm"))
    assert train | select | confirm == set(ids) and not (train & select or train & confirm or select & confirm)
    assert 20 < len(select) < 70 and 20 < len(confirm) < 70  # ~5 % of 900 each
    assert all(holdout_fraction_of(i) >= 0.95 for i in confirm)
    assert set(train_image_ids(data)) == train  # what an export lists as trained on
    # the sets a run evaluates on come from the selection band only; the confirmation's from its own
    pope = select_pope(str(single_split), "train2017", holdout=holdout_for(data, "select"), images=1000)
    assert pope.images and {p.questions[0].image_id for p in pope.images} <= select
    probes = select_probes(str(single_split), "train2017", holdout=holdout_for(data, "confirm"), images=1000)
    assert probes and {p.sample.image_id for p in probes} <= confirm
    # without a confirmation band, the old selection semantics; a bare fraction still means "inside the band"
    assert holdout_for({**data, "confirm_holdout": 0.0}, "train") == Holdout(0.05, 0.0, "train")
    assert select == {i for i in ids if Holdout(0.05, 0.05).keeps(i)}


def test_a_validation_split_of_its_own_gives_up_its_top_band_and_training_keeps_everything(small_shards):
    data = {"shards": str(small_shards), "train_split": "train2017", "val_split": "val2017", "val_holdout": 0.0,
            "confirm_holdout": 0.5}  # fmt: skip
    train_ids, val_ids = _ids(str(small_shards), "train2017"), _ids(str(small_shards), "val2017")
    assert all(holdout_for(data, "train").keeps(i) for i in train_ids)
    select = {i for i in val_ids if holdout_for(data, "select").keeps(i)}
    confirm = {i for i in val_ids if holdout_for(data, "confirm").keeps(i)}
    assert select and confirm and select | confirm == set(val_ids) and not select & confirm


def test_a_saved_checkpoint_is_evaluated_on_the_confirmation_images(cache, tmp_path):
    """The demo config (random-init tiny model): a checkpoint with changed LoRA weights, evaluated in-process on
    the confirmation band: its records cover only confirmation images, reproduce its metrics, and differ from
    the untrained model's (the weights were loaded)."""
    from raysal.orchestration.train.assets import ensure_data, ensure_model
    from raysal.orchestration.train.confirm import evaluate_checkpoint
    from raysal.orchestration.train.spec import spec_from_cfg
    from raysal.orchestration.train.worker import trainable_model

    spec = spec_from_cfg(compose_cfg(["experiment=demo", "model=tiny", f"cache_dir={cache}",
                                      f"storage_path={tmp_path}", "name=c", "trainer.readout.images=4"]))  # fmt: skip
    ensure_model(spec.model)
    ensure_data(spec.data)
    model = trainable_model(spec, torch.device("cpu"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))  # LoRA B starts at 0: a trained adapter changes the outputs
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = save_checkpoint(tmp_path / "checkpoint_000001", model, opt, sched, Progress(step=7))
    got = evaluate_checkpoint(spec, ray.train.Checkpoint(str(path)))
    assert got["step"] == 7 and got["checkpoint"] == "checkpoint_000001"
    confirm = holdout_for(spec.data, "confirm")
    records = ItemRecords.from_json(__import__("json").dumps(got["records"]))
    assert records.images["image_id"] and all(confirm.keeps(i) for i in records.images["image_id"])
    assert all(confirm.keeps(i) for i in records.pope["image_id"] + records.readout["image_id"])
    assert got["images"] == len(records.images["image_id"])
    again = {**grounding_metrics(records.images), **pope_metrics_of(records.pope), **readout_metrics(records.readout)}
    for name, value in again.items():
        assert got["metrics"][f"val/{name}"] == pytest.approx(value, rel=0, abs=0, nan_ok=True), name
    with torch.no_grad():  # the untrained adapter scores otherwise: the checkpoint's weights were the ones evaluated
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.zero_()
    path0 = save_checkpoint(tmp_path / "checkpoint_000000", model, opt, sched, Progress(step=0))
    base = evaluate_checkpoint(spec, ray.train.Checkpoint(str(path0)))
    assert base["metrics"]["val/lm_loss"] != got["metrics"]["val/lm_loss"]


def test_a_checkpoint_is_confirmed_once_and_again_only_when_it_changes(tmp_path, storage_root):
    """What a resumed search does at its end: the same checkpoint's confirmation is read back from the run folder
    (local, file:// or S3), not evaluated again; another checkpoint is evaluated; confirm_holdout 0 is off."""
    from types import SimpleNamespace

    from raysal import storage
    from raysal.orchestration.train.confirm import CONFIRM_FILE, confirm

    calls = []

    def run(spec, ckpt, asked):
        calls.append(ckpt.path)
        return {"checkpoint": storage.name(ckpt.path), "step": 3, "images": 2, "metrics": {"val/amr": 1.5},
                "records": {}}  # fmt: skip

    spec = SimpleNamespace(data={"confirm_holdout": 0.5}, run_dir=storage.join(storage_root, "trial"))
    first = SimpleNamespace(path="bucket/trial/checkpoint_000004")
    assert confirm(spec, first, run=run)["metrics"] == {"val/amr": 1.5}
    assert confirm(spec, first, run=run)["checkpoint"] == "checkpoint_000004" and len(calls) == 1
    assert storage.read_json(storage.join(spec.run_dir, CONFIRM_FILE))["step"] == 3
    confirm(spec, SimpleNamespace(path="bucket/trial/checkpoint_000006"), run=run)
    assert len(calls) == 2
    spec.data["confirm_holdout"] = 0.0
    assert confirm(spec, first, run=run) is None and len(calls) == 2
