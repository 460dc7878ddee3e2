"""The head finder's scores (`raysal.attention.head_scores`): a head planted to look at the named regions ranks
first, on tiny LLaVA, LLaVA-NeXT (GQA), Qwen2.5-VL and Qwen3-VL (M-RoPE, GQA)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch
from transformers import AttentionInterface

from raysal.attention.capture import CAPTURE_IMPL, capture_attention_forward, enable_capture
from raysal.attention.head_scores import score_heads
from raysal.batch import PixelNorm, model_inputs
from raysal.model.build import load_model, load_processor, model_info
from raysal.preprocess.batches import batch_factory, load_encoded

PLANTED = (2, 1)  # (layer, query head)


class PlantedHead:
    """Replaces one head's queries and keys (after RoPE, inside the attention function) by region codes: each
    grounded token's query is a one-hot of the segment it names, each image token's key a one-hot of the segment
    that covers most of it — so that head, and only it, attends to the named regions."""

    def __init__(self, layer: int, head: int) -> None:
        self.layer, self.head, self.batch = layer, head, None

    def batches(self, batches: Iterator[dict]) -> Iterator[dict]:
        for b in batches:
            self.batch = b
            yield b

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        if getattr(module, "layer_idx", None) == self.layer and self.batch is not None:
            query, key = query.clone(), key.clone()
            D, kv = query.shape[-1], self.head // (query.shape[1] // key.shape[1])
            b = self.batch
            query[:, self.head], key[:, kv] = 0.0, 0.0
            for i in range(query.shape[0]):
                seg_ids = b["segment_ids"][i].tolist()
                image_slot = b["coverage"][i].argmax(-1)  # (I,) the segment covering most of each image token
                for j, pos in enumerate(b["image_pos"][i].tolist()):
                    if pos >= 0:
                        key[i, kv, pos, int(image_slot[j]) % D] = 1.0
                for pos in b["grounded_pos"][i].tolist():
                    if pos >= 0:
                        named = int(b["token_segments"][i, pos, 0])
                        query[i, self.head, pos, seg_ids.index(named) % D] = 40.0
        return capture_attention_forward(module, query, key, value, attention_mask, **kwargs)


@pytest.mark.parametrize("arch", ["llava", "llava_next", "qwen2_5_vl", "qwen3_vl"])
def test_the_finder_ranks_the_planted_head_first(arch, tiny_of, small_shards):
    path = tiny_of(arch)
    proc = load_processor(str(path))
    samples = load_encoded(small_shards, "val2017", proc, limit=6)
    batches = batch_factory(samples, 3, proc.tokenizer.pad_token_id, PixelNorm.from_processor(proc), shuffle=False)
    model = load_model(str(path), dtype="float32")
    enable_capture(model)
    info = model_info(model)
    plant = PlantedHead(*PLANTED)
    AttentionInterface.register(CAPTURE_IMPL, plant)
    try:
        table = score_heads(model, plant.batches(batches(0)), info.n_layers, info.n_heads)
    finally:
        AttentionInterface.register(CAPTURE_IMPL, capture_attention_forward)
    rows = table.ranked()
    top, second = rows[0], rows[1]
    assert (top["layer"], top["head"]) == PLANTED, rows[:3]
    assert top["amr"] > 2.0 and top["amr"] > second["amr"] + 0.5 and top["pointing"] > 0.8, rows[:3]
    assert top["entropy"] < second["entropy"]  # concentrated where the random heads are nearly uniform
    assert table.tokens > 0 and table.images == 6 and len(rows) == info.n_layers * info.n_heads
    # without the plant, nothing comes near it: random heads are near chance (AMR 1.0 on LLaVA, NeXT and Qwen2.5-VL;
    # up to 1.5 on the tiny Qwen3-VL, whose random heads are less uniform), the planted one at 15-27
    plain = score_heads(model, batches(0), info.n_layers, info.n_heads).ranked()
    assert plain[0]["amr"] < top["amr"] / 5, (top["amr"], plain[:3])
    if arch != "qwen3_vl":
        assert plain[0]["amr"] < 1.5


def test_heads_entry_point_writes_the_ranked_table_and_figure(storage_root, cache, monkeypatch, capsys):
    """On a local folder, a file:// URI and a bucket (a search's storage on a cluster): the table and its picture
    go to ``<storage_path>/heads/<model>/``, and the localization preset reads them back from there."""
    from raysal import heads, storage
    from raysal.orchestration.train.compose import compose_cfg
    from raysal.orchestration.train.spec import spec_from_cfg
    from raysal.search.override_text import format_override

    monkeypatch.setenv("RAYSAL_CACHE", str(cache))
    base = [
        "experiment=demo",
        "data.synthetic.images=24",
        "data.confirm_holdout=0",
        format_override("storage_path", storage_root),
    ]
    args = [*base, "finder.samples=4"]
    assert heads.main(args) == 0
    folder = storage.join(storage_root, "heads", "llava")
    out = storage.read_json(storage.join(folder, "heads.json"))
    rows = out["heads"]
    assert len(rows) == out["n_layers"] * out["n_heads"] == 16 and out["images"] == 4
    assert [r["rank"] for r in rows] == list(range(1, 17)) and rows[0]["amr"] >= rows[-1]["amr"]
    assert len(storage.read_bytes(storage.join(folder, "heads.png"))) > 1000
    assert "best by AMR" in capsys.readouterr().out
    spec = spec_from_cfg(compose_cfg([*base, "criteria.align.heads=localization", "criteria.align.top_k=2"]))
    (align,) = [c for c in spec.criteria if c.name == "kl"]
    assert align.heads == [[r["layer"], r["head"]] for r in rows[:2]]
    assert heads.main([*args, "finder.samples=0"]) == 2
    assert "finder.samples=0: must be an integer >= 1" in capsys.readouterr().err


def test_head_pairs_read_just_those_heads(tiny_llava, small_shards):
    """A criterion on (layer, head) pairs: the capture holds their layers × heads grid, the criterion reads the
    mean of exactly its pairs, and training through them gives gradients."""
    from raysal.attention.capture import AttentionCapture
    from raysal.attention.targets import grounding_targets
    from raysal.criteria.inputs import CriterionInputs, renormalise
    from raysal.criteria.kl import KLCriterion
    from raysal.criteria.lm import LMCriterion
    from raysal.loop.step import capture_plan, plan_step, train_step
    from raysal.model.build import apply_lora

    proc = load_processor(str(tiny_llava))
    samples = load_encoded(small_shards, "val2017", proc, limit=2)
    batch = next(batch_factory(samples, 2, proc.tokenizer.pad_token_id, PixelNorm.from_processor(proc))(0))
    torch.manual_seed(0)
    model = apply_lora(load_model(str(tiny_llava), dtype="float32"), rank=4, targets="qkvo")
    enable_capture(model)
    info = model_info(model)
    kl = KLCriterion(weight=1.0, heads=[[3, 1], [1, 2], [-1, 0]])  # [-1, 0] = last layer, head 0
    plan = capture_plan([kl], info)
    assert plan.layers == (1, 3) and plan.heads == (0, 1, 2)
    t = grounding_targets(batch)
    with torch.no_grad(), AttentionCapture(plan.layers, plan.heads, t.query_pos, t.key_pos) as cap:
        out = model(**model_inputs(batch), use_cache=False)
    att = cap.stacked()  # (B, 2, 3, T, I)
    x = CriterionInputs(batch, out.logits, t, info.n_layers, info.n_heads, att, plan.layers, plan.heads)
    want = renormalise((att[:, 0, 2] + att[:, 1, 1] + att[:, 1, 0])[:, None] / 3, t.key_valid)  # (1,2) (3,1) (3,0)
    torch.testing.assert_close(x.saliency(kl.layers, kl.heads), want)
    m = train_step(model, batch, [LMCriterion(), kl], plan_step([LMCriterion(), kl], info), step=0)
    assert m["loss/kl"] > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora" in n)


def test_localization_preset_resolves_from_the_finders_table(tmp_path, cache, monkeypatch):
    from raysal import heads
    from raysal.orchestration.train.compose import compose_cfg
    from raysal.orchestration.train.spec import spec_from_cfg

    monkeypatch.setenv("RAYSAL_CACHE", str(cache))
    base = ["experiment=demo", "data.synthetic.images=24", "data.confirm_holdout=0", f"storage_path={tmp_path}"]
    preset = ["criteria.align.heads=localization", "criteria.align.top_k=3"]
    with pytest.raises(ValueError, match=r"criteria\.align\.heads=localization: .*run `python -m raysal\.heads`"):
        spec_from_cfg(compose_cfg([*base, *preset]))
    assert heads.main([*base, "finder.samples=4"]) == 0
    table = json.loads((tmp_path / "heads" / "llava" / "heads.json").read_text())
    spec = spec_from_cfg(compose_cfg([*base, *preset]))
    (align,) = [c for c in spec.criteria if c.name == "kl"]
    assert align.heads == [[r["layer"], r["head"]] for r in table["heads"][:3]]
    with pytest.raises(ValueError, match="top_k=99"):
        spec_from_cfg(compose_cfg([*base, "criteria.align.heads=localization", "criteria.align.top_k=99"]))
    table["model"] = "someone/else"
    (tmp_path / "heads" / "llava" / "heads.json").write_text(json.dumps(table))
    with pytest.raises(ValueError, match="scored for 'someone/else'"):
        spec_from_cfg(compose_cfg([*base, *preset]))


def test_a_search_that_may_pick_localization_finds_out_whether_its_table_is_missing(tmp_path):
    """A space with a localization option and no table for its model: the search must make it first (it does, as a
    Ray task: tests/test_entrypoints.py); a space without one, or a table already there, needs nothing."""
    from pathlib import Path
    from types import SimpleNamespace

    from raysal.orchestration.tune.heads_table import missing_heads_table
    from raysal.search.space_file import load_search_space

    root = Path(__file__).resolve().parents[1] / "search_spaces"
    run = SimpleNamespace(config={"finder": {"out": str(tmp_path)}}, model={"name_or_path": "llava-hf/llava-1.5-7b-hf"})
    table = tmp_path / "llava-1.5-7b-hf" / "heads.json"
    assert missing_heads_table(load_search_space(root / "methods.yaml"), run) == str(table)  # nested under kl
    assert missing_heads_table(load_search_space(root / "criteria.yaml"), run) == str(table)
    assert missing_heads_table(load_search_space(root / "methods.yaml", "demo"), run) is None  # no head presets
    table.parent.mkdir()
    table.write_text("{}")
    assert missing_heads_table(load_search_space(root / "criteria.yaml"), run) is None
