"""Grounding metrics (raysal.metrics.grounding) against hand-computed values and a naive per-token reference."""

from __future__ import annotations

import math

import pytest
import torch

from raysal.metrics.grounding import GroundingMeter, GroundingScores, aggregate, token_scores

TOL = 1e-9
NAN = float("nan")


def scores_of(p: list[float], r: list[float], valid: list[bool] | None = None, theta: float = 0.5) -> dict[str, float]:
    """Score a single token given as Python lists; returns plain floats."""
    sal = torch.tensor([p], dtype=torch.float64)
    reg = torch.tensor([r], dtype=torch.float64)
    val = None if valid is None else torch.tensor([valid])
    s = token_scores(sal, reg, val, theta=theta)
    return {name: float(t[0]) for name, t in s.as_dict().items()}


def assert_close(got: float, want: float, tol: float = TOL) -> None:
    if math.isnan(want):
        assert math.isnan(got), f"expected NaN, got {got}"
    else:
        assert abs(got - want) <= tol, f"expected {want}, got {got}"


# ---------------------------------------------------------------------------------------------------------------
# Hand-computed single tokens
# ---------------------------------------------------------------------------------------------------------------


def test_hand_example_i4_good_map():
    # p = [.4, .3, .2, .1], r = [1, .6, .2, 0], theta .5 -> m = [1, 1, 0, 0]
    # AMR: Σpr = .4 + .18 + .04 = .62; Σr/|I| = 1.8/4 = .45; AMR = .62/.45 = 62/45
    # AP: ranking 0,1,2,3; positives at ranks 1, 2, precision 1 each -> 1
    # NSS: mean .25, deviations [.15, .05, -.05, -.15], var = .05/4 = .0125, std = sqrt(1/80);
    #      positives' mean deviation .1 -> .1 * sqrt(80) = 2/sqrt(5)
    # Pointing: argmax token 0 is positive -> 1
    s = scores_of([0.4, 0.3, 0.2, 0.1], [1.0, 0.6, 0.2, 0.0])
    assert_close(s["amr"], 62 / 45)
    assert_close(s["ap"], 1.0)
    assert_close(s["nss"], 2 / math.sqrt(5))
    assert_close(s["pointing"], 1.0)


def test_hand_example_i6_with_tie():
    # p = [.05, .30, .10, .25, .20, .10] (sums to 1), r = [1, 0, .5, .8, .3, 0] -> m = [1, 0, 1, 1, 0, 0]
    # (r = .5 counts: m = [r >= theta]).
    # AMR: Σpr = .05 + .05 + .20 + .06 = .36; Σr/|I| = 2.6/6; AMR = .36 * 6 / 2.6 = 54/65
    # AP, ranking: 1 (.30, neg), 3 (.25, pos), 4 (.20, neg), {2, 5} (.10 tied: pos, neg), 0 (.05, pos)
    #   token 3: rank 2, 1 tp -> 1/2
    #   token 2: tie group {2, 5} ends at rank 5 with 2 tp -> 2/5   (stable by index would give 2/4)
    #   token 0: rank 6, 3 tp -> 1/2
    #   AP = (1/2 + 2/5 + 1/2) / 3 = 7/15
    # NSS: in 60ths p = [3, 18, 6, 15, 12, 6], mean 10 -> deviations [-7, 8, -4, 5, 2, -4]/60;
    #   Σ dev² = 174/3600, var = 174/21600, std = sqrt(29)/60; positives (0, 2, 3) mean dev = -6/3/60 = -2/60
    #   NSS = -2/sqrt(29)
    # Pointing: argmax token 1 is negative -> 0
    s = scores_of([0.05, 0.30, 0.10, 0.25, 0.20, 0.10], [1.0, 0.0, 0.5, 0.8, 0.3, 0.0])
    assert_close(s["amr"], 54 / 65)
    assert_close(s["ap"], 7 / 15)
    assert_close(s["nss"], -2 / math.sqrt(29))
    assert_close(s["pointing"], 0.0)


def test_ap_tie_rule_is_order_independent():
    # The tie rule groups equal scores: permuting tokens (p and r together) must not change AP or pointing.
    p = [0.05, 0.30, 0.10, 0.25, 0.20, 0.10]
    r = [1.0, 0.0, 0.5, 0.8, 0.3, 0.0]
    for perm in ([5, 4, 3, 2, 1, 0], [2, 5, 0, 1, 3, 4], [5, 2, 1, 0, 4, 3]):
        s = scores_of([p[i] for i in perm], [r[i] for i in perm])
        assert_close(s["ap"], 7 / 15)
        assert_close(s["pointing"], 0.0)
        assert_close(s["amr"], 54 / 65)
        assert_close(s["nss"], -2 / math.sqrt(29))


