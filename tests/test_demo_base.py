"""The demo's trained base (`raysal.demo.base`), made on first use by `ensure_model` for a
``model.captioned`` config: seeded and deterministic, stamped, made again only when its arguments change, and its
first answer token after the chat template's assistant turn is a yes/no token (POPE reads those logits)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from raysal.demo import base as demo_base
from raysal.demo.base import STAMP, question_samples
from raysal.orchestration.train.assets import ensure_model


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_the_demo_base_is_made_once_deterministically_and_again_when_its_recipe_changes(tmp_path):
    made = {"steps": 2, "lr": 3e-3, "seed": 0, "images": 40}
    a, b = tmp_path / "a", tmp_path / "b"
    ensure_model({"tiny": "llava", "name_or_path": str(a), "captioned": made})
    ensure_model({"tiny": "llava", "name_or_path": str(b), "captioned": made})
    stamp = json.loads((a / STAMP).read_text())
    assert stamp["steps"] == 2 and stamp["data_seed"] == 1000 and stamp["train_samples"] > stamp["images"] == 40
    assert stamp["palette"] == "coded" and [h["step"] for h in stamp["history"]] == [1, 2]  # POPE at each eval
    assert 0 <= stamp["history"][-1]["yes_ratio"] <= 1 and stamp["pope_images"] > 0
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


def _shipped_recipe() -> dict:
    from pathlib import Path

    from omegaconf import OmegaConf

    made = OmegaConf.load(Path(__file__).parents[1] / "configs" / "model" / "tiny-captioned.yaml").captioned
    return {k: made[k] for k in ("steps", "lr", "seed", "patch", "images")}


def test_the_demos_base_is_shipped_current_and_copied_not_trained(tmp_path, monkeypatch):
    """`configs/model/tiny-captioned.yaml`'s recipe is shipped (its ~45 min of training done once with the module's
    command): the copy is current for that recipe, its tokenizer and configs are those `write_tiny` writes today
    (so the shipped weights fit this version's tiny model), `ensure_model` copies it without training, and a damaged
    copy (weights that are not the stamp's sha256) is refused by name."""
    import shutil

    from raysal.model.tiny import write_tiny

    recipe = _shipped_recipe()
    src = demo_base.shipped("llava", **recipe)
    assert src is not None, f"no shipped base for {recipe} under {demo_base.SHIPPED}: make it with the command in it"
    stamp = json.loads((src / STAMP).read_text())
    assert stamp["palette"] == demo_base.PALETTE and stamp["format"] == demo_base.FORMAT
    tiny = write_tiny(tmp_path / "tiny", "llava", seed=recipe["seed"], patch_size=recipe["patch"])
    for name in ("processor_config.json", "chat_template.jinja"):
        assert (src / name).read_text() == (tiny / name).read_text(), name
    shipped_tok, fresh_tok = (json.loads((d / "tokenizer.json").read_text()) for d in (src, tiny))
    for key in ("model", "added_tokens", "normalizer", "pre_tokenizer", "decoder"):  # not its padding state
        assert shipped_tok[key] == fresh_tok[key], key
    cfg, fresh = json.loads((src / "config.json").read_text()), json.loads((tiny / "config.json").read_text())
    for part in ("text_config", "vision_config"):
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "patch_size"):
            assert cfg[part].get(key) == fresh[part].get(key), (part, key)

    def no_training(*a, **k):
        raise AssertionError("the shipped recipe was trained instead of copied")

    monkeypatch.setattr(demo_base, "write_demo_base", no_training)
    out = tmp_path / "cache" / "llava-captioned"
    ensure_model({"tiny": "llava", "name_or_path": str(out), "captioned": recipe})
    assert (out / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert demo_base.is_current(out, "llava", **recipe)

    damaged = tmp_path / "bases"
    shutil.copytree(src, damaged / src.name)
    with open(damaged / src.name / "model.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    monkeypatch.setattr(demo_base, "SHIPPED", damaged)
    with pytest.raises(ValueError, match=r"model\.safetensors: its sha256"):
        demo_base.shipped("llava", **recipe)
