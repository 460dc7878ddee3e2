"""The confirmation's decision (`raysal.search.decision`): a finalist is confirmed only if its objective beats its
matched control, the LM rule holds and every guard passes at its margin, pooled over seeds; harms are named; Holm
over several finalists; and a whole search of trials each truly worse by the margin rarely ends confirmed."""

from __future__ import annotations

import numpy as np
import pytest

from raysal.metrics.records import ItemRecords
from raysal.search.control import choose_best
from raysal.search.decision import conditions, decide, holm
from raysal.search.guards import Guard
from raysal.search.optuna_params import CONTROL_KEY

F1, FPR = "val/pope/adversarial/f1", "val/pope/adversarial/fpr"
GUARDS = (Guard(F1, 0.03), Guard(FPR, 0.05))


def model(rng: np.random.Generator, images: int, *, amr: float, acc: float = 0.83, absent_worse: float = 0.0,
          lm: float = 2.0, first_id: int = 0) -> ItemRecords:  # fmt: skip
    """One evaluated model: per image an AMR around ``amr`` and an LM loss ``lm``; 3 present and 3 absent things
    asked, answered right with probability ``acc`` (absent ones ``acc − absent_worse``: more "yes" to absent
    things, a higher FPR)."""
    r = ItemRecords()
    ids = range(first_id, first_id + images)
    r.add("images", [{"image_id": i, "lm_sum": lm * 10 * float(rng.uniform(0.9, 1.1)), "lm_n": 10, "tokens": 3,
                      "amr": float(amr * rng.uniform(0.8, 1.2)), "ap": 0.5, "nss": 0.5, "pointing": 0.5}
                     for i in ids])  # fmt: skip
    rows = []
    for i in ids:
        for label in (True,) * 3 + (False,) * 3:
            right = rng.uniform() < (acc if label else acc - absent_worse)
            rows.append({"image_id": i, "setting": "adversarial", "label": label,
                         "p_yes": 0.9 if right == label else 0.1, "mass": 1.0})  # fmt: skip
    r.add("pope", rows)
    return r


def test_a_finalist_that_grounds_better_and_keeps_the_rest_is_confirmed_and_one_that_hallucinates_is_not():
    rng = np.random.default_rng(0)
    # a model right 95 % of the time: 300 images × 3 seeds resolve the 0.03 / 0.05 margins (at 83 %, ~1,000 images)
    good = [(model(rng, 300, amr=3.0, acc=0.95), model(rng, 300, amr=2.0, acc=0.95)) for _ in range(3)]
    got = conditions(good, "val/amr", "max", 0.02, GUARDS)
    assert got["failed"] == [] and got["p"] <= 0.025 and got["seeds"] == 3 and got["images"] == 300
    assert got["comparisons"]["val/amr"]["lo"] > 1.3 and got["harms"] == []
    bad = [
        (model(rng, 300, amr=3.0, acc=0.95, absent_worse=0.15), model(rng, 300, amr=2.0, acc=0.95)) for _ in range(3)
    ]
    got = conditions(bad, "val/amr", "max", 0.02, GUARDS)
    assert FPR in got["harms"] and any(r.startswith(f"{FPR} +0.1") and "margin" in r for r in got["failed"])
    alone = decide({"good": conditions(good, "val/amr", "max", 0.02, GUARDS)})["good"]
    assert alone["confirmed"] and alone["why"] == "every condition holds" and alone["correction"] is None
    two = decide({"good": conditions(good, "val/amr", "max", 0.02, GUARDS), "bad": got})
    assert not two["bad"]["confirmed"] and two["bad"]["correction"] == "holm"
    assert "not shown within the 0.05 margin" in two["bad"]["why"]


def test_no_gain_or_a_worse_language_is_not_confirmed_with_its_reason():
    rng = np.random.default_rng(1)
    flat = [(model(rng, 200, amr=2.0), model(rng, 200, amr=2.0)) for _ in range(2)]
    got = conditions(flat, "val/amr", "max", 0.02, GUARDS)
    assert any(r.startswith("val/amr") and "not shown above it" in r for r in got["failed"])
    wordy = [(model(rng, 200, amr=3.0, lm=2.2), model(rng, 200, amr=2.0)) for _ in range(2)]
    got = conditions(wordy, "val/amr", "max", 0.02, GUARDS)
    assert "val/lm_loss" in got["harms"] and any("+2% tolerance" in r for r in got["failed"])


def test_holm_steps_down():
    assert holm({"a": 0.001, "b": 0.02, "c": 0.5}, 0.025) == {"a": True, "b": False, "c": False}
    assert holm({"a": 0.01, "b": 0.012}, 0.025) == {"a": True, "b": True}  # 0.01 ≤ 0.0125, then 0.012 ≤ 0.025
    assert holm({"a": float("nan")}) == {"a": False}


@pytest.mark.parametrize("searches", [40])
def test_a_search_of_16_trials_each_worse_by_the_margin_rarely_ends_confirmed(searches):
    """Sixteen trials that all ground better (AMR 1.5× the control's) but each says "yes" to absent things more
    often by exactly the FPR margin: the search screens them on its 64 POPE images at its screening margins
    (0.10 / 0.13: most pass, and selection favours the luckiest), its best is confirmed over 3 seeds × 300
    fresh images against matched controls at the margins that matter. A confirmed winner in ≤ 5 % of searches
    (each condition's level is 2.5 %; the screening alone lets a finalist through in ~75 % of them)."""
    rng = np.random.default_rng(7)
    screening = (Guard(F1, 0.10), Guard(FPR, 0.13))
    confirmed = screened = 0
    for _ in range(searches):
        control = model(rng, 64, amr=2.0)
        rows = [{"trial_id": "c", "metrics": {}, "config": {CONTROL_KEY: True}}]
        records = {"c": control}
        for t in range(16):
            records[f"t{t}"] = model(rng, 64, amr=3.0, absent_worse=0.05)
            rows.append({"trial_id": f"t{t}", "metrics": {}, "config": {}})
        for r in rows:  # the reported metrics, from the records
            mine = records[r["trial_id"]]
            from raysal.metrics.records import grounding_metrics, pope_metrics_of

            r["metrics"] = {f"val/{k}": v for k, v in {**grounding_metrics(mine.images),
                                                       **pope_metrics_of(mine.pope)}.items()}  # fmt: skip
        best, decision = choose_best(rows, "val/amr", "max", 0.02, screening, records)
        if not decision["finalists"]:
            continue
        screened += 1
        pairs = [(model(rng, 300, amr=3.0, absent_worse=0.05 + rng.normal(0, 0.01), first_id=1000),
                  model(rng, 300, amr=2.0, first_id=1000)) for _ in range(3)]  # fmt: skip
        confirmed += decide({best["trial_id"]: conditions(pairs, "val/amr", "max", 0.02, GUARDS)})[
            best["trial_id"]]["confirmed"]  # fmt: skip
    assert screened >= 0.6 * searches, screened  # the screening lets a finalist through in most searches
    assert confirmed <= 0.05 * searches, confirmed