def test_ap_tie_group_hand_values():
    # p = [.4, .2, .2, .2], m = [0, 1, 0, 1]: group {1, 2, 3} ends at rank 4 with 2 tp -> both positives get 2/4.
    # AP = 1/2 whatever the order inside the group (stable-by-index would give (1/2 + 2/4)/2 = 1/2 too, so
    # also check m = [0, 0, 1, 1]: grouped 1/2, stable-by-index would give (1/3 + 2/4)/2 = 5/12).
    assert_close(scores_of([0.4, 0.2, 0.2, 0.2], [0.0, 1.0, 0.0, 1.0])["ap"], 0.5)
    assert_close(scores_of([0.4, 0.2, 0.2, 0.2], [0.0, 0.0, 1.0, 1.0])["ap"], 0.5)
    # Max tied between a positive and a negative: pointing = fraction of positives among the maxima = 1/2.
    # p = [.3, .3, .2, .2], r = [1, 0, 0, 0]: AP: group {0, 1} ends at rank 2 with 1 tp -> 1/2.
    s = scores_of([0.3, 0.3, 0.2, 0.2], [1.0, 0.0, 0.0, 0.0])
    assert_close(s["pointing"], 0.5)
    assert_close(s["ap"], 0.5)


def test_uniform_saliency_is_chance():
    # Uniform p: AMR = (Σr/|I|)/(Σr/|I|) = 1; one tie group -> AP = prevalence; pointing = prevalence among maxima;
    # std = 0 -> NSS NaN.  r = [1, .7, .2, 0, 0, .1]: m = [1, 1, 0, 0, 0, 0] -> AP = pointing = 2/6.
    s = scores_of([1 / 6] * 6, [1.0, 0.7, 0.2, 0.0, 0.0, 0.1])
    assert_close(s["amr"], 1.0)
    assert_close(s["ap"], 2 / 6)
    assert_close(s["pointing"], 2 / 6)
    assert_close(s["nss"], NAN)
    # Unnormalised constant (e.g. 0.1 each, whose sum is not exactly 1 in floating point) is still exactly constant.
    s = scores_of([0.1] * 10, [1.0] * 3 + [0.0] * 7)
    assert_close(s["amr"], 1.0)
    assert_close(s["nss"], NAN)


def test_perfect_map():
    # p ∝ r: AMR = (Σr²/Σr) / (Σr/|I|) = |I|·Σr²/(Σr)².
    # r = [1, .5, 0, 0, 0, .5]: Σr = 2, Σr² = 1.5, |I| = 6 -> AMR = 6·1.5/4 = 2.25.
    # m = [1, 1, 0, 0, 0, 1]; ranking 0, {1, 5}, {2, 3, 4}: precisions 1, 3/3, 3/3 -> AP = 1; pointing 1.
    # NSS: p in 12ths = [6, 3, 0, 0, 0, 3], mean 2 -> dev [4, 1, -2, -2, -2, 1]/12, Σdev² = 30/144,
    #   std = sqrt(5)/12; positives' mean dev = 2/12 -> NSS = 2/sqrt(5).
    r = [1.0, 0.5, 0.0, 0.0, 0.0, 0.5]
    s = scores_of([x / 2 for x in r], r)
    assert_close(s["amr"], 2.25)
    assert_close(s["ap"], 1.0)
    assert_close(s["pointing"], 1.0)
    assert_close(s["nss"], 2 / math.sqrt(5))
    # Binary region: AMR = |I|/Σr = 1/(covered fraction). 2 of 8 tokens -> 4.
    s = scores_of([0, 0.5, 0, 0, 0, 0, 0.5, 0], [0, 1, 0, 0, 0, 0, 1, 0])
    assert_close(s["amr"], 4.0)
    assert_close(s["ap"], 1.0)
    assert_close(s["pointing"], 1.0)


