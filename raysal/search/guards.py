"""Guards against the LM-only control: a trial may be best only if it is shown *non-inferior* to the control on
every guarded metric.

``val/lm_loss`` within ``lm_tolerance`` (relative) keeps the winner's language; guards (``control.guards`` in a
space file, ``{metric: margin}``, absolute, in the metric's own units) keep the rest — e.g.
``val/pope/adversarial/f1: 0.06`` (F1 may be worse by at most 0.06) and ``val/pope/adversarial/fpr: 0.06`` (the
hallucination rate may be higher by at most 0.06). The decision is the one of a non-inferiority trial: the trial
and the control answered the same questions, so their difference is compared paired (`raysal.metrics.paired`),
and the trial passes when its 95 % interval's bound on the harmful side lies within the margin — "worse by more
than the margin" is then ruled out at 97.5 % one-sided, whatever the point estimate. The margins are sized in
docs/verdict.md (`scripts/guard_power.py`): an equally good trial passes ≥ 90 % of the time at the default POPE
size, one worse by two margins fails ≥ 80 %. Runs without per-item records fall back to the point rule (the
table says which rule decided). Which way is worse comes from the metric (`direction`), never from
the user: a guard on a metric raysal does not know, or on one without a better side (``yes_ratio``: its ideal is
the questions' base rate), is refused when the space file is read. The control itself always passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from raysal.metrics.paired import Comparison

# the last part of a metric's name → which way is better
_HIGHER = {"amr", "ap", "nss", "pointing", "rec_acc50", "rec_miou", "accuracy", "precision", "recall", "f1",
           "auroc", "mass"}  # fmt: skip
_LOWER = {"lm_loss", "fpr", "loss"}
_NO_DIRECTION = {
    "yes_ratio": "its ideal is the questions' base rate (0.5), not an end of the scale: guard fpr or precision",
    "n": "it counts questions",
    "images": "it counts images",
    "tokens": "it counts tokens",
}
POPE_SETTINGS = ("random", "popular", "adversarial")


def direction(metric: str) -> str:
    """``"max"`` or ``"min"``: which way ``metric`` (``val/...``) is better. ValueError with the reason otherwise."""
    parts = metric.split("/")
    if parts[0] != "val" or len(parts) < 2:
        raise ValueError(f"{metric!r}: guards compare validation metrics (val/...) with the control's")
    if parts[1] == "pope" and (len(parts) != 4 or parts[2] not in POPE_SETTINGS):
        raise ValueError(f"{metric!r}: POPE metrics are val/pope/<{'|'.join(POPE_SETTINGS)}>/<metric>")
    if parts[1] != "pope" and len(parts) != 2:
        raise ValueError(f"{metric!r}: not a metric raysal reports")
    last = parts[-1]
    if last in _NO_DIRECTION:
        raise ValueError(f"{metric!r} cannot be guarded: {_NO_DIRECTION[last]}")
    if last in _HIGHER:
        return "max"
    if last in _LOWER:
        return "min"
    known = ", ".join(sorted(_HIGHER | _LOWER))
    raise ValueError(f"{metric!r}: not a metric raysal reports with a better side (known: {known})")


@dataclass(frozen=True)
class Guard:
    metric: str  # val/...
    max_loss: float  # ≥ 0, the non-inferiority margin in the metric's units

    @property
    def mode(self) -> str:
        return direction(self.metric)

    def limit(self, control: float) -> float:
        """The worst value a trial may have (the point rule, for runs without per-item records)."""
        return control - self.max_loss if self.mode == "max" else control + self.max_loss

    def harm(self, c: Comparison) -> float:
        """How much worse than the control the trial may be, at worst (the interval's bound on the harmful side),
        in the metric's units (a ratio's bound times the control's value); NaN without an interval."""
        bound = c.lo if self.mode == "max" else c.hi
        loss = bound - (1.0 if c.kind == "ratio" else 0.0)
        loss = loss * c.control if c.kind == "ratio" else loss
        return -loss if self.mode == "max" else loss

    def passes(self, value: float | None, control: float, comparison: Comparison | None = None) -> bool:
        """Non-inferiority when the trial is compared paired with the control (``comparison``): the interval's
        harmful bound lies within the margin. Without one, the point rule on ``value``. A trial that did not report
        the metric, reported NaN, or whose interval is undefined, does not pass."""
        if comparison is not None:
            harm = self.harm(comparison)
            return math.isfinite(harm) and harm <= self.max_loss
        if value is None or not math.isfinite(value):
            return False
        return value >= self.limit(control) if self.mode == "max" else value <= self.limit(control)


def judge(
    rows: list[dict], control: dict, guards: tuple[Guard, ...], paired: dict[str, dict[str, Comparison]] | None = None
) -> tuple[dict, dict[str, list[str]]]:
    """rows/control: {"trial_id", "metrics", ...}; ``paired``: {trial_id: {metric: Comparison}} with the control
    (None: no per-item records, the point rule). → (what each guard is: {metric: {max_loss, mode, control, limit,
    rule}}, {trial_id: the guards it failed}) — every row listed, the control with none. A guard whose metric the
    control did not report (or reported NaN) cannot be judged: ValueError naming it."""
    table: dict[str, dict] = {}
    rule = "paired" if paired is not None else "point"
    for g in guards:
        base = control["metrics"].get(g.metric)
        if base is None or not math.isfinite(base):
            raise ValueError(f"the control did not report {g.metric}: the guard on it cannot be judged")
        table[g.metric] = {"max_loss": g.max_loss, "mode": g.mode, "control": base, "limit": g.limit(base),
                           "rule": rule}  # fmt: skip

    def fails(r: dict, g: Guard) -> bool:
        if r is control:
            return False
        c = (paired or {}).get(r["trial_id"], {}).get(g.metric)
        if paired is not None and c is None:
            return True  # no paired comparison for this trial: it cannot be shown non-inferior
        return not g.passes(r["metrics"].get(g.metric), table[g.metric]["control"], c)

    failed = {r["trial_id"]: [g.metric for g in guards if fails(r, g)] for r in rows}
    return table, failed
