"""Per-item evaluation records (issue 30): every checkpoint keeps what its val/ metrics are computed from, keyed by
image id, and computing the metrics again from the records read back reproduces every reported value exactly."""

from __future__ import annotations

import math

import torch

import raysal.loop.pope_eval as pope_eval
import raysal.loop.readout_eval as readout_eval
from raysal.attention.capture import CAPTURE_IMPL, CapturePlan, enable_capture
from raysal.batch import PixelNorm
from raysal.criteria.lm import LMCriterion
from raysal.data.pope_set import select_pope
from raysal.loop.fit import FitConfig, fit
from raysal.metrics.records import RECORDS_FILE, ItemRecords, grounding_metrics, pope_metrics_of, readout_metrics
from raysal.model.build import apply_lora, load_model, load_processor
from raysal.preprocess.batches import batch_factory, load_encoded
from raysal.probes.probe_set import select_probes
from raysal.probes.readout_items import readout_items


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def test_each_checkpoint_keeps_the_records_its_metrics_are_computed_from(tiny_llava, small_shards, tmp_path):
    proc = load_processor(str(tiny_llava))
    train = load_encoded(small_shards, "train2017", proc, limit=8)
    val = load_encoded(small_shards, "val2017", proc, limit=6)
    pad, px = proc.tokenizer.pad_token_id, PixelNorm.from_processor(proc)
    torch.manual_seed(0)
    model = apply_lora(load_model(str(tiny_llava), dtype="float32"), rank=4, targets="qv")
    reports = []

    def extra(model, protocol, autocast, records):  # the loop hands the hook the evaluation's records
        records.add("readout", [{"image_id": 7, "iou": 0.25}, {"image_id": 7, "iou": 0.75}])
        return readout_metrics(records.readout)

    fit(model, [LMCriterion()], batch_factory(train, 4, pad, px, seed=1),
        lambda: batch_factory(val, 3, pad, px, shuffle=False)(0), FitConfig(max_steps=2, eval_every=1, lr=1e-3),
        report=lambda m, p: reports.append((m, p)), checkpoint_dir=tmp_path, extra_eval=extra)  # fmt: skip
    assert len(reports) == 2
    val_ids = sorted(int(s["image_id"]) for s in val)
    for metrics, path in reports:
        records = ItemRecords.from_json((path / RECORDS_FILE).read_text())
        assert records.images["image_id"] == val_ids  # keyed by the dataset's ids, in order
        assert sum(records.images["lm_n"]) > 0 and sum(records.images["tokens"]) > 0
        again = {**grounding_metrics(records.images), **readout_metrics(records.readout)}
        for name, value in again.items():
            assert same(metrics[f"val/{name}"], value), (name, metrics[f"val/{name}"], value)
    first, second = (ItemRecords.from_json((p / RECORDS_FILE).read_text()) for _, p in reports)
    assert first.images["lm_sum"] != second.images["lm_sum"]  # each checkpoint its own evaluation


def test_pope_and_readout_records_reproduce_their_metrics(tiny_llava, small_shards):
    processor = load_processor(str(tiny_llava))
    model = load_model(str(tiny_llava), dtype="float32", device=torch.device("cpu"))
    pope = select_pope(str(small_shards), "train2017", images=4)
    records = ItemRecords()
    metrics = pope_eval.pope_scores(model, processor, pope, device="cpu", records=records)
    asked = [q for item in pope.images for q in item.questions]
    assert len(records.pope["image_id"]) == len(asked)
    assert sorted(records.pope["image_id"]) == records.pope["image_id"]
    assert {(q.image_id, q.setting, q.label) for q in asked} == set(
        zip(records.pope["image_id"], records.pope["setting"], records.pope["label"], strict=True)
    )
    probes = select_probes(str(small_shards), "train2017", images=3, phrases=10**6)
    enable_capture(model)
    model.set_attn_implementation({"text_config": CAPTURE_IMPL})
    tc = model.config.text_config
    protocol = CapturePlan(tuple(range(tc.num_hidden_layers)), tuple(range(tc.num_attention_heads)), 0)
    metrics.update(readout_eval.readout_scores(model, processor, readout_items(probes, processor), protocol,
                                               device="cpu", records=records))  # fmt: skip
    assert set(records.readout["image_id"]) <= {p.sample.image_id for p in probes} and records.readout["iou"]
    back = ItemRecords.from_json(records.to_json())  # what a checkpoint keeps, read back
    again = {**pope_metrics_of(back.pope), **readout_metrics(back.readout)}
    assert set(again) == set(metrics)
    for name, value in again.items():
        assert same(metrics[name], value), (name, metrics[name], value)


def test_records_refuse_a_file_without_its_columns():
    import pytest

    with pytest.raises(ValueError, match=r"eval_records\.json: table 'pope' lacks the columns"):
        ItemRecords.from_json('{"images": {"image_id": [], "lm_sum": [], "lm_n": [], "tokens": [], "amr": [], '
                              '"ap": [], "nss": [], "pointing": []}, "pope": {}, "readout": {}}')  # fmt: skip