def test_theta():
    # r = [.4, .9, 0, 0], p = [.7, .1, .1, .1]: theta .5 -> m = [0, 1, 0, 0]: group {1, 2, 3} ends at rank 4 with
    # 1 tp -> AP 1/4, pointing 0. theta .3 -> m = [1, 1, 0, 0]: AP = (1 + 2/4)/2 = 3/4, pointing 1.
    p, r = [0.7, 0.1, 0.1, 0.1], [0.4, 0.9, 0.0, 0.0]
    s = scores_of(p, r)
    assert_close(s["ap"], 0.25)
    assert_close(s["pointing"], 0.0)
    s = scores_of(p, r, theta=0.3)
    assert_close(s["ap"], 0.75)
    assert_close(s["pointing"], 1.0)
    # AMR does not depend on theta: Σpr = .28 + .09 = .37, Σr/|I| = 1.3/4 -> .37·4/1.3 = 148/130
    assert_close(s["amr"], 148 / 130)


# ---------------------------------------------------------------------------------------------------------------
# NaN handling
# ---------------------------------------------------------------------------------------------------------------


def test_no_positive_region_below_theta():
    # r = [.4, .2, 0, 0]: Σr > 0 so AMR is defined, but no m = 1 -> AP, NSS, pointing NaN.
    # AMR: p = [.1, .2, .3, .4], Σpr = .04 + .04 = .08, Σr/|I| = .6/4 = .15 -> 8/15
    s = scores_of([0.1, 0.2, 0.3, 0.4], [0.4, 0.2, 0.0, 0.0])
    assert_close(s["amr"], 8 / 15)
    for name in ("ap", "nss", "pointing"):
        assert_close(s[name], NAN)


def test_zero_region_all_nan():
    s = scores_of([0.1, 0.2, 0.3, 0.4], [0.0] * 4)
    for name in ("amr", "ap", "nss", "pointing"):
        assert_close(s[name], NAN)


def test_zero_saliency_or_no_valid_token_all_nan():
    s = scores_of([0.0] * 4, [1.0, 0.0, 0.0, 0.0])
    assert all(math.isnan(v) for v in s.values())
    s = scores_of([0.1] * 4, [1.0] * 4, valid=[False] * 4)
    assert all(math.isnan(v) for v in s.values())


