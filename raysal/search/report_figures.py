"""The search report's figures, as PNG bytes (matplotlib, Agg).

Why matplotlib: the report must open offline from one file and the same pictures go to W&B. Static PNGs embed in
HTML as data URIs (a few hundred kB in all) and log to W&B as images unchanged; plotly's interactive figures would
need its 3.5 MB script inlined in every report and a browser (kaleido) to become pictures. Optuna's own
``optuna.visualization.matplotlib`` draws the optimisation history and parallel coordinates; importance comes from
Optuna's PED-ANOVA evaluator (no scikit-learn, works from a handful of trials).

Each function takes plain rows (`summary.json`'s ``rows``) or an Optuna study and returns PNG bytes, or None when
there is nothing to draw (the report then says why).
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: a driver on a cluster head, a CI runner
import matplotlib.pyplot as plt
import optuna
from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

LM = "val/lm_loss"


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _plane_png(fig: Any, ax: Any, xlabel: str, metric: str, mode: str, against: str) -> bytes:
    """Labels, one legend entry per label, grid → PNG: the end of both planes."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} ({'higher' if mode == 'max' else 'lower'} is better)")
    ax.set_title(f"Grounding vs {against}, one point per trial")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return _png(fig)


def value_interval(c: dict | None) -> tuple[float, float] | None:
    """A paired comparison (`raysal.metrics.paired.Comparison.as_dict`) as an interval in the metric's own units on
    the paired images: the control's value × the ratio's bounds, or + the difference's; None without bounds."""
    if not c or not (math.isfinite(c["lo"]) and math.isfinite(c["hi"])):
        return None
    if c["kind"] == "ratio":
        return c["control"] * c["lo"], c["control"] * c["hi"]
    return c["control"] + c["lo"], c["control"] + c["hi"]


def _error_bars(ax: Any, x: float, y: float, cx: dict | None, cy: dict | None) -> None:
    """A trial's paired 95 % intervals as error bars around its point (the bars of each axis, where it has one)."""
    ix, iy = value_interval(cx), value_interval(cy)
    if ix is None and iy is None:
        return
    xerr = [[max(x - ix[0], 0.0)], [max(ix[1] - x, 0.0)]] if ix else None
    yerr = [[max(y - iy[0], 0.0)], [max(iy[1] - y, 0.0)]] if iy else None
    ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="none", ecolor="#bbb", elinewidth=1, capsize=2, zorder=1,
                label="95 % interval (paired with the control)")  # fmt: skip


