"""Criteria that need the model (lm, cal, seed_kl) and the step that combines them, on the tiny LLaVA."""

from dataclasses import dataclass

import pytest
import torch

from raysal.attention.capture import CAPTURE_IMPL, enable_capture
from raysal.batch import PixelNorm, model_inputs
from raysal.criteria.cal import CALCriterion, smooth3
from raysal.criteria.kl import KLCriterion
from raysal.criteria.lm import LMCriterion
from raysal.criteria.mse import MSECriterion
from raysal.criteria.seed_kl import SeedKLCriterion
from raysal.loop.step import NonFiniteLossError, capture_plan, plan_step, train_step, validate_criteria
from raysal.model.build import apply_lora, load_model, load_processor, model_info
from raysal.preprocess.batches import batch_factory, load_encoded


@pytest.fixture(scope="module")
def setup(tiny_llava, small_shards):
    proc = load_processor(str(tiny_llava))
    samples = load_encoded(small_shards, "val2017", proc, limit=3)
    pad, px = proc.tokenizer.pad_token_id, PixelNorm.from_processor(proc)
    batch = next(batch_factory(samples, 3, pad, px, shuffle=False)(0))
    return tiny_llava, batch


def fresh(ckpt):
    torch.manual_seed(0)
    model = apply_lora(load_model(str(ckpt), dtype="float32"), rank=4, targets="qkvo")
    enable_capture(model)
    return model


def test_lm_equals_transformers_loss(setup):
    ckpt, batch = setup
    model = fresh(ckpt)
    out = model(**model_inputs(batch), labels=batch["labels"])
    m = train_step(model, batch, [LMCriterion()], plan_step([LMCriterion()], model_info(model)), step=0)
    assert m["loss/lm"] == pytest.approx(float(out.loss.detach()), rel=1e-5)


def test_weight_scales_linearly_and_terms_are_logged(setup):
    ckpt, batch = setup
    info = None
    results = []
    for w in (0.5, 1.0):
        model = fresh(ckpt)
        info = model_info(model)
        crits = [LMCriterion(), KLCriterion(weight=w, layers="late")]
        m = train_step(model, batch, crits, plan_step(crits, info), step=0)
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((m, grads))
    (m1, g1), (m2, g2) = results
    assert m1["loss/kl"] == pytest.approx(m2["loss/kl"], rel=1e-6)
    assert m1["loss"] - m1["loss/lm"] == pytest.approx(0.5 * m1["loss/kl"], rel=1e-5)
    assert m2["loss"] - m2["loss/lm"] == pytest.approx(1.0 * m2["loss/kl"], rel=1e-5)
    model = fresh(ckpt)
    m0 = train_step(model, batch, [LMCriterion()], plan_step([LMCriterion()], info), step=0)
    g0 = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert torch.allclose(g2 - g0, 2 * (g1 - g0), atol=1e-6)  # the kl gradient scales with its weight
    assert m1["grounded_tokens"] > 0 and m0.keys() == {"loss", "loss/lm"}


def test_seed_kl_on_eager_equals_kl_on_capture(setup):
    ckpt, batch = setup
    model = fresh(ckpt)
    info = model_info(model)
    kl = [KLCriterion(weight=1.0, layers="all", heads="all", query_offset=-1)]
    a = train_step(model, batch, kl, plan_step(kl, info), step=0)
    model.set_attn_implementation({"text_config": "eager"})
    seed = [SeedKLCriterion(weight=1.0, layers="all", query_offset=-1)]
    assert capture_plan(seed, info) is None
    b = train_step(model, batch, seed, plan_step(seed, info), step=0)
    assert b["loss/seed_kl"] == pytest.approx(a["loss/kl"], rel=1e-5)
    model.set_attn_implementation({"text_config": CAPTURE_IMPL})


def test_cal_masks_images_in_a_no_grad_forward(setup, monkeypatch):
    ckpt, batch = setup
    model = fresh(ckpt)
    info = model_info(model)
    calls = []
    original = model.forward

    def spy(*args, **kwargs):
        calls.append((kwargs["attention_mask"].clone(), torch.is_grad_enabled()))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    cal = CALCriterion()
    m = train_step(model, batch, [cal], plan_step([cal], info), step=0)
    assert len(calls) == 2
    (mask_main, grad_main), (mask_blind, grad_blind) = calls
    image = batch["input_ids"] == info.image_token_id
    assert grad_main and not grad_blind
    assert mask_blind[image].eq(0).all() and torch.equal(mask_blind[~image], mask_main[~image])
    assert mask_main[image].eq(1).all()
    assert torch.isfinite(torch.tensor(m["loss/cal"]))
    with pytest.raises(ValueError, match="replace the LM loss"):
        validate_criteria([LMCriterion(), CALCriterion()])


def test_smooth3_per_sequence_and_flat():
    w = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    per = smooth3(w, valid, per_sequence=True)
    assert torch.allclose(per, torch.tensor([[1.5, 2.0, 2.5, 0.0], [4.5, 4.5, 0.0, 0.0]]))
    flat = smooth3(w, valid, per_sequence=False)  # 1 2 3 4 5 as one sequence
    assert torch.allclose(flat, torch.tensor([[1.5, 2.0, 3.0, 0.0], [4.0, 4.5, 0.0, 0.0]]))


