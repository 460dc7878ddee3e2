"""Guards against the LM-only control: a trial may be best only if no guarded metric got worse than the control's
by more than its allowed loss.

``val/lm_loss`` within ``lm_tolerance`` (relative) keeps the winner's language; guards (``control.guards`` in a
space file, ``{metric: max_loss}``, absolute, in the metric's own units) keep the rest — e.g.
``val/pope/adversarial/f1: 0.01`` (F1 may fall by at most 0.01) and ``val/pope/adversarial/fpr: 0.01`` (the
hallucination rate may rise by at most 0.01). Which way is worse comes from the metric (`direction`), never from
the user: a guard on a metric raysal does not know, or on one without a better side (``yes_ratio``: its ideal is
the questions' base rate), is refused when the space file is read. The control itself always passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    max_loss: float  # ≥ 0, in the metric's units

    @property
    def mode(self) -> str:
        return direction(self.metric)

    def limit(self, control: float) -> float:
        """The worst value a trial may have."""
        return control - self.max_loss if self.mode == "max" else control + self.max_loss

    def passes(self, value: float | None, control: float) -> bool:
        """A trial that did not report the metric, or reported NaN, does not pass."""
        if value is None or not math.isfinite(value):
            return False
        return value >= self.limit(control) if self.mode == "max" else value <= self.limit(control)


def judge(rows: list[dict], control: dict, guards: tuple[Guard, ...]) -> tuple[dict, dict[str, list[str]]]:
    """rows/control: {"trial_id", "metrics", ...}. → (what each guard is: {metric: {max_loss, mode, control,
    limit}}, {trial_id: the guards it failed}) — every row listed, the control with none. A guard whose metric
    the control did not report (or reported NaN) cannot be judged: ValueError naming it."""
    table: dict[str, dict] = {}
    for g in guards:
        base = control["metrics"].get(g.metric)
        if base is None or not math.isfinite(base):
            raise ValueError(f"the control did not report {g.metric}: the guard on it cannot be judged")
        table[g.metric] = {"max_loss": g.max_loss, "mode": g.mode, "control": base, "limit": g.limit(base)}
    failed = {
        r["trial_id"]: [] if r is control else [g.metric for g in guards
                                                if not g.passes(r["metrics"].get(g.metric), table[g.metric]["control"])]
        for r in rows
    }  # fmt: skip
    return table, failed
