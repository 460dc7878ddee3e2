"""Two ranks (gloo, CPU, ``mp.spawn``): sharded evaluation equals one process evaluating the whole set; full
finetuning sharded with FSDP2 equals DDP, resumes exactly from its sharded checkpoint and exports a model that
``from_pretrained`` loads. (The same code under Ray Train: `test_multi_worker.py`.)"""

from __future__ import annotations

import json
from pathlib import Path

import distributed_runs as runs
import pytest
import torch

from raysal.attention.capture import CAPTURE_IMPL, CapturePlan, enable_capture
from raysal.attention.selection import resolve_heads, resolve_layers
from raysal.loop.checkpoint import MODEL, SHARDED, STATE
from raysal.loop.evaluate import evaluate
from raysal.model.build import load_model, load_processor, model_info, param_groups, prepare_full_finetune

METRICS = ("lm_loss", "amr", "ap", "nss", "pointing", "images", "tokens")


@pytest.fixture(scope="module")
def whole_set(tiny_llava, small_shards):
    """One process, the 7 validation samples in batches of 3 (the ranks batch their parts differently)."""
    _, val = runs.data(str(tiny_llava), str(small_shards), 0, 1, train=0, val=7, batch=3)
    model = load_model(str(tiny_llava), dtype="float32")
    enable_capture(model)
    model.set_attn_implementation({"text_config": CAPTURE_IMPL})
    info = model_info(model)
    protocol = CapturePlan(resolve_layers("all", info.n_layers), resolve_heads("all", info.n_heads), 0)
    return evaluate(model, val(), protocol)


@pytest.mark.parametrize(
    ("fsdp", "one_rank"), [(False, False), (True, False), (True, True)],
    ids=["replicated", "fsdp-lockstep", "fsdp-a-rank-without-validation"],
)  # fmt: skip
def test_sharded_evaluation_equals_one_process(whole_set, tiny_llava, small_shards, tmp_path, fsdp, one_rank):
    out = tmp_path / "eval.json"
    runs.spawn(runs.evaluate_parts, 2, str(tiny_llava), str(small_shards), str(out), fsdp, one_rank)
    got = json.loads(out.read_text())
    assert got["images"] == 7 and got["tokens"] == whole_set["tokens"]
    for k in METRICS:
        assert got[k] == pytest.approx(whole_set[k], rel=1e-5, abs=1e-7), k


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp-lockstep"])
def test_sharded_pope_and_readout_equal_one_process(tiny_llava, small_shards, tmp_path, fsdp):
    """Two ranks, each asking about its part of the POPE images and reading out its part of the phrases (unequal
    parts: in lockstep the rank with fewer runs one more forward, uncounted), report what one process reports."""
    from raysal.data.pope_set import select_pope
    from raysal.loop.pope_eval import pope_scores
    from raysal.loop.readout_eval import readout_scores
    from raysal.probes.probe_set import select_probes
    from raysal.probes.readout_items import readout_items

    out = tmp_path / "extras.json"
    runs.spawn(runs.extras_parts, 2, str(tiny_llava), str(small_shards), str(out), fsdp)
    got = json.loads(out.read_text())
    proc, (model, protocol) = load_processor(str(tiny_llava)), runs.eval_model(str(tiny_llava), fsdp=False)
    pope = select_pope(str(small_shards), "train2017", images=5)
    probes = select_probes(str(small_shards), "train2017", images=3, phrases=10**6)
    assert len(pope.images) == 5 and len(probes) == 3  # odd: the ranks' parts differ
    items = readout_items(probes, proc)
    want = {**pope_scores(model, proc, pope, device="cpu"), **readout_scores(model, proc, items, protocol)}
    assert set(got) == set(want) and want["pope/adversarial/n"] > 0 and want["rec_phrases"] > 0
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-7, nan_ok=True), k


