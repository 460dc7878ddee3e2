"""How often a POPE guard passes an equally good trial and fails a worse one, at a given POPE size and margin: the
power calculation behind the margins in search_spaces/*.yaml (docs/verdict.md).

The simulation (the model of issue 30): every question has a difficulty, the probability that a model answers it
right, drawn from Beta(acc·κ, (1 − acc)·κ) (mean ``acc``; κ → ∞: every question equally hard, i.e. the two models'
errors independent — the least favourable case for a paired comparison). The control and the trial answer
independently given the difficulty; a trial worse by δ answers each question right with probability p − δ. Per
image 3 present things (yes) and 3 absent ones (no) per setting, as raysal's POPE set. Each simulated search goes
through raysal's own decision: `raysal.metrics.paired.compare` (the paired bootstrap, B = 2000) and
`raysal.search.guards.Guard.passes` (the interval's harmful bound within the margin).

    python scripts/guard_power.py --out docs/guard_power.json      # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from raysal.metrics.paired import compare
from raysal.metrics.records import ItemRecords
from raysal.search.guards import Guard

SETTING = "adversarial"


def answers(rng: np.random.Generator, p_right: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """p(yes) of one model: 0.9 for a yes, 0.1 for a no; right with probability ``p_right`` (per question)."""
    right = rng.uniform(size=p_right.shape) < p_right
    says_yes = np.where(right, labels, ~labels)
    return np.where(says_yes, 0.9, 0.1)


def records(image_ids: np.ndarray, labels: np.ndarray, p_yes: np.ndarray) -> ItemRecords:
    r = ItemRecords()
    r.add("pope", [{"image_id": int(i), "setting": SETTING, "label": bool(y), "p_yes": float(p), "mass": 1.0}
                   for i, y, p in zip(image_ids, labels, p_yes, strict=True)])  # fmt: skip
    return r


def simulate(
    rng: np.random.Generator, *, images: int, acc: float, kappa: float, worse: float, guards: list[Guard], reps: int
) -> dict[str, float]:
    """→ {guard metric: fraction of the ``reps`` simulated searches in which the trial passed it}."""
    per = 3
    image_ids = np.repeat(np.arange(images), 2 * per)  # (Q,)
    labels = np.tile(np.r_[np.ones(per, bool), np.zeros(per, bool)], images)  # (Q,)
    passed = dict.fromkeys((g.metric for g in guards), 0)
    for _ in range(reps):
        if math.isinf(kappa):
            p = np.full(len(labels), acc)
        else:
            p = rng.beta(acc * kappa, (1 - acc) * kappa, size=len(labels))
        control = records(image_ids, labels, answers(rng, p, labels))
        trial = records(image_ids, labels, answers(rng, np.clip(p - worse, 0, 1), labels))
        for g in guards:
            c = compare(trial, control, g.metric)
            passed[g.metric] += g.passes(c.trial, c.control, c)
    return {m: n / reps for m, n in passed.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64, help="POPE images (trainer.pope.images)")
    ap.add_argument("--acc", type=float, default=0.83, help="both models' mean accuracy")
    ap.add_argument("--margins", type=float, nargs="+", default=[0.03, 0.04, 0.05, 0.06, 0.08])
    ap.add_argument("--kappas", type=float, nargs="+", default=[2.0, 5.0, math.inf])
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    for kappa in a.kappas:
        for m in a.margins:
            guards = [Guard(f"val/pope/{SETTING}/f1", m), Guard(f"val/pope/{SETTING}/fpr", m)]
            equal = simulate(rng, images=a.images, acc=a.acc, kappa=kappa, worse=0.0, guards=guards, reps=a.reps)
            bad = simulate(rng, images=a.images, acc=a.acc, kappa=kappa, worse=2 * m, guards=guards, reps=a.reps)
            rows.append({"kappa": kappa, "margin": m, "equal_passes": equal,
                         "worse_by_2_margins_fails": {k: 1 - v for k, v in bad.items()}})  # fmt: skip
            print(f"κ={kappa:>4} margin {m:.2f}: equal passes "
                  + ", ".join(f"{k.split('/')[-1]} {v:.0%}" for k, v in equal.items())
                  + "; worse by 2 margins fails "
                  + ", ".join(f"{k.split('/')[-1]} {1 - v:.0%}" for k, v in bad.items()), flush=True)  # fmt: skip
    if a.out:
        a.out.write_text(json.dumps({"images": a.images, "acc": a.acc, "reps": a.reps, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
