"""``maskembed`` (`raysal.criteria.maskembed`): the student (vision LoRA) and the decoder learn, nothing else does;
the teacher is the frozen tower; the loss falls; the decoder is checkpointed; tiny LLaVA and LLaVA-NeXT."""

from __future__ import annotations

import pytest
import torch

from raysal.batch import PixelNorm
from raysal.criteria.maskembed import HEAD, MaskEmbedCriterion
from raysal.loop.fit import FitConfig, fit
from raysal.loop.step import plan_step, train_step
from raysal.model.build import apply_lora, load_model, load_processor, model_info
from raysal.orchestration.train.compose import compose_cfg
from raysal.orchestration.train.spec import spec_from_cfg
from raysal.preprocess.batches import batch_factory, load_encoded


def _setup(path, shards, n=4):
    proc = load_processor(str(path))
    samples = load_encoded(shards, "train2017", proc, limit=n)
    batches = batch_factory(samples, 2, proc.tokenizer.pad_token_id, PixelNorm.from_processor(proc), seed=1)
    torch.manual_seed(0)
    model = apply_lora(load_model(str(path), dtype="float32"), rank=4, targets="qv", vision=True)
    return model, batches


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_gradients_reach_only_the_student_and_the_decoder(arch, tiny_llava, tiny_next, small_shards):
    model, batches = _setup(tiny_llava if arch == "llava" else tiny_next, small_shards)
    crit = MaskEmbedCriterion(mask_ratio=0.5)
    crit.attach(model)
    batch = next(batches(0))
    pixels = batch["pixel_values"]
    flat = pixels.flatten(0, 1) if pixels.dim() == 5 else pixels  # NeXT: every crop of every image
    n_p = (336 // 14) ** 2
    mask = torch.zeros(flat.shape[0], n_p, dtype=torch.bool)
    mask[:, ::3] = True
    before = crit.teacher_view(model, flat, mask)
    m = train_step(model, batch, [crit], plan_step([crit], model_info(model)), step=0)
    assert m["loss/maskembed"] > 0
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    vision_lora = [g for n, g in grads.items() if "vision_tower" in n and "lora_" in n]
    decoder = [g for n, g in grads.items() if HEAD in n]
    assert decoder and all(g is not None and g.abs().sum() > 0 for g in decoder)
    assert vision_lora and any(g is not None and g.abs().sum() > 0 for g in vision_lora)
    lm_lora = [g for n, g in grads.items() if "language_model" in n and "lora_" in n]
    assert lm_lora and all(g is None or g.abs().sum() == 0 for g in lm_lora)  # the LM is not its business
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)
    with torch.no_grad():  # a student update leaves the teacher (the tower with its adapters off) where it was
        for n, p in model.named_parameters():
            if "vision_tower" in n and "lora_B" in n:
                p.add_(0.1)
    torch.testing.assert_close(crit.teacher_view(model, flat, mask), before)


def test_loss_falls_and_the_decoder_resumes_from_a_checkpoint(tiny_llava, small_shards, tmp_path):
    model, batches = _setup(tiny_llava, small_shards, n=8)
    reports = []
    cfg = FitConfig(max_steps=12, lr=3e-3, eval_every=6, seed=1)
    fit(model, [MaskEmbedCriterion(mask_ratio=0.5)], batches, None, cfg, checkpoint_dir=tmp_path,
        report=lambda m, p: reports.append(m))  # fmt: skip
    first, last = reports[0]["train/loss/maskembed"], reports[-1]["train/loss/maskembed"]
    assert last < 0.9 * first, (first, last)  # 0.947 → 0.785 on 2026-11-29
    again, _ = _setup(tiny_llava, small_shards, n=8)
    fit(again, [MaskEmbedCriterion(mask_ratio=0.5)], batches, None, FitConfig(max_steps=12, lr=3e-3, eval_every=6),
        resume_from=tmp_path / "step_0000012")  # fmt: skip
    a = {n: p for n, p in model.named_parameters() if HEAD in n}
    b = {n: p for n, p in again.named_parameters() if HEAD in n}
    assert a and a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_maskembed_config():
    spec = spec_from_cfg(compose_cfg(["experiment=demo", "criterion@criteria.vision=maskembed", "lora.vision=true",
                                      "criteria.vision.mask_ratio=0.75"]))  # fmt: skip
    (me,) = [c for c in spec.criteria if c.name == "maskembed"]
    assert me.mask_ratio == 0.75
    with pytest.raises(ValueError, match="needs a trainable student vision tower"):
        spec_from_cfg(compose_cfg(["experiment=demo", "criterion@criteria.vision=maskembed"]))
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        spec_from_cfg(compose_cfg(["experiment=demo", "criterion@criteria.vision=maskembed", "lora.vision=true",
                                   "criteria.vision.mask_ratio=1.5"]))  # fmt: skip
