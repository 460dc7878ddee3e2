"""The confirmation's decision: is a finalist better than its matched control, without worse language or more
hallucination, beyond noise over training seeds and images?

A finalist is *confirmed* only if, on the confirmation hold-out (images never trained or chosen on), pooled over
its seeds each paired with its own matched control (`raysal.metrics.seeds`):

1. its objective beats the control's: the interval's worse bound is on the better side of no change (a ratio's
   lower bound > 1 for AMR),
2. the LM rule holds: the LM-loss ratio's upper bound ≤ 1 + ``lm_tolerance``,
3. every guard passes at its margin (`raysal.search.guards`: the harmful bound within the margin);

otherwise *not confirmed*, each failed condition said with its interval. Each condition is a one-sided test at
2.5 % (its p-value, `SeedsComparison.p_beyond`; with one finalist, exactly the 95 % intervals' bounds); all three
must hold (an intersection-union test: no correction within a finalist). With several finalists, Holm's step-down
over their p-values (each finalist's the largest of its conditions') keeps the chance of confirming any finalist
that does not truly win at 2.5 %. A guarded metric or the LM loss whose interval excludes no change on the harmful
side is named *significantly worse than the control* (``harms``), even within its margin.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from raysal.metrics.records import ItemRecords
from raysal.metrics.seeds import SeedsComparison, compare_seeds
from raysal.search.control import LM_METRIC, significantly_worse
from raysal.search.guards import Guard

ALPHA = 0.025  # one-sided, each condition: the 95 % intervals' bounds


def interval(c: SeedsComparison) -> str:
    if c.kind == "ratio":
        return f"{c.estimate:.2f}× [{c.lo:.2f}, {c.hi:.2f}]"
    return f"{c.estimate:+.3f} [{c.lo:+.3f}, {c.hi:+.3f}]"


def _lm(c: SeedsComparison) -> str:
    return f"{c.estimate - 1:+.1%} [{c.lo - 1:+.1%}, {c.hi - 1:+.1%}]"


def conditions(
    pairs: Sequence[tuple[ItemRecords, ItemRecords]],
    metric: str,
    mode: str,
    lm_tolerance: float,
    guards: Sequence[Guard],
) -> dict[str, Any]:
    """One finalist's conditions from its (finalist, matched control) records per seed → {"comparisons",
    "p" (the largest p-value: the finalist's), "failed" (reasons), "harms", "seeds", "images"}."""
    comps: dict[str, SeedsComparison] = {}
    failed: list[str] = []
    ps: list[float] = []
    for m in dict.fromkeys([metric, LM_METRIC, *(g.metric for g in guards)]):
        try:
            comps[m] = compare_seeds(pairs, m)
        except ValueError as e:  # no shared image for it
            failed.append(f"{m}: {e}")
            ps.append(1.0)
    obj = comps.get(metric)
    if obj is not None:
        none = 1.0 if obj.kind == "ratio" else 0.0
        p = obj.p_beyond(none, "above" if mode == "max" else "below")
        ps.append(p)
        if not p <= ALPHA:
            failed.append(f"{metric} {interval(obj)} against the matched control: not shown "
                          f"{'above' if mode == 'max' else 'below'} it")  # fmt: skip
    lm = comps.get(LM_METRIC)
    if lm is not None:
        p = lm.p_beyond(1 + lm_tolerance, "below")
        ps.append(p)
        if not p <= ALPHA:
            failed.append(f"val/lm_loss {_lm(lm)}: not shown within the +{lm_tolerance:.0%} tolerance")
    for g in guards:
        c = comps.get(g.metric)
        if c is None:
            continue
        # the margin in the comparison's units: a difference's, or a ratio's (the control's value scales it)
        bound = (-g.max_loss if g.mode == "max" else g.max_loss) if c.kind == "difference" else (
            1 - g.max_loss / c.control if g.mode == "max" else 1 + g.max_loss / c.control)  # fmt: skip
        p = c.p_beyond(bound, "above" if g.mode == "max" else "below")
        ps.append(p)
        if not p <= ALPHA:
            failed.append(f"{g.metric} {interval(c)}: not shown within the {g.max_loss:g} margin")
    modes = {LM_METRIC: "min", **{g.metric: g.mode for g in guards}}
    harms = [m for m, c in comps.items() if m in modes and significantly_worse(c.as_comparison(), modes[m])]
    pope = [c.images for m, c in comps.items() if m.startswith("val/pope/")]
    return {
        "comparisons": {m: c.as_dict() for m, c in comps.items()},
        "p": max(ps) if ps else 1.0,
        "failed": failed,
        "harms": harms,
        "seeds": len(pairs),
        "images": comps[metric].images if metric in comps else 0,  # the objective's (captioned) images
        "pope_images": max(pope) if pope else 0,
    }


def holm(ps: Mapping[str, float], alpha: float = ALPHA) -> dict[str, bool]:
    """Holm's step-down: the smallest p-value against alpha / k, the next against alpha / (k − 1), ..., stopping at
    the first that fails; {name: rejected}."""
    order = sorted(ps, key=lambda k: (ps[k], k))
    out = dict.fromkeys(ps, False)
    for i, name in enumerate(order):
        p = ps[name]
        if not (math.isfinite(p) and p <= alpha / (len(order) - i)):
            break
        out[name] = True
    return out


def decide(per_finalist: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{finalist: its `conditions`} → the same with ``confirmed`` and ``why`` (one sentence), Holm-corrected over
    the finalists."""
    passed = holm({f: c["p"] for f, c in per_finalist.items()})
    k = len(per_finalist)
    out = {}
    for f, c in per_finalist.items():
        if passed[f]:
            why = "every condition holds"
        elif c["failed"]:
            why = "; ".join(c["failed"])
        else:  # every condition holds alone, but not at Holm's level for several finalists
            why = f"p = {c['p']:.3g}: not below Holm's level for {k} finalists"
        out[f] = {**c, "confirmed": passed[f], "why": why, "correction": "holm" if k > 1 else None}
    return out
