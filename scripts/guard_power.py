"""How often a POPE guard passes an equally good trial and fails a worse one, at a given POPE size and margin: the
power calculation behind the margins in search_spaces/*.yaml and the confirmation's size (docs/verdict.md).

The simulation (the model of issue 30): every question has a difficulty, the probability that a model answers it
right, drawn from Beta(acc·κ, (1 − acc)·κ) (mean ``acc``; κ → ∞: every question equally hard, i.e. the two models'
errors independent — the least favourable case for a paired comparison). The control and the trial answer
independently given the difficulty; a trial worse by δ answers each question right with probability p − δ. Per
image 3 present things (yes) and 3 absent ones (no) per setting, as raysal's POPE set. Each simulated search goes
through raysal's own decision: `raysal.metrics.paired.compare` (the paired bootstrap, B = 2000) and
`raysal.search.guards.Guard.passes` (the interval's harmful bound within the margin).

With ``--seeds S`` it simulates the confirmation instead: S training seeds, each a finalist paired with its matched
control on the same images, compared pooled over seeds and images (`raysal.metrics.seeds.compare_seeds`), each
seed's finalist off its control by a seed effect drawn from N(0, ``--seed-sd``) on top of the true difference
(the seed variance the interval must carry). ``--at-margin`` adds the pass rate of a finalist worse by exactly the
margin (the non-inferiority test's level: ≤ 2.5 %).

    python scripts/guard_power.py --out docs/guard_power.json                                   # ~2 min on 2 cores
    python scripts/guard_power.py --images 500 --seeds 3 --margins 0.03 0.05 --at-margin      # the defaults
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from raysal.metrics.paired import compare
from raysal.metrics.records import ItemRecords
from raysal.metrics.seeds import compare_seeds
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


def simulate_confirmation(
    rng: np.random.Generator, *, images: int, seeds: int, acc: float, kappa: float, worse: float, seed_sd: float,
    guards: list[Guard], reps: int, resamples: int = 500,
) -> dict[str, float]:  # fmt: skip
    """→ {guard metric: fraction of ``reps`` simulated confirmations the finalist passed}: ``seeds`` pairs of a
    finalist (right ``worse`` + its seed's effect less often on every question) and its matched control, on the
    same ``images`` (questions' difficulties shared), decided pooled (`compare_seeds`, the guard's bound)."""
    per = 3
    image_ids = np.repeat(np.arange(images), 2 * per)
    labels = np.tile(np.r_[np.ones(per, bool), np.zeros(per, bool)], images)
    passed = dict.fromkeys((g.metric for g in guards), 0)
    for _ in range(reps):
        p = np.full(len(labels), acc) if math.isinf(kappa) else rng.beta(acc * kappa, (1 - acc) * kappa, len(labels))
        pairs = []
        for _ in range(seeds):
            shift = worse + rng.normal(0.0, seed_sd)
            control = records(image_ids, labels, answers(rng, p, labels))
            trial = records(image_ids, labels, answers(rng, np.clip(p - shift, 0, 1), labels))
            pairs.append((trial, control))
        for g in guards:
            c = compare_seeds(pairs, g.metric, resamples=resamples)
            passed[g.metric] += g.passes(None, c.control, c.as_comparison())
    return {m: n / reps for m, n in passed.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64, help="POPE images (trainer.pope.images)")
    ap.add_argument("--acc", type=float, default=0.83, help="both models' mean accuracy")
    ap.add_argument("--margins", type=float, nargs="+", default=[0.03, 0.04, 0.05, 0.06, 0.08])
    ap.add_argument("--kappas", type=float, nargs="+", default=[2.0, 5.0, math.inf])
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=0, help="simulate the confirmation at this many seeds (0: a search)")
    ap.add_argument("--seed-sd", type=float, default=0.01, help="SD of a seed's effect on the difference")
    ap.add_argument("--at-margin", action="store_true", help="also: a trial worse by exactly the margin")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    for kappa in a.kappas:
        for m in a.margins:
            guards = [Guard(f"val/pope/{SETTING}/f1", m), Guard(f"val/pope/{SETTING}/fpr", m)]

            def run(worse: float, kappa: float = kappa, guards: list[Guard] = guards) -> dict[str, float]:
                kw = {
                    "images": a.images,
                    "acc": a.acc,
                    "kappa": kappa,
                    "worse": worse,
                    "guards": guards,
                    "reps": a.reps,
                }
                if a.seeds:
                    return simulate_confirmation(rng, seeds=a.seeds, seed_sd=a.seed_sd, **kw)
                return simulate(rng, **kw)

            equal, bad = run(0.0), run(2 * m)
            row = {"kappa": kappa, "margin": m, "equal_passes": equal,
                   "worse_by_2_margins_fails": {k: 1 - v for k, v in bad.items()}}  # fmt: skip
            text = (f"κ={kappa:>4} margin {m:.3f}: equal passes " + ", ".join(f"{k.split('/')[-1]} {v:.0%}"
                    for k, v in equal.items()) + "; worse by 2 margins fails " + ", ".join(
                    f"{k.split('/')[-1]} {1 - v:.0%}" for k, v in bad.items()))  # fmt: skip
            if a.at_margin:
                row["at_margin_passes"] = at = run(m)
                text += "; at the margin passes " + ", ".join(f"{k.split('/')[-1]} {v:.1%}" for k, v in at.items())
            rows.append(row)
            print(text, flush=True)
    if a.out:
        a.out.write_text(json.dumps({"images": a.images, "acc": a.acc, "reps": a.reps, "seeds": a.seeds,
                                     "seed_sd": a.seed_sd, "rows": rows}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
