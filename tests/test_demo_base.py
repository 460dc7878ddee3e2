"""The demo's trained base (`raysal.demo.base`), made on first use by `ensure_model` for a
``model.captioned`` config: seeded and deterministic, stamped, made again only when its arguments change, and its
first answer token after the chat template's assistant turn is a yes/no token (POPE reads those logits)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from raysal.demo.base import STAMP, question_samples
from raysal.orchestration.train.assets import ensure_model


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_the_demo_base_is_made_once_deterministically_and_again_when_its_recipe_changes(tmp_path):
    made = {"steps": 2, "lr": 3e-3, "seed": 0}
    a, b = tmp_path / "a", tmp_path / "b"
    ensure_model({"tiny": "llava", "name_or_path": str(a), "captioned": made})
    ensure_model({"tiny": "llava", "name_or_path": str(b), "captioned": made})
    stamp = json.loads((a / STAMP).read_text())
    assert stamp["steps"] == 2 and stamp["data_seed"] == 1000 and stamp["train_samples"] > stamp["images"]
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # the same recipe, the same bytes
    # trained: not the random-init tiny model of the same seed
    from raysal.model.tiny import write_tiny

    tiny = _weights(write_tiny(tmp_path / "tiny", "llava"))  # ensure_model's patch when unsaid: the hub's 14
    assert any(not torch.equal(tiny[k], wa[k]) for k in wa)
    before = (a / "model.safetensors").stat().st_mtime_ns
    ensure_model({"tiny": "llava", "name_or_path": str(a), "captioned": made})  # current: not made again
    assert (a / "model.safetensors").stat().st_mtime_ns == before
    ensure_model({"tiny": "llava", "name_or_path": str(a), "captioned": {**made, "steps": 3}})
    assert json.loads((a / STAMP).read_text())["steps"] == 3
    ensure_model({"tiny": "llava", "name_or_path": str(a), "captioned": {**made, "patch": 48}})  # the demo's grid
    assert json.loads((a / STAMP).read_text())["patch"] == 48
    assert json.loads((a / "processor_config.json").read_text())["patch_size"] == 48  # 49 image tokens
    assert json.loads((a / "config.json").read_text())["vision_config"]["patch_size"] == 48
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_the_question_samples_answer_every_shape_and_train_the_answer_token(tiny_llava, small_shards):
    """One question per (image, shape), answered from the segments; the label's first token is " Yes" / " No", the
    token `raysal.metrics.pope.yes_no_token_ids` reads after the assistant turn."""
    import pyarrow.parquet as pq

    from raysal.data.decode import decode_row
    from raysal.data.shards import shard_paths
    from raysal.data.synthetic import THINGS
    from raysal.metrics.pope import yes_no_token_ids
    from raysal.model.build import load_processor

    proc = load_processor(str(tiny_llava))
    fs, files = shard_paths(str(small_shards), "val2017")
    rows = [decode_row(r) for f in files for r in pq.read_table(f, filesystem=fs).to_pylist()][:3]
    samples = question_samples(rows, proc, seed=0)
    assert len(samples) == len(rows) * len(THINGS)
    yes, no = yes_no_token_ids(proc.tokenizer)
    for i, s in enumerate(samples):
        row = rows[i // len(THINGS)]
        labels = s["labels"][s["labels"] != -100]
        first = int(labels[0])
        assert first in yes + no, proc.tokenizer.convert_ids_to_tokens(labels.tolist())
        ids = s["input_ids"].tolist()
        text = proc.tokenizer.decode(ids)
        name = next(n for c, n in THINGS.items() if f" {n} " in text)
        present = any(THINGS.get(int(c)) == name for c in row["category_ids"])
        assert (first in yes) == present, (text, row["category_ids"])
