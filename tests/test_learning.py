"""The learning proof: KL alignment makes held-out attention land on the named regions, without hurting the LM.

The tiny LLaVA trains on synthetic data twice — ``lm`` only and ``lm + kl`` — with the same seed, steps and
batches, and is evaluated on held-out images with the fixed protocol (every layer, every head).
Note from finding the settings: KL on the late band only (1 of 4 layers) raises the all-layer AMR ~2.4× but not
pointing — the untrained layers dominate the average; KL on every layer moves all four metrics.
"""

from pathlib import Path

import pytest
import torch

from raysal.batch import PixelNorm
from raysal.criteria.kl import KLCriterion
from raysal.criteria.lm import LMCriterion
from raysal.data.synthetic import generate
from raysal.loop.fit import FitConfig, fit
from raysal.model.build import apply_lora, load_model, load_processor
from raysal.preprocess.batches import batch_factory, load_encoded


def lora_fit(base: Path, shards: Path, criteria: list, cfg: FitConfig) -> dict[str, float]:
    """LoRA r=16 all-linear + the projector on ``base``, seeded, trained on the shards' train split, evaluated on
    their validation split (batches of 8, the same order for every run)."""
    proc = load_processor(str(base))
    train = load_encoded(shards, "train2017", proc)
    val = load_encoded(shards, "val2017", proc)
    pad, px = proc.tokenizer.pad_token_id, PixelNorm.from_processor(proc)
    torch.manual_seed(0)
    model = apply_lora(load_model(str(base), dtype="float32"), rank=16, alpha=32, targets="all-linear",
                       train_projector=True)  # fmt: skip
    return fit(model, criteria, batch_factory(train, 8, pad, px, seed=0),
               lambda: batch_factory(val, 8, pad, px, shuffle=False)(0), cfg)  # fmt: skip


def test_kl_doubles_held_out_amr_without_raising_lm_loss(tiny_llava, small_shards):
    cfg = FitConfig(max_steps=60, lr=5e-3, warmup_steps=4, eval_every=40, seed=0, eval_layers="all", eval_heads="all")
    lm = lora_fit(tiny_llava, small_shards, [LMCriterion()], cfg)
    kl = lora_fit(tiny_llava, small_shards, [LMCriterion(), KLCriterion(weight=1.0, layers="all", heads="all")], cfg)
    print(f"lm-only: {lm}\nlm+kl:   {kl}")
    assert kl["val/amr"] >= 1.4 * lm["val/amr"], (kl["val/amr"], lm["val/amr"])
    assert kl["val/lm_loss"] <= 1.10 * lm["val/lm_loss"], (kl["val/lm_loss"], lm["val/lm_loss"])
    assert kl["val/pointing"] > lm["val/pointing"] and kl["val/ap"] > lm["val/ap"] and kl["val/nss"] > lm["val/nss"]


@pytest.fixture(scope="module")
def demo_base(tmp_path_factory):
    """The demo's trained base, as the search gets it on first use (`configs/model/tiny-captioned.yaml`: shipped)."""
    from omegaconf import OmegaConf

    from raysal.demo.base import make_demo_base

    made = OmegaConf.load(Path(__file__).parents[1] / "configs" / "model" / "tiny-captioned.yaml").captioned
    return make_demo_base(tmp_path_factory.mktemp("demo_base") / "llava", "llava", steps=made.steps, lr=made.lr,
                          seed=made.seed, patch=made.patch, images=made.images)  # fmt: skip


@pytest.mark.parametrize("data_seed", [1, 2])
def test_on_the_demo_base_alignment_raises_amr_by_40_percent_within_the_lm_tolerance(demo_base, data_seed, tmp_path):
    """The demo search's claim, on data it never saw (the demo's data seed is 0): on the trained base, the demo's
    run settings (24 steps, LoRA 16 all-linear + projector, lr 3e-3, batch 8) with KL on all layers (weight 0.1,
    inside criteria.yaml's range) reach ≥ 1.4× the LM-only control's held-out AMR at ≤ the control's LM loss × 1.02
    (criteria.yaml's lm_tolerance). Measured on the shipped base (which already grounds: the control's AMR is ~2.2,
    where the earlier, shorter-trained base's was ~1.2): 1.54× at +0.53 % (seed 1), 1.63× at +0.74 % (seed 2)."""
    from raysal.data.shards import write_shards

    # demo-like data (19 validation images, the demo's palette), another seed
    generate(tmp_path / "root", images=96, seed=data_seed, max_side=320, palette="coded")
    write_shards(tmp_path / "root", tmp_path / "shards")
    cfg = FitConfig(max_steps=24, lr=3e-3, warmup_steps=4, eval_every=24, seed=0, bf16=False)
    lm = lora_fit(demo_base, tmp_path / "shards", [LMCriterion()], cfg)
    kl = lora_fit(demo_base, tmp_path / "shards", [LMCriterion(), KLCriterion(weight=0.1, layers="all", heads="all")],
                  cfg)  # fmt: skip
    print(f"seed {data_seed}: lm-only {lm['val/amr']:.3f} / {lm['val/lm_loss']:.4f}, "
          f"kl {kl['val/amr']:.3f} / {kl['val/lm_loss']:.4f}")  # fmt: skip
    assert lm["val/lm_loss"] < 1.0, lm  # the base has learned to caption (a random-init model starts near 6)
    assert kl["val/amr"] >= 1.4 * lm["val/amr"], (kl["val/amr"], lm["val/amr"])
    assert kl["val/lm_loss"] <= 1.02 * lm["val/lm_loss"], (kl["val/lm_loss"], lm["val/lm_loss"])
