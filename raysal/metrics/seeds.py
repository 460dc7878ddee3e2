"""A configuration against its matched control over training seeds and images: the confirmation's interval.

Each seed ``s`` trains the finalist and its matched control (the finalist's config without the alignment criteria,
the same seed: the same initialisation and data order), and every one of those 2S models is evaluated on the same
N confirmation images. Their difference (log ratio for AMR and the LM loss) varies with the seed as well as with
the image — a crossed design, every seed seeing every image:

    d(s, i) = δ + a(s) + b(i) + e(s, i)        δ: the effect; a: the seed's; b: the image's; e: the rest

The estimate is the metric of all seeds' rows together, the finalist's against the control's (the pooled
statistic; `ItemRecords.concat`): δ + ā + b̄ + ē, of variance σa²/S + σb²/N + σe²/(SN). Its parts, each from
what the records hold:

* ``V_img``: the paired bootstrap over images of the pooled statistic (one resample of the images serves every
  seed, both arms: an image carries its rows in all 2S evaluations) → σb²/N + σe²/(SN);
* each seed's own bootstrap variance ``V_s`` → (σb² + σe²)/N, hence σe²/N = (mean V_s − V_img) · S/(S − 1);
* the spread of the S per-seed statistics → σa² + σe²/N, hence σa² = max(0, spread − σe²/N).

The variance is V = V_img + σa²/S, and the interval Student's t on Satterthwaite's degrees of freedom,
df = V² / ((m/S)² / (S − 1) + V_img² / (N − 1)), m the seeds' mean square (the spread, σa² + σe²/N, estimated on
S − 1 degrees of freedom whatever part of it is residual): where seeds dominate, df → S − 1 (t = 12.7 at two seeds,
4.3 at three) and the interval is as wide as two or three seeds leave it; where images dominate, df grows with
what the seeds' spread shows of the residual. Bootstrap
variances are corrected by N / (N − 1). A simulation in which seed variance dominates covers the truth ≥ 90 % of the
time (tests/test_seeds.py; docs/verdict.md). With one seed this is the studentized interval of
`raysal.metrics.paired` (no seed variance in it: the caller says so).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from raysal.metrics.paired import (
    LEVEL,
    RESAMPLES,
    SEED,
    Comparison,
    boot_variance,
    comparable,
    kind_of,
    metric_under_weights,
    paired_ids,
    resample_counts,
    t_interval,
    transform,
    untransform,
)
from raysal.metrics.records import ItemRecords


@dataclass(frozen=True)
class SeedsComparison:
    """The pooled comparison: `Comparison`'s fields (what guards read), and what the interval is made of."""

    metric: str
    kind: str  # "ratio" | "difference"
    trial: float  # the finalist's value over every seed's rows
    control: float  # the matched controls' value over every seed's rows
    estimate: float  # trial / control or trial − control
    lo: float
    hi: float
    images: int  # confirmation images every evaluation has
    seeds: int
    per_seed: tuple[float, ...]  # each seed's finalist against its own control (ratio or difference)
    se: float  # standard error on the interval's scale (log for a ratio)
    df: float  # Satterthwaite's degrees of freedom
    seed_share: float  # the share of the variance that comes from the seeds (σa²/S over V)
    method: str = "seeds"

    def as_dict(self) -> dict:
        return asdict(self)

    def as_comparison(self) -> Comparison:
        return Comparison(self.metric, self.kind, self.trial, self.control, self.estimate, self.lo, self.hi,
                          self.images, self.method)  # fmt: skip

    def p_beyond(self, bound: float, better: str) -> float:
        """One-sided p-value of "the effect lies on the ``better`` side of ``bound``" (``better``: "above" or
        "below"; ``bound`` in the metric's comparison units: a ratio or a difference): small when the interval
        clears the bound. 1.0 without a standard error."""
        if not (math.isfinite(self.se) and self.se > 0 and math.isfinite(self.df)):
            if self.se == 0 and math.isfinite(self.estimate):  # no variation at all: the point decides
                clear = self.estimate > bound if better == "above" else self.estimate < bound
                return 0.0 if clear else 1.0
            return 1.0
        if self.kind == "ratio" and bound <= 0:
            return 0.0 if better == "above" else 1.0
        z = (float(transform(np.array([self.estimate]), self.kind)[0]) - float(
            transform(np.array([bound]), self.kind)[0])) / self.se  # fmt: skip
        return float(stats.t.sf(z, self.df) if better == "above" else stats.t.cdf(z, self.df))


def compare_seeds(
    pairs: Sequence[tuple[ItemRecords, ItemRecords]],
    metric: str,
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> SeedsComparison:
    """``metric`` of the finalist against its matched control, pooled over ``pairs`` ((finalist, control) records
    of one seed each, on the same images), with the interval of the module's docstring. ValueError when the
    evaluations share no image for the metric."""
    if not comparable(metric):
        raise ValueError(f"{metric!r} is not computed from per-item records: it cannot be compared paired")
    if not pairs:
        raise ValueError("no seed to compare")
    ids = paired_ids(*(r for pair in pairs for r in pair), metric=metric)
    if not ids:
        raise ValueError(f"the finalist's and the controls' evaluations share no image for {metric}")
    n, S = len(ids), len(pairs)
    W = resample_counts(n, resamples, seed)
    kind = kind_of(metric)

    def stat(trial: ItemRecords, control: ItemRecords) -> tuple[float, float, np.ndarray]:
        t = metric_under_weights(trial, metric, ids, W)
        c = metric_under_weights(control, metric, ids, W)
        with np.errstate(divide="ignore", invalid="ignore"):
            raw = t / c if kind == "ratio" else t - c
        return float(t[0]), float(c[0]), transform(raw, kind)

    t0, c0, z = stat(ItemRecords.concat(p[0] for p in pairs), ItemRecords.concat(p[1] for p in pairs))
    per = [stat(*pair)[2] for pair in pairs]
    correction = n / max(n - 1, 1)
    v_img = boot_variance(z) * correction
    seed_var = spread = 0.0
    if S > 1:
        v_each = float(np.mean([boot_variance(zs) for zs in per])) * correction
        resid = max(0.0, (v_each - v_img) * S / (S - 1))  # σe²/N
        spread = float(np.var([zs[0] for zs in per], ddof=1))  # the seeds' mean square: σa² + σe²/N, S − 1 df
        seed_var = max(0.0, spread - resid) if math.isfinite(spread) and math.isfinite(resid) else math.nan
    variance = v_img + seed_var / S
    # Satterthwaite on the mean squares the variance is made of: the seeds' counts with its S − 1 degrees of
    # freedom whatever part of it the residual explains (the plug-in σa² instead covers 84-89 % at 2-3 seeds
    # where seed and image noise are alike: tests/test_seeds.py)
    parts = (spread / S) ** 2 / max(S - 1, 1) + v_img**2 / max(n - 1, 1)
    df = variance**2 / parts if parts > 0 else float(n - 1)
    if n < 2:
        df = 0.0
    lo, hi = t_interval(float(z[0]), variance, df, level, kind)
    return SeedsComparison(
        metric, kind, t0, c0, untransform(float(z[0]), kind) if math.isfinite(z[0]) else math.nan, lo, hi, n, S,
        tuple(untransform(float(zs[0]), kind) if math.isfinite(zs[0]) else math.nan for zs in per),
        math.sqrt(variance) if math.isfinite(variance) else math.nan, df,
        (seed_var / S) / variance if variance > 0 and math.isfinite(variance) else 0.0,
    )  # fmt: skip
