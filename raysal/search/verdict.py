"""The search's result in plain words: what the best trial gained against the LM-only control, at what cost."""

from __future__ import annotations

import math
from typing import Any

from raysal.search.cost import cost_text


def interval_text(c: dict) -> str:
    """ "2.33× [1.90, 2.80]" (a ratio) or "−0.004 [−0.030, +0.020]" (a difference); the point alone without bounds."""
    finite = math.isfinite(c["lo"]) and math.isfinite(c["hi"])
    if c["kind"] == "ratio":
        return f"{c['estimate']:.2f}×" + (f" [{c['lo']:.2f}, {c['hi']:.2f}]" if finite else " [no interval]")
    return f"{c['estimate']:+.3f}" + (f" [{c['lo']:+.3f}, {c['hi']:+.3f}]" if finite else " [no interval]")


def _lm_text(c: dict) -> str:
    return f"{c['estimate'] - 1:+.1%} [{c['lo'] - 1:+.1%}, {c['hi'] - 1:+.1%}]"


def verdict(summary: dict[str, Any]) -> str | None:
    """One sentence for the console, the report and ``summary.json``: the best trial's objective as a multiple of
    the control's, its val/lm_loss against the control's (and the limit), its guards — each with its paired 95 %
    interval when the trials kept per-item records (``summary["paired"]``) — and what the search cost. None without
    a control."""
    words = _verdict(summary)
    cost = summary.get("cost") or {}
    if words is None or not cost.get("trials"):
        return words
    return f"{words}; {cost_text(cost, search=True)}"


def _verdict(summary: dict[str, Any]) -> str | None:
    rows = {r["trial_id"]: r for r in summary.get("rows", [])}
    control = rows.get(summary.get("control") or "")
    if control is None:
        return None
    metric = summary["metric"]
    best = rows.get((summary.get("best") or {}).get("trial_id") or "")
    if best is None:
        return f"no trial could be chosen best: {summary.get('warning') or 'none passed its limits'}"
    c = control["metrics"].get(metric)
    if best is control:
        return (f"the LM-only control {control['trial_id']} is best ({metric} {c:.4g}): no aligned trial gained "
                "over it within the LM tolerance and the guards" + confirmation_text(summary))  # fmt: skip
    paired = (summary.get("paired") or {}).get(best["trial_id"])
    if paired:
        return _paired_verdict(summary, best, control, paired) + confirmation_text(summary)
    b = best["metrics"][metric]
    gain = f"{b / c:.2f}× the control's" if c and c > 0 else f"against the control's {c:.4g}"
    words = [f"best trial {best['trial_id']} reaches {metric} {b:.4g}, {gain} ({c:.4g})"]
    lm_b, lm_c = best["metrics"].get("val/lm_loss"), control["metrics"].get("val/lm_loss")
    if lm_b is not None and lm_c:
        limit = summary.get("lm_limit")
        words.append(f"at val/lm_loss {lm_b / lm_c - 1:+.1%} against the control"
                     + (f" (limit {limit / lm_c - 1:+.1%})" if limit else ""))  # fmt: skip
    if summary.get("guards"):
        words.append(f"passing its {len(summary['guards'])} guard(s)")
    return ", ".join(words) + " (point estimates: no per-item records to pair)" + confirmation_text(summary)


def confirmation_text(summary: dict) -> str:
    """ "; confirmed on 9 images never chosen on: val/amr 2.10× [1.60, 2.70] the control's; ..." — the best trial
    against the control on the confirmation hold-out (`summary["confirmation"]`), or its value alone."""
    conf = summary.get("confirmation") or {}
    best = conf.get("best")
    if not best:
        return ""
    metric = summary["metric"]
    head = f"; confirmed on {conf['images']} images never chosen on: "
    paired = conf.get("paired") or {}
    if metric not in paired:
        return head + f"{metric} {best['metrics'].get(metric, math.nan):.4g}"
    words = [f"{metric} {interval_text(paired[metric])} the control's"]
    if "val/lm_loss" in paired:
        words.append(f"val/lm_loss {_lm_text(paired['val/lm_loss'])}")
    words += [f"{g} {interval_text(paired[g])}" for g in (summary.get("guards") or {}) if g in paired]
    return head + "; ".join(words)


def _paired_verdict(summary: dict, best: dict, control: dict, paired: dict[str, dict]) -> str:
    metric = summary["metric"]
    obj = paired.get(metric)
    b, c = best["metrics"][metric], control["metrics"].get(metric)
    if obj is None:
        words = [f"best trial {best['trial_id']} reaches {metric} {b:.4g} (the control {c:.4g}; no paired interval)"]
    else:
        than = "the control's" if obj["kind"] == "ratio" else "against the control's"
        words = [f"best trial {best['trial_id']} reaches {metric} {b:.4g}, {interval_text(obj)} {than} ({c:.4g}) "
                 f"on {obj['images']} paired images (95 % intervals)"]  # fmt: skip
    lm = paired.get("val/lm_loss")
    if lm is not None:
        lm_c = control["metrics"].get("val/lm_loss")
        limit = summary.get("lm_limit")
        words.append(f"val/lm_loss {_lm_text(lm)} against the control"
                     + (f" (limit {limit / lm_c - 1:+.1%})" if limit and lm_c else ""))  # fmt: skip
    for g, spec in (summary.get("guards") or {}).items():
        if g in paired:
            words.append(f"{g} {interval_text(paired[g])}, within the {spec['max_loss']:g} margin")
    alike = summary.get("indistinguishable") or []
    if alike:
        words.append(f"indistinguishable from {', '.join(alike)} (their intervals overlap)")
    return "; ".join(words)


