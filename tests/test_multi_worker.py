"""Two Ray Train workers on a local Ray (gloo, CPU): each training sample once per epoch across the ranks, sharded
evaluation equal to one process's, and the README's FSDP full-finetuning run end to end (checkpoint, resume,
export). Integration: ~2 minutes on 2 CPUs."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from entrypoint_runs import SMALL, run

from raysal.attention.capture import CAPTURE_IMPL, CapturePlan, enable_capture
from raysal.attention.selection import resolve_heads, resolve_layers
from raysal.batch import PixelNorm
from raysal.data.holdout import in_holdout
from raysal.loop.evaluate import evaluate
from raysal.model.build import load_model, load_processor, model_info
from raysal.preprocess.batches import batch_factory, load_encoded
from raysal.preprocess.encode import DEFAULT_PROMPT

METRICS = ("lm_loss", "amr", "ap", "nss", "pointing", "images", "tokens")


def evaluate_whole_set(
    model_dir: Path, processor_dir: Path, shards: Path, batch: int, split: str = "val2017", holdout: float = 0.0
) -> dict[str, float]:
    """One process, every validation sample (a split, or the hold-out of one): what N sharded workers report."""
    proc = load_processor(str(processor_dir))
    samples = load_encoded(shards, split, proc)
    if holdout:
        samples = [s for s in samples if in_holdout(int(s["image_id"]), holdout)]
    batches = batch_factory(samples, batch, proc.tokenizer.pad_token_id, PixelNorm.from_processor(proc),
                            shuffle=False)(0)  # fmt: skip
    model = load_model(str(model_dir), dtype="float32")
    enable_capture(model)
    model.set_attn_implementation({"text_config": CAPTURE_IMPL})
    info = model_info(model)
    protocol = CapturePlan(resolve_layers("all", info.n_layers), resolve_heads("all", info.n_heads), 0)
    return evaluate(model, batches, protocol)


def _worker(config: dict) -> None:
    """Each rank: the image ids of two training epochs and of its validation part, and the sharded evaluation."""
    import ray.train

    from raysal.orchestration.train.data import iter_collated

    rank = ray.train.get_context().get_world_rank()
    proc = load_processor(config["tiny"])
    pad, px, cpu = proc.tokenizer.pad_token_id, PixelNorm.from_processor(proc), torch.device("cpu")
    train, val = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    epochs = []
    for epoch in (0, 1):
        batches = iter_collated(train, 4, pad, "right", device=cpu, pixels=px, shuffle_seed=epoch)
        epochs.append([int(i) for b in batches for i in b["image_id"]])
    model = load_model(config["tiny"], dtype="float32")
    enable_capture(model)
    model.set_attn_implementation({"text_config": CAPTURE_IMPL})
    info = model_info(model)
    protocol = CapturePlan(resolve_layers("all", info.n_layers), resolve_heads("all", info.n_heads), 0)
    val_ids: list[int] = []

    def recorded():
        for b in iter_collated(val, 3, pad, "right", device=cpu, pixels=px):
            val_ids.extend(int(i) for i in b["image_id"])
            yield b

    metrics = evaluate(model, recorded(), protocol, sharded=True)
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"epochs": epochs, "val": val_ids, "m": metrics}))


@pytest.mark.integration
def test_two_workers_split_training_and_evaluation(tiny_llava, small_shards, tmp_path, ray_local):
    import pyarrow.parquet as pq
    import ray.train
    from ray import cloudpickle
    from ray.train.torch import TorchTrainer

    from raysal.data.shards import shard_files
    from raysal.orchestration.train.data import run_datasets
    from raysal.orchestration.train.shipped import ShardedValidation

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    # the data=coconut shape: one split, validation = a hold-out of it (half, so that it spans several blocks)
    data = {"shards": str(small_shards), "train_split": "train2017", "val_split": "train2017", "val_holdout": 0.5,
            "val_max_images": None, "encode_cpus": 0.5, "prompt": DEFAULT_PROMPT}  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    TorchTrainer(
        _worker,
        train_loop_config={"tiny": str(tiny_llava), "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name="split", storage_path=str(tmp_path / "runs")),
        datasets=run_datasets(data, str(tiny_llava)),
        dataset_config=ShardedValidation(),
    ).fit()
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    ids = [r["image_id"] for f in shard_files(small_shards, "train2017") for r in pq.read_table(f).to_pylist()]
    val_ids = sorted(i for i in ids if in_holdout(i, 0.5))
    train_ids = sorted(i for i in ids if not in_holdout(i, 0.5))
    assert len(val_ids) >= 8 and len(train_ids) >= 8
    for epoch in (0, 1):  # every sample once per epoch across the ranks, half on each
        a, b = (r["epochs"][epoch] for r in ranks)
        seen = sorted(a + b)
        assert len(set(seen)) == len(seen) and len(a) == len(b), epoch  # no sample twice; equal steps per rank
        # equal parts leave out at most num_workers - 1 rows of an epoch (DistributedSampler's drop_last)
        assert set(seen) <= set(train_ids) and len(seen) == len(train_ids) - len(train_ids) % 2, epoch
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]  # reshuffled each epoch
    assert sorted(ranks[0]["val"] + ranks[1]["val"]) == val_ids  # the ranks' parts: every image once
    whole = evaluate_whole_set(tiny_llava, tiny_llava, small_shards, batch=4, split="train2017", holdout=0.5)
    for r in ranks:  # every rank reports the whole set's metrics
        for k in METRICS:
            assert r["m"][k] == pytest.approx(whole[k], rel=1e-5, abs=1e-7), k


@pytest.mark.integration
def test_fsdp_full_finetuning_run_resumes_and_exports(tmp_path, cache):
    """The README's command: full finetuning sharded over 2 workers; the same name resumes from the sharded
    checkpoint Ray merged from both ranks; the exported model loads and scores what the run reported."""
    args = [*SMALL, "lora=none", "scaling.strategy=fsdp", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5",
            "data.encode_cpus=0.25", "trainer.eval_every=2", "trainer.probes.images=1", "trainer.probes.phrases=1",
            f"storage_path={tmp_path}", "name=fsdp"]  # fmt: skip
    res = run(["raysal.train", *args, "trainer.max_steps=2"], cache)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = tmp_path / "fsdp"
    (ckpt,) = run_dir.glob("checkpoint_[0-9]*")
    assert sorted(p.name for p in (ckpt / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    res = run(["raysal.train", *args, "trainer.max_steps=4"], cache)
    assert res.returncode == 0, res.stderr[-3000:]
    # each rank fetched its part of the step-2 checkpoint (state.pt, its shard), not all of it (`checkpoint_fetch`)
    fetched = dict(re.findall(r"rank (\d): fetched \d+ files, ([\d.]+) MB for resume", res.stderr))
    whole = sum(p.stat().st_size for p in (run_dir / "checkpoint_0000002").rglob("*") if p.is_file()) / 1e6
    assert sorted(fetched) == ["0", "1"] and all(float(mb) < whole / 2 for mb in fetched.values()), fetched
    history = [json.loads(line) for line in (run_dir / "checkpoint_0000004" / "history.jsonl").read_text().splitlines()]
    assert [h["train/step"] for h in history] == [2.0, 4.0]  # resumed at step 2, not started over
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    assert (run_dir / "probes" / "step_0000004" / "probe0_0.png").exists()  # rank 0 drew it, both ranks ran it
    best = json.loads((run_dir / "best_model" / "best.json").read_text())
    step = int(best["metrics"]["train/step"])
    shards = cache / "synthetic" / "shards-24-0-coded-v0.5"  # data.synthetic.images=24, seed 0, the demo palette
    whole = evaluate_whole_set(run_dir / "best_model", cache / "tiny" / "llava", shards, batch=4)
    reported = next(h for h in history if h["train/step"] == step)
    for k in ("lm_loss", "amr", "ap", "nss", "pointing", "images", "tokens"):
        assert reported[f"val/{k}"] == pytest.approx(whole[k], rel=1e-4, abs=1e-6), k