def test_nan_only_in_its_own_row():
    sal = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    reg = torch.tensor([[1.0, 0.6, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    s = token_scores(sal, reg)
    assert_close(float(s.amr[0]), 62 / 45)
    assert_close(float(s.nss[0]), 2 / math.sqrt(5))
    assert all(math.isnan(float(t[1])) for t in s.as_dict().values())


def test_empty_batch():
    s = token_scores(torch.zeros(0, 7), torch.zeros(0, 7))
    for t in s.as_dict().values():
        assert t.shape == (0,)
        assert t.dtype == torch.float64
    out = aggregate(s, torch.zeros(0, dtype=torch.long))
    assert set(out) == {"amr", "ap", "nss", "pointing"}
    assert all(math.isnan(v) for v in out.values())
    meter = GroundingMeter()
    assert all(math.isnan(v) for v in meter.compute().values())
    meter.update(torch.zeros(0, 7), torch.zeros(0, 7), None, torch.zeros(0, dtype=torch.long))
    assert all(math.isnan(v) for v in meter.compute().values())


def test_shape_errors():
    with pytest.raises(ValueError):
        token_scores(torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError):
        token_scores(torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(2, 4))  # not bool
    with pytest.raises(ValueError):
        aggregate(token_scores(torch.rand(2, 4), torch.rand(2, 4)), torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------
# Invariances: padding and scale
# ---------------------------------------------------------------------------------------------------------------


def test_padding_does_not_change_results():
    p = [0.05, 0.30, 0.10, 0.25, 0.20, 0.10]
    r = [1.0, 0.0, 0.5, 0.8, 0.3, 0.0]
    # Interleave 3 padded positions holding garbage that would dominate if counted (huge saliency, full region).
    slots = [0, 1, None, 2, 3, None, 4, None, 5]
    p_pad = [p[k] if k is not None else 9.0 for k in slots]
    r_pad = [r[k] if k is not None else 1.0 for k in slots]
    valid = [k is not None for k in slots]
    want = scores_of(p, r)
    got = scores_of(p_pad, r_pad, valid=valid)
    for name in want:
        assert_close(got[name], want[name])
    # Also in a batch with a row of a different (smaller) image, padded at the end.
    sal = torch.tensor([p_pad, [0.4, 0.3, 0.2, 0.1, 0.0, 5.0, 5.0, 5.0, 5.0]], dtype=torch.float64)
    reg = torch.tensor([r_pad, [1.0, 0.6, 0.2, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    val = torch.tensor([valid, [True] * 4 + [False] * 5])
    s = token_scores(sal, reg, val)
    for name in want:
        assert_close(float(getattr(s, name)[0]), want[name])
    assert_close(float(s.amr[1]), 62 / 45)
    assert_close(float(s.ap[1]), 1.0)
    assert_close(float(s.nss[1]), 2 / math.sqrt(5))
    assert_close(float(s.pointing[1]), 1.0)


def test_scaling_saliency_changes_nothing():
    g = torch.Generator().manual_seed(0)
    sal = torch.rand(20, 12, generator=g, dtype=torch.float64)
    reg = torch.rand(20, 12, generator=g, dtype=torch.float64)
    base = token_scores(sal, reg)
    for c in (1e-6, 0.37, 3.0, 1e4):
        scaled = token_scores(sal * c, reg)
        for name, t in base.as_dict().items():
            torch.testing.assert_close(getattr(scaled, name), t, atol=1e-9, rtol=0, equal_nan=True)


def test_float32_input_is_computed_in_float64():
    g = torch.Generator().manual_seed(1)
    sal = torch.rand(8, 10, generator=g)
    reg = torch.rand(8, 10, generator=g)
    s32 = token_scores(sal, reg)
    s64 = token_scores(sal.double(), reg.double())
    for name, t in s64.as_dict().items():
        assert getattr(s32, name).dtype == torch.float64
        torch.testing.assert_close(getattr(s32, name), t, atol=0, rtol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------------
# Aggregation and the meter
# ---------------------------------------------------------------------------------------------------------------


def test_aggregate_per_image_then_mean():
    nan = NAN
    scores = GroundingScores(
        amr=torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64),
        ap=torch.tensor([nan, 0.5, 1.0, nan], dtype=torch.float64),
        nss=torch.tensor([nan, nan, nan, nan], dtype=torch.float64),
        pointing=torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64),
    )
    image_index = torch.tensor([7, 7, 7, 123456])  # any ids; only equality matters
    out = aggregate(scores, image_index)
    # amr: image 7 -> (1+2+3)/3 = 2, image 123456 -> 10; mean over images 6 (per-token mean would be 4)
    assert_close(out["amr"], 6.0)
    # ap: image 7 -> nanmean(.5, 1) = .75, image 123456 all NaN -> left out -> .75 (not (.75 + 0)/2)
    assert_close(out["ap"], 0.75)
    # nss: no image has a value -> NaN
    assert_close(out["nss"], NAN)
    # pointing: image 7 -> 1/3, image 123456 -> 1 -> 2/3 (per-token mean would be 1/2)
    assert_close(out["pointing"], 2 / 3)


def test_aggregate_unsorted_ids():
    scores = GroundingScores(*(torch.tensor([1.0, 5.0, 3.0, 4.0], dtype=torch.float64) for _ in range(4)))
    # image 2: tokens 0 and 2 -> 2; image 0: tokens 1 and 3 -> 4.5; mean 3.25
    out = aggregate(scores, torch.tensor([2, 0, 2, 0]))
    assert all(abs(v - 3.25) <= TOL for v in out.values())


def test_meter_two_batches_equals_one_call():
    g = torch.Generator().manual_seed(3)
    # Batch 1 from images with up to 6 tokens, batch 2 with up to 9; image 2 appears in both batches.
    sal1, reg1 = torch.rand(5, 6, generator=g), torch.rand(5, 6, generator=g)
    val1 = torch.ones(5, 6, dtype=torch.bool)
    val1[3:, 4:] = False
    ids1 = torch.tensor([0, 0, 1, 2, 2])
    sal2, reg2 = torch.rand(4, 9, generator=g), torch.rand(4, 9, generator=g)
    val2 = torch.rand(4, 9, generator=g) > 0.2
    ids2 = torch.tensor([2, 3, 3, 4])
    reg2[3] = 0.0  # image 4: its only token has no region -> NaN everywhere, left out of every metric

    meter = GroundingMeter()
    meter.update(sal1, reg1, val1, ids1)
    meter.update(sal2, reg2, val2, ids2)
    got = meter.compute()

    pad = torch.zeros(5, 3)
    sal = torch.cat([torch.cat([sal1, pad], 1), sal2])
    reg = torch.cat([torch.cat([reg1, pad], 1), reg2])
    val = torch.cat([torch.cat([val1, pad.bool()], 1), val2])
    want = aggregate(token_scores(sal, reg, val), torch.cat([ids1, ids2]))
    for name in want:
        assert_close(got[name], want[name], tol=1e-12)

    meter.reset()
    assert all(math.isnan(v) for v in meter.compute().values())


# ---------------------------------------------------------------------------------------------------------------
# Cross-check against a naive per-token reference on random inputs
# ---------------------------------------------------------------------------------------------------------------


def reference_token(p: list[float], r: list[float], valid: list[bool], theta: float) -> dict[str, float]:
    """Straight-from-the-definition loop over one token, plain Python floats."""
    idx = [i for i, v in enumerate(valid) if v]
    nan = {k: NAN for k in ("amr", "ap", "nss", "pointing")}
    mass = sum(p[i] for i in idx)
    if not idx or mass <= 0:
        return nan
    ps = [p[i] / mass for i in idx]
    rs = [r[i] for i in idx]
    ms = [x >= theta for x in rs]
    n = len(idx)
    out = dict(nan)
    if sum(rs) > 0:
        out["amr"] = (sum(a * b for a, b in zip(ps, rs, strict=True)) / sum(ps)) / (sum(rs) / n)
    pos = [k for k in range(n) if ms[k]]
    if not pos:
        return out
    raw = [p[i] for i in idx]  # rank on the raw values (as the metric does): ties are exact
    # Tie-grouped precision of a positive k: positives scoring >= it over everything scoring >= it.
    precisions = []
    for k in pos:
        above = [j for j in range(n) if raw[j] >= raw[k]]
        precisions.append(sum(ms[j] for j in above) / len(above))
    out["ap"] = sum(precisions) / len(pos)
    top = max(raw)
    maxima = [j for j in range(n) if raw[j] == top]
    out["pointing"] = sum(ms[j] for j in maxima) / len(maxima)
    if max(raw) > min(raw):
        mean = sum(ps) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in ps) / n)
        out["nss"] = sum((ps[k] - mean) / std for k in pos) / len(pos)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("theta", [0.5, 0.3])
def test_matches_naive_reference(seed: int, theta: float):
    g = torch.Generator().manual_seed(seed)
    n, n_tok = 64, 15
    sal = torch.rand(n, n_tok, generator=g, dtype=torch.float64)
    # Quantised rows create many exact ties (including at the maximum and across positives/negatives).
    sal[::3] = torch.randint(0, 4, (sal[::3].shape), generator=g).to(torch.float64)
    reg = torch.rand(n, n_tok, generator=g, dtype=torch.float64)
    reg[::4] = torch.randint(0, 3, (reg[::4].shape), generator=g).to(torch.float64) / 2  # exact 0, .5, 1
    reg[::7] *= 0.4  # no positive at theta .5
    reg[5] = 0.0  # no region
    sal[6] = 0.25  # constant saliency
    valid = torch.rand(n, n_tok, generator=g) > 0.25
    valid[::5] = True
    valid[9] = False  # no valid token
    got = token_scores(sal, reg, valid, theta=theta)
    for row in range(n):
        want = reference_token(sal[row].tolist(), reg[row].tolist(), valid[row].tolist(), theta)
        for name, value in want.items():
            assert_close(float(getattr(got, name)[row]), value, tol=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(4)
    sal = torch.rand(200, 576, generator=g)
    sal[::3] = torch.randint(0, 4, (sal[::3].shape), generator=g).float()
    reg = torch.rand(200, 576, generator=g)
    valid = torch.rand(200, 576, generator=g) > 0.1
    ids = torch.randint(0, 20, (200,), generator=g)
    cpu = token_scores(sal, reg, valid)
    gpu = token_scores(sal.cuda(), reg.cuda(), valid.cuda())
    for name, t in cpu.as_dict().items():
        assert getattr(gpu, name).device.type == "cuda"
        torch.testing.assert_close(getattr(gpu, name).cpu(), t, atol=1e-9, rtol=0, equal_nan=True)
    meter = GroundingMeter()
    meter.update(sal.cuda(), reg.cuda(), valid.cuda(), ids.cuda())
    want = aggregate(cpu, ids)
    for name, value in meter.compute().items():
        assert_close(value, want[name], tol=1e-9)
