"""The search's result in plain words: what the best trial gained against the LM-only control, at what cost."""

from __future__ import annotations

from typing import Any


def verdict(summary: dict[str, Any]) -> str | None:
    """One sentence for the console, the report and ``summary.json``: the best trial's objective as a multiple of
    the control's, its val/lm_loss against the control's (and the limit), its guards. None without a control."""
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
                "over it within the LM tolerance and the guards")  # fmt: skip
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
    return ", ".join(words)


def guard_lines(summary: dict) -> list[str]:
    """One console line per guard: what the control scored, the limit, the trials that failed it."""
    out = []
    for metric, g in (summary.get("guards") or {}).items():
        failed = sorted(t for t, names in (summary.get("failed_guards") or {}).items() if metric in names)
        worse = "may fall by at most" if g["mode"] == "max" else "may rise by at most"
        out.append(f"guard {metric} ({worse} {g['max_loss']:g}): control {g['control']:.4g}, limit "
                   f"{g['limit']:.4g}; failed by {', '.join(failed) if failed else 'no trial'}")  # fmt: skip
    return out