def test_non_finite_loss_names_step_and_term(setup):
    ckpt, batch = setup
    model = fresh(ckpt)
    info = model_info(model)

    class Exploding(MSECriterion):
        def __call__(self, x):
            return super().__call__(x) * float("inf")

    crits = [LMCriterion(), Exploding(name="boom")]
    with pytest.raises(NonFiniteLossError, match=r"step 7: loss term 'boom'"):
        train_step(model, batch, crits, plan_step(crits, info), step=7)


def test_config_errors_are_named():
    with pytest.raises(ValueError, match="share query_offset"):
        validate_criteria([KLCriterion(query_offset=0), MSECriterion(query_offset=-1)])
    with pytest.raises(ValueError, match="unique"):
        validate_criteria([LMCriterion(), LMCriterion()])
    with pytest.raises(ValueError, match="no criterion"):
        validate_criteria([])


def test_a_criterion_without_the_selection_its_needs_ask_for_is_refused():
    """raysal/criteria/protocol.py: image_attention asks for layers, heads, top_k and query_offset; attentions for
    layers and query_offset. Refused at set-up, named, not an AttributeError in the first step."""

    @dataclass
    class Bare:
        name: str
        needs: frozenset[str]
        weight: float = 1.0
        replaces_lm: bool = False

        def __call__(self, x):
            return x.logits.sum() * 0

    with pytest.raises(ValueError, match=r"'bare' needs image_attention, so it must have layers, heads, top_k"):
        validate_criteria([Bare("bare", frozenset({"image_attention"}))])
    with pytest.raises(ValueError, match=r"'eager' needs attentions, so it must have layers and query_offset"):
        validate_criteria([Bare("eager", frozenset({"attentions"}))])
    validate_criteria([Bare("plain", frozenset({"logits"}))])  # a language term needs no selection


def test_eager_attention_only_for_criteria_that_ask(setup, monkeypatch):
    """fit() trains with eager attention only when a criterion needs full `attentions`; evaluation always captures."""
    from raysal.criteria import inputs
    from raysal.loop.fit import FitConfig, fit

    ckpt, batch = setup
    seen = []

    class Spy(LMCriterion):
        def __call__(self, x):
            seen.append(x.batch["impl"])
            return super().__call__(x)

    for extra, expected in (([], "raysal_capture"), ([SeedKLCriterion()], "eager")):
        model = fresh(ckpt)
        original = inputs.CriterionInputs.__init__

        def init(self, *args, _orig=original, _model=model, **kwargs):
            _orig(self, *args, **kwargs)
            self.batch = {**self.batch, "impl": _model.config.text_config._attn_implementation}

        monkeypatch.setattr(inputs.CriterionInputs, "__init__", init)
        fit(model, [LMCriterion(), *extra, Spy(name="spy")], lambda epoch: iter([batch]), None,
            FitConfig(max_steps=1, eval_every=1))  # fmt: skip
        monkeypatch.undo()
        assert seen[-1] == expected


def test_mixed_eager_and_capture_criteria_share_the_eager_maps(setup):
    """[lm, seed_kl, kl]: the eager run gives kl its image attention cut from the eager maps — the same kl value and
    gradient as a capture-only run — and fit() trains with the mix."""
    from raysal.loop.fit import FitConfig, fit

    ckpt, batch = setup
    kl = KLCriterion(weight=1.0, layers="late", heads=[0, 1], query_offset=-1)
    model = fresh(ckpt)
    info = model_info(model)
    alone = train_step(model, batch, [kl], plan_step([kl], info), step=0)
    g_alone = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    model = fresh(ckpt)
    model.set_attn_implementation({"text_config": "eager"})
    mixed = [SeedKLCriterion(weight=0.0, query_offset=-1), kl]
    m = train_step(model, batch, mixed, plan_step(mixed, info), step=0)
    g_mixed = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert m["loss/kl"] == pytest.approx(alone["loss/kl"], rel=1e-5)
    assert torch.allclose(g_mixed, g_alone, atol=1e-6)  # seed_kl has weight 0: the gradient is kl's alone

    model = fresh(ckpt)
    last = fit(model, [LMCriterion(), SeedKLCriterion(), KLCriterion()], lambda epoch: iter([batch]), None,
               FitConfig(max_steps=2, eval_every=2))  # fmt: skip
    assert last["train/loss/kl"] > 0 and last["train/loss/seed_kl"] > 0


def test_cal_blind_forward_is_deterministic_in_train_mode(setup):
    """LoRA dropout must not reach the image-blind forward: two of them agree, and train mode is restored."""
    from raysal.criteria.cal import blind_logits
    from raysal.criteria.inputs import CriterionInputs

    ckpt, batch = setup
    torch.manual_seed(0)
    model = apply_lora(load_model(str(ckpt), dtype="float32"), rank=4, targets="qkvo", dropout=0.5)
    enable_capture(model)
    with torch.no_grad():  # a fresh adapter's B is zero, which would hide the dropout inside it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.train()
    model.base_model.model.model.vision_tower.eval()  # a mixed state must come back as it was
    noisy = [model(**model_inputs(batch)).logits for _ in range(2)]
    assert not torch.allclose(noisy[0], noisy[1]), "dropout 0.5 in train mode must make plain forwards differ"
    a, b = blind_logits(model, batch), blind_logits(model, batch)
    assert torch.equal(a, b)
    assert model.training and not model.base_model.model.model.vision_tower.training
    assert any(m.training for m in model.modules() if isinstance(m, torch.nn.Dropout))
    info = model_info(model)
    x = CriterionInputs(batch, noisy[0].detach(), None, info.n_layers, info.n_heads, model=model)
    assert CALCriterion()(x) == CALCriterion()(x)