@pytest.mark.parametrize("arch", ["llava_next", "qwen2_5_vl", "qwen3_vl"])
def test_full_finetuning_groups_and_frozen_parts(arch, tiny_of):
    """The vision tower frozen, the projector in its own group: LLaVA's multi_modal_projector (+ NeXT's
    image_newline), Qwen's merger(s), which live inside its vision tower (``visual.merger``, Qwen3-VL's
    ``visual.deepstack_merger_list``)."""
    model = prepare_full_finetune(load_model(str(tiny_of(arch)), dtype="float32"), train_projector=True)
    projector = ("multi_modal_projector", "image_newline", "visual.merger", "visual.deepstack_merger_list")
    vision = {n for n, _ in model.named_parameters() if ("vision_tower" in n or ".visual." in n)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and vision and not any(n in trainable for n in vision if not any(k in n for k in projector))
    assert any("language_model.layers" in n for n in trainable) and "lm_head.weight" in trainable
    groups = {g["name"]: g for g in param_groups(model, lr=1e-5, projector_lr=2e-6)}
    assert set(groups) == {"model", "projector"} and groups["projector"]["lr"] == 2e-6
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in groups["projector"]["params"]} == {
        n for n in trainable if any(k in n for k in projector)
    }
    if arch == "qwen3_vl":
        assert any("deepstack_merger_list" in names[id(p)] for p in groups["projector"]["params"])
    frozen = prepare_full_finetune(model, train_projector=False, train_vision=True)
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert not any(any(k in n for k in projector) for n in trainable)
    assert any(n in trainable for n in vision)


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl", "qwen3_vl"])
def finetuned(request, small_shards, tmp_path_factory):
    """Full finetuning on two ranks, DDP and FSDP2, of each family's tiny model (Qwen: M-RoPE, the vision tower's
    merger, Qwen3-VL's DeepStack mergers)."""
    arch = request.param
    model = (
        request.getfixturevalue("tiny_qwen")[arch] if arch.startswith("qwen") else request.getfixturevalue("tiny_llava")
    )
    out = tmp_path_factory.mktemp("finetune")
    runs.spawn(runs.finetune, 2, str(model), str(small_shards), str(out))
    (out / "base").write_text(str(model))
    return out


def _reports(root, name):
    return json.loads((root / f"{name}.json").read_text())


def test_fsdp_equals_ddp_with_the_capture_criteria(finetuned):
    ddp, fsdp = _reports(finetuned, "ddp"), _reports(finetuned, "fsdp")
    assert [r["train/step"] for r in fsdp] == [3.0, 6.0]
    for a, b in zip(ddp, fsdp, strict=True):
        for k in ("train/loss", "train/loss/lm", "train/loss/kl", "train/grad_norm", "val/lm_loss", "val/amr"):
            assert b[k] == pytest.approx(a[k], rel=1e-4), k
    assert fsdp[-1]["train/loss"] < fsdp[0]["train/loss"] and fsdp[-1]["val/lm_loss"] < fsdp[0]["val/lm_loss"]
    straight, ref = torch.load(finetuned / "fsdp.pt"), torch.load(finetuned / "ddp.pt")
    # a key's bias (Qwen's k_proj has one) has a true gradient of zero: q·b is the same for every key, so softmax
    # ignores it; AdamW scales its float noise (~1e-10, different under reduce-scatter and all-reduce) to lr-sized
    # steps in random directions: compared loosely, everything else as tightly as on LLaVA
    differ = [k for k, v in straight.items() if not k.endswith("k_proj.bias")
              and not torch.allclose(v, ref[k], rtol=1e-4, atol=1e-6)]  # fmt: skip
    assert not differ, differ
    for k in (k for k in straight if k.endswith("k_proj.bias")):
        assert (straight[k] - ref[k]).abs().max() < 1e-4, k


