"""The paired bootstrap (issue 30): against scipy's own paired bootstrap, against hand counts, its point estimates
against the reported metrics, and its 95 % intervals covering a known truth about 95 % of the time."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from raysal.metrics.paired import comparable, compare, metric_under_weights, resample_counts
from raysal.metrics.records import ItemRecords, grounding_metrics, pope_metrics_of, readout_metrics


def images_table(values: dict[str, np.ndarray], lm: np.ndarray | None = None) -> ItemRecords:
    n = len(next(iter(values.values())))
    r = ItemRecords()
    lm = np.full(n, 2.0) if lm is None else lm
    r.add("images", [{"image_id": 100 + i, "lm_sum": float(lm[i]) * 10, "lm_n": 10, "tokens": 3,
                      **{m: float(values.get(m, np.full(n, 0.5))[i]) for m in ("amr", "ap", "nss", "pointing")}}
                     for i in range(n)])  # fmt: skip
    return r


def test_matches_scipys_paired_bootstrap():
    rng = np.random.default_rng(3)
    control = rng.uniform(0.2, 0.8, 80)
    trial = control + 0.03 + rng.normal(0, 0.05, 80)
    got = compare(images_table({"ap": trial}), images_table({"ap": control}), "val/ap", resamples=20000)
    ref = stats.bootstrap((trial, control), lambda t, c: t.mean() - c.mean(), paired=True, vectorized=False,
                          n_resamples=20000, method="percentile", random_state=1).confidence_interval  # fmt: skip
    width = ref.high - ref.low
    assert got.kind == "difference" and got.estimate == pytest.approx(trial.mean() - control.mean(), abs=1e-12)
    assert abs(got.lo - ref.low) < 0.05 * width and abs(got.hi - ref.high) < 0.05 * width, (got, ref)
    ratio = compare(images_table({"amr": trial}), images_table({"amr": control}), "val/amr", resamples=20000)
    ref = stats.bootstrap((trial, control), lambda t, c: t.mean() / c.mean(), paired=True, vectorized=False,
                          n_resamples=20000, method="percentile", random_state=1).confidence_interval  # fmt: skip
    assert ratio.kind == "ratio" and abs(ratio.lo - ref.low) < 0.05 * (ref.high - ref.low)


def test_hand_counts_on_two_images():
    """Image 1: a yes-question answered yes (TP) and a no-question answered yes (FP); image 2: a yes answered no
    (FN) and a no answered no (TN). Drawing image 1 twice: TP 2, FP 2 → F1 2·2/(4+2) = 2/3, FPR 1."""
    r = ItemRecords()
    r.add("pope", [{"image_id": 1, "setting": "adversarial", "label": True, "p_yes": 0.9, "mass": 1.0},
                   {"image_id": 1, "setting": "adversarial", "label": False, "p_yes": 0.8, "mass": 1.0},
                   {"image_id": 2, "setting": "adversarial", "label": True, "p_yes": 0.1, "mass": 1.0},
                   {"image_id": 2, "setting": "adversarial", "label": False, "p_yes": 0.2, "mass": 1.0}])  # fmt: skip
    W = np.array([[1.0, 1.0], [2.0, 0.0], [0.0, 2.0]])
    f1 = metric_under_weights(r, "val/pope/adversarial/f1", [1, 2], W)
    fpr = metric_under_weights(r, "val/pope/adversarial/fpr", [1, 2], W)
    assert f1[0] == pytest.approx(0.5) and f1[1] == pytest.approx(2 / 3) and f1[2] == pytest.approx(0.0)
    assert fpr[0] == pytest.approx(0.5) and fpr[1] == pytest.approx(1.0) and fpr[2] == pytest.approx(0.0)
    counts = resample_counts(5, 100, seed=4)
    assert counts.shape == (101, 5) and (counts[0] == 1).all() and (counts.sum(1) == 5).all()
    assert (resample_counts(5, 100, seed=4) == counts).all()  # seeded: every trial gets the same resamples


def test_point_estimates_are_the_reported_metrics():
    rng = np.random.default_rng(0)
    r = images_table({m: rng.uniform(0, 2, 12) for m in ("amr", "ap", "nss", "pointing")}, rng.uniform(1, 3, 12))
    r.images["amr"][3] = math.nan  # an image where AMR is undefined is left out of it, as in the report
    rows = []
    for i in range(12):
        for s in ("random", "popular", "adversarial"):
            for label in (True, False):
                rows.append({"image_id": 100 + i, "setting": s, "label": label, "p_yes": float(rng.uniform()),
                             "mass": float(rng.uniform(0.5, 1))})  # fmt: skip
    r.add("pope", rows)
    r.add("readout", [{"image_id": 100 + i, "iou": float(rng.uniform())} for i in range(12) for _ in range(2)])
    reported = {**grounding_metrics(r.images), **pope_metrics_of(r.pope), **readout_metrics(r.readout)}
    ids = list(range(100, 112))
    for name, value in reported.items():
        metric = f"val/{name}"
        if comparable(metric):
            got = metric_under_weights(r, metric, ids, np.ones((1, 12)))[0]
            assert got == pytest.approx(value, rel=1e-12, abs=1e-12), metric
    assert not comparable("val/pope/adversarial/n") and not comparable("val/images")


def test_intervals_cover_a_known_truth_about_95_percent_of_the_time():
    """Images drawn from a population where the trial's AP is the control's + 0.02 on average: over 300 searches
    of 64 images each, the 95 % interval holds 0.02 in 91–98 % of them."""
    rng = np.random.default_rng(11)
    hits = 0
    for _ in range(300):
        control = rng.beta(2, 3, 64)
        trial = control + 0.02 + rng.normal(0, 0.08, 64)
        c = compare(images_table({"ap": trial}), images_table({"ap": control}), "val/ap", resamples=1000)
        hits += c.lo <= 0.02 <= c.hi
    assert 0.91 <= hits / 300 <= 0.98, hits


def test_only_shared_images_are_compared_and_none_is_an_error():
    a = images_table({"ap": np.linspace(0, 1, 6)})
    b = ItemRecords()
    b.add("images", a.rows("images")[2:])
    assert compare(a, b, "val/ap").images == 4
    with pytest.raises(ValueError, match="share no evaluated image for val/rec_acc50"):
        compare(a, b, "val/rec_acc50")
    with pytest.raises(ValueError, match="not computed from per-item records"):
        compare(a, b, "val/pope/random/n")


def test_a_metric_undefined_on_a_few_resamples_keeps_its_interval_and_on_many_has_none():
    """FPR needs an absent thing: with absent things asked about on 2 of 3 images, 1/27 of the resamples draw none
    (the interval is over the others); with them on 1 image of 3, 8/27 do (no interval: the trial cannot pass)."""

    def pope(negative_images):
        r = ItemRecords()
        r.add("pope", [{"image_id": i, "setting": "adversarial", "label": lab, "p_yes": 0.2, "mass": 1.0}
                       for i in range(3) for lab in ([True, False] if i in negative_images else [True])])  # fmt: skip
        return r

    ok = compare(pope({0, 1}), pope({0, 1}), "val/pope/adversarial/fpr")
    assert (ok.lo, ok.hi) == (0.0, 0.0)
    none = compare(pope({0}), pope({0}), "val/pope/adversarial/fpr")
    assert math.isnan(none.lo) and math.isnan(none.hi) and none.estimate == 0.0
