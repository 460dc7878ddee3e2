"""Criteria on hand-built inputs: finite, minimal on a perfect map, gradients, masking, naive references."""

import math

import pytest
import torch

from raysal.attention.targets import GroundingTargets
from raysal.criteria.bce_dice import BCEDiceCriterion
from raysal.criteria.inputs import CriterionInputs
from raysal.criteria.kl import KLCriterion
from raysal.criteria.mass import MassCriterion
from raysal.criteria.mse import MSECriterion

B, T, I, N_LAYERS, N_HEADS = 2, 3, 6, 4, 4
CAPTURED_LAYERS, CAPTURED_HEADS = (2, 3), (0, 1, 2, 3)
ATTENTION = [KLCriterion, MSECriterion, MassCriterion, BCEDiceCriterion]


def make_targets() -> GroundingTargets:
    region = torch.tensor(
        [
            [[1, 1, 0.5, 0, 0, 0], [0, 0, 0, 1, 1, 0.2], [0, 0.6, 1, 0, 0, 0]],
            [[0, 1, 1, 0, 0, 0], [0.7, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0]],  # last token: padding slot
        ]
    )
    token_valid = torch.tensor([[True, True, True], [True, True, False]])
    key_valid = torch.tensor([[True] * 6, [True] * 5 + [False]])  # image 1 has one image token less
    region = region * key_valid[:, None, :]
    zeros = torch.zeros(B, T, dtype=torch.long)
    return GroundingTargets(zeros, zeros, token_valid, torch.zeros(B, I, dtype=torch.long), key_valid, region, 0)


def make_inputs(attention: torch.Tensor, targets: GroundingTargets) -> CriterionInputs:
    return CriterionInputs(
        batch={}, logits=torch.zeros(1), targets=targets, n_layers=N_LAYERS, n_heads=N_HEADS,
        image_attention=attention, captured_layers=CAPTURED_LAYERS, captured_heads=CAPTURED_HEADS,
    )  # fmt: skip


def random_attention(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # raw attention over image keys sums to < 1 (the rest goes to text keys): scale by 0.3
    att = torch.softmax(torch.randn(B, len(CAPTURED_LAYERS), N_HEADS, T, I, generator=g), -1) * 0.3
    return att.requires_grad_()


def perfect_attention(targets: GroundingTargets, binary: bool = False) -> torch.Tensor:
    r = (targets.region >= 0.5).float() if binary else targets.region
    g = r / r.sum(-1, keepdim=True).clamp_min(1e-8)
    return (0.4 * g)[:, None, None].expand(B, len(CAPTURED_LAYERS), N_HEADS, T, I).clone().requires_grad_()


def crit(cls, **kw):
    return cls(layers=[2, 3], heads="all", **kw)


@pytest.mark.parametrize("cls", ATTENTION)
def test_finite_scalar_with_gradients(cls):
    t = make_targets()
    att = random_attention()
    loss = crit(cls)(make_inputs(att, t))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert att.grad is not None and att.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", ATTENTION)
def test_perfect_map_is_the_minimum(cls):
    t = make_targets()
    binary = cls in (MassCriterion, BCEDiceCriterion)
    best = crit(cls)(make_inputs(perfect_attention(t, binary), t))
    for seed in range(5):
        assert best < crit(cls)(make_inputs(random_attention(seed), t))
    uniform = torch.full((B, len(CAPTURED_LAYERS), N_HEADS, T, I), 0.1)
    assert best < crit(cls)(make_inputs(uniform, t))
    if cls in (KLCriterion, MSECriterion):
        assert best.abs() < 1e-6
    if cls is MassCriterion:
        assert best.abs() < 1e-5  # −log(ε + 1)


@pytest.mark.parametrize("cls", ATTENTION)
def test_padded_tokens_and_keys_are_ignored(cls):
    t = make_targets()
    att = random_attention().detach()
    base = crit(cls)(make_inputs(att, t))
    changed = att.clone()
    changed[1, :, :, 2] = torch.rand(len(CAPTURED_LAYERS), N_HEADS, I)  # the padding token slot
    changed[1, ..., 5] = 0.9  # the padded image token
    assert torch.allclose(crit(cls)(make_inputs(changed, t)), base, atol=1e-7)
    # heads/layers outside the criterion's selection do not matter either
    only_first = KLCriterion(layers=[2], heads=[0, 1])
    other = att.clone()
    other[:, 1] = torch.rand_like(other[:, 1])
    other[:, :, 2:] = torch.rand_like(other[:, :, 2:])
    assert torch.allclose(only_first(make_inputs(other, t)), only_first(make_inputs(att, t)))


def naive(cls, att, t, **kw):
    """Per image, per token reference written with Python loops (DESIGN §4)."""
    layers = [CAPTURED_LAYERS.index(i) for i in (2, 3)]
    per_image = []
    for b in range(B):
        keys = [i for i in range(I) if t.key_valid[b, i]]
        vals = []
        for tok in range(T):
            if not t.token_valid[b, tok]:
                continue
            p = torch.stack([att[b, li, :, tok].mean(0) for li in layers])[:, keys]  # (ℓ, I_b)
            p = (p / p.sum(-1, keepdim=True)).mean(0)
            r = t.region[b, tok, keys]
            g = r / r.sum()
            m = (r >= 0.5).float()
            if cls is KLCriterion:
                v = sum(g[i] * (math.log(g[i] + 1e-8) - math.log(p[i] + 1e-8)) for i in range(len(keys)))
            elif cls is MSECriterion:
                v = sum((p[i] - g[i]) ** 2 for i in range(len(keys)))
            elif cls is MassCriterion:
                if m.sum() == 0:
                    continue
                v = -math.log(1e-6 + float((m * p).sum()))
            else:
                z = torch.log(p + 1e-8) + math.log(len(keys))
                bce = torch.nn.functional.binary_cross_entropy_with_logits(z, m)
                s = torch.sigmoid(z)
                dice = (2 * (s * m).sum() + 1e-8) / (s.sum() + m.sum() + 1e-8)
                v = 2.0 * bce + 0.5 * (1 - dice)
            vals.append(float(v))
        if vals:
            per_image.append(sum(vals) / len(vals))
    return sum(per_image) / len(per_image)


@pytest.mark.parametrize("cls", ATTENTION)
def test_equals_naive_reference(cls):
    t = make_targets()
    att = random_attention(3).detach()
    assert float(crit(cls)(make_inputs(att, t))) == pytest.approx(naive(cls, att, t), rel=1e-5, abs=1e-6)


def test_per_layer_and_smoothing_knobs():
    t = make_targets()
    att = random_attention(4).detach()
    mean_map = crit(KLCriterion)(make_inputs(att, t))
    per_layer = crit(KLCriterion, per_layer=True)(make_inputs(att, t))
    assert per_layer >= mean_map - 1e-6  # KL is convex: the mean of per-layer KLs ≥ KL of the mean map
    smooth = crit(KLCriterion, smoothing=0.1)(make_inputs(perfect_attention(t), t))
    assert smooth > 1e-4  # the smoothed target is no longer the (sharp) perfect map


def test_ungrounded_batch_contributes_zero_with_a_graph():
    t = make_targets()
    t.token_valid[:] = False
    att = random_attention()
    loss = crit(KLCriterion)(make_inputs(att, t))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