def summary_values(summary: dict) -> dict[str, float | str]:
    """What the search's W&B summary run keeps beside its report: the best trial, the verdict, and each paired
    comparison of the best with the control — ``val/amr_vs_control`` with ``_lo`` and ``_hi`` (a ratio, or a
    difference for metrics compared by difference), the confirmation's under ``confirm/``."""
    out: dict[str, float | str] = {}
    best = (summary.get("best") or {}).get("trial_id")
    if best:
        out["best/trial_id"] = best
    if summary.get("verdict"):
        out["verdict"] = summary["verdict"]
    for k, v in (summary.get("cost") or {}).items():
        out[f"search/cost/{k}"] = v
    sources = [("", ((summary.get("paired") or {}).get(best) or {}) if best else {}),
               ("confirm/", (summary.get("confirmation") or {}).get("paired") or {})]  # fmt: skip
    for prefix, paired in sources:
        for metric, c in paired.items():
            key = f"{prefix}{metric}_vs_control"
            out.update({key: c["estimate"], f"{key}_lo": c["lo"], f"{key}_hi": c["hi"]})
    return out


def trial_roles(summary: dict) -> dict[str, list[str]]:
    """{trial_id: its W&B tags}: ``control``, ``best``, ``excluded:lm_loss`` (beyond the LM tolerance) and
    ``excluded:<guard metric>`` for each guard it failed."""
    best = (summary.get("best") or {}).get("trial_id")
    roles: dict[str, list[str]] = {}
    for r in summary.get("rows") or []:
        t = r["trial_id"]
        tags = ["control"] if r.get("control") else []
        tags += ["best"] if t == best else []
        tags += ["excluded:val/lm_loss"] if t in (summary.get("excluded_by_lm_tolerance") or []) else []
        tags += [f"excluded:{g}" for g in (summary.get("failed_guards") or {}).get(t, [])]
        roles[t] = tags
    return roles


def trials_table(summary: dict) -> tuple[list[str], list[list]]:
    """(columns, rows) of the search's trials for a W&B table: the trial id, its roles, each ranked metric with the
    paired comparison with the control (estimate, 95 % bounds) where there is one, its cost, and the replay
    command."""
    rows = summary.get("rows") or []
    metrics = list(dict.fromkeys([summary["metric"], "val/lm_loss", *(summary.get("guards") or {})]))
    columns = ["trial_id", "roles"]
    for m in metrics:
        columns += [m, f"{m}_vs_control", f"{m}_vs_control_lo", f"{m}_vs_control_hi"]
    cost_keys = ("train_s", "eval_s", "eval_fraction", "gpu_hours")
    columns += [f"cost/{k}" for k in cost_keys]
    columns.append("replay")
    roles = trial_roles(summary)
    data = []
    for r in rows:
        paired = (summary.get("paired") or {}).get(r["trial_id"]) or {}
        line: list = [r["trial_id"], " ".join(roles.get(r["trial_id"], []))]
        for m in metrics:
            c = paired.get(m) or {}
            line += [r["metrics"].get(m), c.get("estimate"), c.get("lo"), c.get("hi")]
        cost = r.get("cost") or {}
        data.append([*line, *(cost.get(k) for k in cost_keys), r.get("replay")])
    return columns, data


def guard_lines(summary: dict) -> list[str]:
    """One console line per guard: what the control scored, the margin (paired) or limit (point), the trials that
    failed it."""
    out = []
    paired = summary.get("rule") == "paired"
    for metric, g in (summary.get("guards") or {}).items():
        failed = sorted(t for t, names in (summary.get("failed_guards") or {}).items() if metric in names)
        by = ", ".join(failed) if failed else "no trial"
        if paired:
            worse = "worse" if g["mode"] == "max" else "higher"
            out.append(f"guard {metric} (non-inferiority: {worse} than the control by at most {g['max_loss']:g}, "
                       f"on the paired 95 % interval's bound): control {g['control']:.4g}; failed by {by}")  # fmt: skip
            continue
        worse = "may fall by at most" if g["mode"] == "max" else "may rise by at most"
        out.append(f"guard {metric} ({worse} {g['max_loss']:g}): control {g['control']:.4g}, limit "
                   f"{g['limit']:.4g}; failed by {by}")  # fmt: skip
    return out