def test_fsdp_checkpoint_resumes_exactly(finetuned):
    ckpt = finetuned / "fsdp" / "step_0000003"
    assert (ckpt / STATE).exists() and (ckpt / SHARDED / ".metadata").exists()
    assert sorted(p.name for p in (ckpt / SHARDED).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    resumed, straight = _reports(finetuned, "resumed"), _reports(finetuned, "fsdp")
    assert [r["train/step"] for r in resumed] == [6.0]
    assert resumed[0]["train/loss"] == pytest.approx(straight[-1]["train/loss"], rel=1e-6)
    a, b = torch.load(finetuned / "fsdp.pt"), torch.load(finetuned / "resumed.pt")
    for k, v in a.items():
        assert torch.allclose(v, b[k], rtol=0, atol=1e-7), k


def test_each_rank_resumed_from_its_own_shard(finetuned):
    """What the resumed run's ranks fetched: state.pt and their own shard, never model/ nor the other's shard."""
    ckpt = finetuned / "fsdp" / "step_0000003"
    sizes = {str(p.relative_to(ckpt)): p.stat().st_size for p in ckpt.rglob("*") if p.is_file()}
    for rank in (0, 1):
        got = json.loads((finetuned / f"fetched{rank}.json").read_text())
        own, other = f"{SHARDED}/__{rank}_0.distcp", f"{SHARDED}/__{1 - rank}_0.distcp"
        assert got[own] == sizes[own] and got[STATE] == sizes[STATE]
        assert got.get(other, 0) < sizes[other] / 10  # only what every rank loads: param_groups, AdamW's steps
        assert not any(k.startswith(MODEL) for k in got) and ("history.jsonl" in got) == (rank == 0)
        assert sum(got.values()) < sum(sizes.values()) - sizes[other] - sizes[f"{MODEL}/model.safetensors"] / 2


def test_exported_full_model_loads_with_from_pretrained(finetuned):
    folder = finetuned / "fsdp" / "step_0000006" / MODEL
    config = json.loads((folder / "config.json").read_text())
    base = json.loads((Path((finetuned / "base").read_text()) / "config.json").read_text())
    assert config["architectures"] == base["architectures"]  # LlavaForConditionalGeneration, Qwen2_5_VL…, Qwen3VL…
    loaded = load_model(str(folder), dtype="float32")
    weights = torch.load(finetuned / "fsdp.pt")
    for n, p in loaded.named_parameters():
        assert torch.equal(p, weights[n]), n


def test_meter_sums_of_disjoint_images_give_the_whole_sets_scores():
    from raysal.metrics.grounding import METRICS as NAMES
    from raysal.metrics.grounding import GroundingMeter, scores_from_sums

    g = torch.Generator().manual_seed(0)
    sal, reg = torch.rand(40, 16, generator=g), (torch.rand(40, 16, generator=g) > 0.6).float()
    reg[5] = 0  # a token whose region is empty: NaN in every metric but AMR's image still counts others
    ids = torch.arange(40) // 3  # 3 tokens per image
    whole, parts = GroundingMeter(), [GroundingMeter(), GroundingMeter()]
    whole.update(sal, reg, None, ids)
    for m, rows in zip(parts, (ids < 7, ids >= 7), strict=True):  # images 0-6 on one rank, the rest on the other
        m.update(sal[rows], reg[rows], None, ids[rows])
    a, b = parts[0].sums(), parts[1].sums()
    got = scores_from_sums({k: (a[k][0] + b[k][0], a[k][1] + b[k][1]) for k in NAMES})
    assert got == pytest.approx(whole.compute(), rel=1e-12)
    assert scores_from_sums(GroundingMeter().sums())["amr"] != scores_from_sums(GroundingMeter().sums())["amr"]


def test_a_loss_that_is_not_finite_on_one_rank_stops_every_rank(tiny_llava, small_shards, tmp_path):
    """Decided together before backward: the healthy rank stops too instead of waiting in FSDP's collectives."""
    runs.spawn(runs.one_rank_diverges, 2, str(tiny_llava), str(small_shards), str(tmp_path))
    assert "loss term 'rank1_inf' is inf" in (tmp_path / "rank1.txt").read_text()
    assert "another rank's loss is not finite" in (tmp_path / "rank0.txt").read_text()


def test_each_rank_takes_its_part_and_lockstep_ranks_run_as_many_rounds(monkeypatch):
    """POPE's and the readout's split of their images: every image counted once over the ranks; in lockstep (FSDP)
    a rank with fewer images repeats one, uncounted."""
    import raysal.distributed as d

    items = list(range(5))
    monkeypatch.setattr(d, "world_size", lambda: 2)
    parts = {}
    for r in (0, 1):
        monkeypatch.setattr(d, "rank", lambda r=r: r)
        parts[r] = (list(d.my_part(items, sharded=True, lockstep=False)),
                    list(d.my_part(items, sharded=True, lockstep=True)))  # fmt: skip
    assert parts[0][0] == [(0, True), (2, True), (4, True)] and parts[1][0] == [(1, True), (3, True)]
    assert parts[0][1] == parts[0][0] and parts[1][1] == [(1, True), (3, True), (3, False)]
    monkeypatch.setattr(d, "world_size", lambda: 8)
    monkeypatch.setattr(d, "rank", lambda: 7)  # no item of its own: it runs item 0, uncounted
    assert list(d.my_part(items, sharded=True, lockstep=True)) == [(0, False)]
    assert list(d.my_part(items, sharded=False, lockstep=False)) == [(i, True) for i in items]
