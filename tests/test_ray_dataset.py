import subprocess
import sys

import numpy as np
import pytest

from raysal.data.check import scan
from raysal.data.decode import decode_image
from raysal.data.mask import decode_mask_png
from raysal.data.shards import read_manifest, write_shards

CORE = ["raysal.data.check", "raysal.data.shards", "raysal.data.synthetic", "raysal.data.convert", "raysal.data.decode"]


def test_core_data_modules_import_no_ray_hydra_wandb():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in CORE)
        + "print(sorted({'ray','hydra','wandb'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.integration
def test_ray_dataset_decodes_every_valid_sample(tmp_path, broken_root, ray_local):
    from raysal.data.ray_dataset import coconut_dataset

    shards = tmp_path / "shards"
    write_shards(broken_root, shards, rows_per_file=3)
    expected = {}
    scan(broken_root, ["train2017"], on_sample=lambda s: expected.setdefault(s.image_id, s))

    ds = coconut_dataset(shards, "train2017")
    rows = sorted(ds.take_all(), key=lambda r: r["image_id"])
    assert len(rows) == read_manifest(shards)["splits"]["train2017"]["rows"] == len(expected)
    for row in rows:
        s = expected[row["image_id"]]
        assert row["image"].dtype == np.uint8 and row["image"].shape == (s.height, s.width, 3)
        assert np.array_equal(row["image"], decode_image(s.image_bytes))
        assert row["segment_map"].dtype == np.int32
        assert np.array_equal(row["segment_map"], decode_mask_png(s.mask_bytes))
        assert row["caption"] == s.caption
        assert [list(x) for x in row["span_segment_ids"]] == [list(sp.segment_ids) for sp in s.spans]
        assert list(row["span_start"]) == [sp.start for sp in s.spans]
        assert list(row["segment_ids"]) == list(s.segment_ids)

    # ready for model preprocessing: a callable class in map_batches sees the decoded columns
    class CountRegions:
        def __call__(self, batch: dict) -> dict:
            return {"image_id": batch["image_id"], "n": np.array([len(np.unique(m)) for m in batch["segment_map"]])}

    counts = ds.map_batches(CountRegions, batch_size=4, concurrency=1).take_all()
    assert sorted(r["image_id"] for r in counts) == sorted(expected)
    assert all(r["n"] >= 2 for r in counts)

    raw = coconut_dataset(shards, "val2017", decode=False).take(1)[0]
    assert isinstance(raw["image"], bytes) and "segment_map" not in raw


@pytest.mark.integration
@pytest.mark.parametrize("side", ["left", "right"])
def test_ray_batches_equal_the_in_process_batches(side, tiny_next, small_shards, ray_local):
    """The Ray route (encode actors → uint8 columns → `Collate` in iter_torch_batches → `to_device`) gives the
    batches the in-process route gives, key by key (NeXT: ragged patches, image tokens and positions)."""
    import ray.data
    import torch

    from raysal.batch import PixelNorm
    from raysal.data.ray_dataset import coconut_dataset
    from raysal.model.build import load_processor
    from raysal.orchestration.train.data import EncodeBatch, iter_collated
    from raysal.preprocess.batches import batch_factory, load_encoded
    from raysal.preprocess.encode import DEFAULT_PROMPT

    proc = load_processor(str(tiny_next))
    pad, px = proc.tokenizer.pad_token_id, PixelNorm.from_processor(proc)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = coconut_dataset(small_shards, "val2017", decode=False).map_batches(
        EncodeBatch, fn_constructor_kwargs={"processor_path": str(tiny_next), "prompt": DEFAULT_PROMPT},
        batch_size=4, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5,
    )  # fmt: skip
    via_ray = list(iter_collated(ds.iterator(), 3, pad, side, device=torch.device("cpu"), pixels=px))
    in_process = list(batch_factory(load_encoded(small_shards, "val2017", proc), 3, pad, px, shuffle=False,
                                    padding_side=side)(0))  # fmt: skip
    assert len(via_ray) == len(in_process) > 1
    for a, b in zip(via_ray, in_process, strict=True):
        assert sorted(a) == sorted(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_missing_split_is_a_clear_error(tmp_path, clean_root):
    ray_dataset = pytest.importorskip("raysal.data.ray_dataset")
    write_shards(clean_root, tmp_path / "s", splits=["val2017"])
    with pytest.raises(KeyError, match="no split 'train2017'"):
        ray_dataset.coconut_dataset(tmp_path / "s", "train2017")


@pytest.mark.integration
def test_data_demo_runs_end_to_end(tmp_path):
    """The README's first command (until the training entry points land)."""
    cmd = [sys.executable, "-m", "raysal.data.demo", "--out", str(tmp_path), "--images", "12", "--broken", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "10 valid, 2 invalid" in res.stdout and "[4/4] Ray Dataset" in res.stdout
