"""Builders: tiny checkpoints load through the same path as the hub models; LoRA lands only in the LM."""

import re

import pytest
import torch

from raysal.model.build import (
    LORA_TARGETS,
    apply_lora,
    load_model,
    load_processor,
    lora_target_regex,
    model_info,
    param_groups,
    resolve_dtype,
)
from raysal.model.tiny import main as tiny_main


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_tiny_cli_output_loads_with_the_builder(arch, tmp_path):
    out = tmp_path / arch
    assert tiny_main(["--out", str(out), "--arch", arch]) == 0
    model = load_model(str(out), dtype="float32")
    proc = load_processor(str(out))
    assert model.config.model_type == arch
    info = model_info(model)
    assert info.image_token_id == proc.tokenizer.convert_tokens_to_ids(proc.image_token)
    assert (info.n_heads, info.n_kv_heads) == ((4, 4) if arch == "llava" else (4, 2))
    assert model.config.vision_config.image_size == 336 and model.config.vision_config.patch_size == 14
    assert "Describe" in proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}], tokenize=False
    )


@pytest.mark.parametrize("preset", sorted(LORA_TARGETS))
def test_lora_targets_only_language_model_linears(preset, tiny_next):
    model = apply_lora(load_model(str(tiny_next), dtype="float32"), rank=2, targets=preset)
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n and "language_model" in n for n in lora)
    wrapped = {re.search(r"\.(\w+_proj)\.lora_A", n).group(1) for n in lora if "lora_A" in n}
    assert wrapped == set(LORA_TARGETS[preset])
    assert not any("vision" in n or "projector" in n or "lm_head" in n for n in lora)


def test_projector_trains_with_its_own_lr(tiny_llava):
    model = apply_lora(load_model(str(tiny_llava), dtype="float32"), rank=2, train_projector=True)
    groups = {g["name"]: g for g in param_groups(model, lr=2e-4, projector_lr=2e-5)}
    assert groups["lora"]["lr"] == 2e-4 and groups["projector"]["lr"] == 2e-5
    assert groups["projector"]["params"] and all(p.requires_grad for p in groups["projector"]["params"])


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="unknown preset 'qk'"):
        lora_target_regex("qk")
    with pytest.raises(ValueError, match="lm_head"):
        lora_target_regex(["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("fp8", "cpu")
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", "cuda") == torch.bfloat16


def test_gradient_checkpointing_with_capture_matches(tiny_llava, small_shards):
    """Checkpointing re-runs layer forwards in backward: the capture context must give the same gradients."""
    from raysal.batch import PixelNorm
    from raysal.criteria.kl import KLCriterion
    from raysal.criteria.lm import LMCriterion
    from raysal.loop.step import plan_step, train_step
    from raysal.preprocess.batches import batch_factory, load_encoded

    proc = load_processor(str(tiny_llava))
    samples = load_encoded(small_shards, "val2017", proc, limit=2)
    batch = next(batch_factory(samples, 2, 0, PixelNorm.from_processor(proc), shuffle=False)(0))
    crits = [LMCriterion(), KLCriterion(layers="all")]
    grads = []
    for gc in (False, True):
        torch.manual_seed(0)
        model = apply_lora(load_model(str(tiny_llava), dtype="float32", gradient_checkpointing=gc), rank=2, dropout=0.0)
        from raysal.attention.capture import enable_capture

        enable_capture(model)
        model.train()
        info = model_info(model)
        m = train_step(model, batch, crits, plan_step(crits, info), step=0)
        grads.append((m, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    (m0, g0), (m1, g1) = grads
    assert m0["loss"] == pytest.approx(m1["loss"], rel=1e-6)
    assert torch.allclose(g0, g1, atol=1e-6)