def pareto_front(points: list[tuple[float, float]], maximise: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (x = LM loss, lower better; y = the objective),
    sorted by x."""
    better = (lambda a, b: a > b) if maximise else (lambda a, b: a < b)
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and (better(y2, y) or y2 == y)) and (x2 < x or better(y2, y))
            for j, (x2, y2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def grounding_language_plane(
    rows: list[dict[str, Any]], metric: str, mode: str, lm_limit: float | None, best: str | None,
    paired: dict[str, dict] | None = None, excluded: set[str] | frozenset[str] = frozenset(),
) -> bytes | None:  # fmt: skip
    """The objective against val/lm_loss, one point per trial: Pareto front, the control, the LM tolerance band
    (trials right of the limit pay for grounding with language and cannot be chosen best); ``paired``: each
    trial's comparisons with the control, drawn as 95 % interval bars on both axes; ``excluded``: the trials the
    LM tolerance excluded (grey: with paired records, a point left of the line whose interval reaches past it)."""
    pts = [(r["metrics"][LM], r["metrics"][metric], r) for r in rows if LM in r["metrics"] and metric in r["metrics"]]
    pts = [p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if lm_limit is not None:
        ax.axvspan(min(min(xs), lm_limit) - 1e9, lm_limit, color="#2ca02c", alpha=0.08, lw=0)
        ax.axvline(lm_limit, color="#2ca02c", ls="--", lw=1, label=f"LM tolerance: val/lm_loss ≤ {lm_limit:.4g}")
    front = pareto_front([(x, y) for x, y, _ in pts], maximise=mode == "max")
    ax.plot([xs[i] for i in front], [ys[i] for i in front], color="#888", lw=1, zorder=1, label="Pareto front")
    for x, y, r in pts:
        if r["control"]:
            ax.scatter([x], [y], marker="*", s=220, color="#d62728", zorder=3, label="LM-only control")
        else:
            mine = (paired or {}).get(r["trial_id"], {})
            _error_bars(ax, x, y, mine.get(LM), mine.get(metric))
            out = r["trial_id"] in excluded
            ax.scatter([x], [y], s=36, color="#aaa" if out else "#1f77b4", zorder=2,
                       label="over the LM tolerance" if out else "trial")  # fmt: skip
        if r["trial_id"] == best:
            ax.scatter([x], [y], s=260, facecolors="none", edgecolors="k", lw=1.5, zorder=4, label="best")
        ax.annotate(r["trial_id"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7, color="#444")
    pad = (max(xs) - min(xs)) * 0.1 or abs(xs[0]) * 0.01 or 0.01
    ax.set_xlim(min(xs) - pad, max(xs + ([lm_limit] if lm_limit else [])) + pad)
    return _plane_png(fig, ax, "val/lm_loss (language: lower is better)", metric, mode, "language")


HALLUCINATION = "val/pope/adversarial/fpr"


def grounding_hallucination_plane(
    rows: list[dict[str, Any]], metric: str, mode: str, fpr_limit: float | None, best: str | None,
    x: str = HALLUCINATION, paired: dict[str, dict] | None = None,
) -> bytes | None:  # fmt: skip
    """The objective against POPE's hallucination rate (the false-positive rate on adversarial negatives: "yes" to
    an object that is not there), one point per trial, the control as a star; ``fpr_limit``: a guard's limit (trials
    right of it cannot be chosen best)."""
    pts = [(r["metrics"][x], r["metrics"][metric], r) for r in rows if x in r["metrics"] and metric in r["metrics"]]
    pts = [p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if fpr_limit is not None:
        ax.axvline(fpr_limit, color="#9467bd", ls="--", lw=1, label=f"guard: {x} ≤ {fpr_limit:.4g}")
    for px, py, r in pts:
        failed = bool(r.get("guards")) and not all(r["guards"].values())
        if r["control"]:
            ax.scatter([px], [py], marker="*", s=220, color="#d62728", zorder=3, label="LM-only control")
        else:
            mine = (paired or {}).get(r["trial_id"], {})
            _error_bars(ax, px, py, mine.get(x), mine.get(metric))
            ax.scatter([px], [py], s=36, color="#aaa" if failed else "#1f77b4", zorder=2,
                       label="failed a guard" if failed else "trial")  # fmt: skip
        if r["trial_id"] == best:
            ax.scatter([px], [py], s=260, facecolors="none", edgecolors="k", lw=1.5, zorder=4, label="best")
        ax.annotate(r["trial_id"], (px, py), textcoords="offset points", xytext=(5, 4), fontsize=7, color="#444")
    xs = [p[0] for p in pts] + ([fpr_limit] if fpr_limit is not None else [])
    pad = (max(xs) - min(xs)) * 0.1 or 0.01
    ax.set_xlim(min(xs) - pad, max(xs) + pad)
    return _plane_png(fig, ax, f"{x} (hallucination: lower is better)", metric, mode, "hallucination")


def importance(study: Any, metric: str, mode: str) -> tuple[bytes | None, str]:
    """PED-ANOVA importance of every sampled parameter for the objective and for val/lm_loss (side by side).
    Returns (PNG or None, a note: why nothing, or what the bars mean)."""
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.params]
    if len(done) < 3:
        return None, f"{len(done)} completed sampled trial(s): importance needs at least 3"
    sign = -1.0 if mode == "max" else 1.0  # PED-ANOVA ranks what makes the target *low*
    targets = {metric: lambda t: sign * t.values[0], LM: lambda t: t.user_attrs.get(LM, float("nan"))}
    results, notes = {}, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, target in targets.items():
            usable = [t for t in done if math.isfinite(target(t))]
            if len(usable) < 3:
                notes.append(f"{name}: {len(usable)} trial(s) report it")
                continue
            sub = optuna.create_study(direction="minimize")
            sub.add_trials(usable)
            try:
                results[name] = get_param_importances(sub, evaluator=PedAnovaImportanceEvaluator(), target=target)
            except Exception as e:  # too few distinct values, a single-valued space
                notes.append(f"{name}: {e}")
    results = {k: v for k, v in results.items() if v}
    if not results:
        return None, "importance could not be computed: " + "; ".join(notes or ["no parameter varies"])
    params = sorted({p for v in results.values() for p in v})
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 0.45 * len(params) + 1.6), squeeze=False)
    for ax, (name, imp) in zip(axes[0], results.items(), strict=True):
        vals = [imp.get(p, 0.0) for p in params]
        ax.barh(params, vals, color="#1f77b4")
        ax.set_xlim(0, 1)
        ax.set_title(f"importance for {name}", fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    return _png(fig), "PED-ANOVA: how much each parameter decides whether a trial lands in the best quantile"


def history(study: Any) -> bytes | None:

    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's matplotlib backend is marked experimental
        ax = optuna.visualization.matplotlib.plot_optimization_history(study)
    ax.figure.set_size_inches(6.4, 4.0)
    return _png(ax.figure)


def parallel_coordinates(study: Any) -> bytes | None:

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.params]
    if len(done) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ax = optuna.visualization.matplotlib.plot_parallel_coordinate(study)
    ax.figure.set_size_inches(8.0, 4.2)
    return _png(ax.figure)
