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
    """One sentence for the console, the report and ``summary.json``: first the confirmation's decision (confirmed
    or not, and why: the finalist against its matched control over seeds on the confirmation images), then what
    the search chose on its selection images — the best trial's objective as a multiple of the search control's, its
    val/lm_loss, its screening guards, each with its paired 95 % interval when the trials kept per-item records
    (``summary["paired"]``) — and what the search and the confirmation cost. None without a control."""
    words = _verdict(summary)
    if words is None:
        return None
    decided = decision_text(summary)
    if decided:
        words = f"{decided}. Chosen by the search: {words}"
    cost = summary.get("cost") or {}
    if not cost.get("trials"):
        return words
    stage = (summary.get("confirmation") or {}).get("cost")
    return f"{words}; {cost_text(cost, search=True)}" + (f"; {stage_cost_text(cost, stage)}" if stage else "")


def stage_cost_text(search: dict, stage: dict) -> str:
    """ "the confirmation 0.03 CPU worker-h (35 % of the whole)": the finalists' stage's training and confirmation
    evaluations against the search's and its own together."""
    gpu = search["gpu_hours"] > 0 or stage["gpu_hours"] > 0
    unit, key = ("GPU-h", "gpu_hours") if gpu else ("CPU worker-h", "worker_hours")
    whole = search[key] + stage[key]
    share = stage[key] / whole if whole > 0 else 0.0
    return f"the confirmation {stage[key]:.3g} {unit} ({share:.0%} of the whole)"


def decision_text(summary: dict[str, Any]) -> str | None:
    """ "confirmed: finalist a beats its matched control over 3 seeds × 500 confirmation images: val/amr 1.40×
    [1.22, 1.61]; ..." or "not confirmed: ... — <why>"; one clause per finalist; None without a stage."""
    conf = summary.get("confirmation") or {}
    decided = conf.get("finalists") or {}
    if not decided:
        return None
    metric = summary["metric"]
    clauses = []
    for f, d in decided.items():
        comps = d.get("comparisons") or {}
        state = "confirmed" if d["confirmed"] else "not confirmed"
        pope = f" ({d['pope_images']} with POPE's questions)" if d.get("pope_images") else ""
        head = (f"{state}: finalist {f} against its matched control over {d['seeds']} seeds × {d['images']} "
                f"confirmation images{pope}")  # fmt: skip
        words = []
        if metric in comps:
            words.append(f"{metric} {interval_text(comps[metric])}{_seeds_text(comps[metric])}")
        if "val/lm_loss" in comps:
            tol = conf.get("lm_tolerance")
            words.append(f"val/lm_loss {_lm_text(comps['val/lm_loss'])}{_seeds_text(comps['val/lm_loss'])}"
                         + (f" (tolerance +{tol:.0%})" if tol is not None else ""))  # fmt: skip
        for g, margin in (conf.get("guards") or {}).items():
            if g in comps:
                words.append(f"{g} {interval_text(comps[g])}{_seeds_text(comps[g])} (margin {margin:g})")
        words += [f"{h} significantly worse than the control" for h in d.get("harms") or []]
        text = f"{head}: {'; '.join(words)}" if words else head
        if not d["confirmed"]:
            text += f" — not shown: {_unshown(d)}"
        if d.get("correction"):
            text += f" (Holm over {len(decided)} finalists)"
        clauses.append(text)
    return "; ".join(clauses)


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
                "over it within the LM tolerance and the guards: nothing to confirm")  # fmt: skip
    paired = (summary.get("paired") or {}).get(best["trial_id"])
    if paired:
        return _paired_verdict(summary, best, control, paired)
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
    return ", ".join(words) + " (point estimates: no per-item records to pair)"


def _seeds_text(c: dict) -> str:
    """ " (seeds: +0.029, -0.008; 1.0 df)" where the seeds' spread sets the interval's degrees of freedom (fewer than
    one per seed): what makes it wide is that the seeds disagree, not the images."""
    per, df = c.get("per_seed") or [], c.get("df")
    if len(per) < 2 or df is None or not math.isfinite(df) or df >= len(per) + 1:
        return ""
    shown = ", ".join(f"{v:.2f}×" if c["kind"] == "ratio" else f"{v:+.3f}" for v in per)
    return f" (seeds: {shown}; {df:.1f} df)"


def _unshown(d: dict) -> str:
    """What the decision could not show, shortly ("val/lm_loss within +2%; val/pope/adversarial/fpr within 0.075")."""
    out = []
    for reason in d.get("failed") or []:
        metric = reason.split(" ", 1)[0]
        if "tolerance" in reason:
            out.append(f"{metric} within {reason.rsplit('within the ', 1)[-1].removesuffix(' tolerance')}")
        elif "margin" in reason:
            out.append(f"{metric} within {reason.rsplit('within the ', 1)[-1].removesuffix(' margin')}")
        elif "not shown" in reason:
            out.append(f"{metric} {reason.rsplit('not shown ', 1)[-1]} the control's")
        else:
            out.append(reason)
    return "; ".join(out) or d.get("why", "")


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
    margin = "screening margin" if summary.get("screening") else "margin"
    for g, spec in (summary.get("guards") or {}).items():
        if g in paired:
            words.append(f"{g} {interval_text(paired[g])}, within the {spec['max_loss']:g} {margin}")
    harms = (summary.get("harms") or {}).get(best["trial_id"]) or []
    words += [f"{h} significantly worse than the control" for h in harms]
    alike = summary.get("indistinguishable") or []
    if alike:
        words.append(f"indistinguishable from {', '.join(alike)} (paired with it: their difference's interval "
                     "includes none)")  # fmt: skip
    return "; ".join(words)


def summary_values(summary: dict) -> dict[str, float | str]:
    """What the search's W&B summary run keeps beside its report: the best trial, the verdict, and each paired
    comparison of the best with the control — ``val/amr_vs_control`` with ``_lo`` and ``_hi`` (a ratio, or a
    difference for metrics compared by difference); the confirmation's decision and its pooled comparisons under
    ``confirm/`` (``confirm/confirmed`` 1 or 0, ``confirm/why``, ``confirm/harms``)."""
    out: dict[str, float | str] = {}
    best = (summary.get("best") or {}).get("trial_id")
    if best:
        out["best/trial_id"] = best
    if summary.get("verdict"):
        out["verdict"] = summary["verdict"]
    for k, v in (summary.get("cost") or {}).items():
        out[f"search/cost/{k}"] = v
    conf = summary.get("confirmation") or {}
    for k, v in (conf.get("cost") or {}).items():
        out[f"confirm/cost/{k}"] = v
    decided = (conf.get("finalists") or {}).get(best or "") or {}
    if decided:
        out.update({"confirm/confirmed": int(decided["confirmed"]), "confirm/why": decided["why"],
                    "confirm/seeds": decided["seeds"], "confirm/images": decided["images"],
                    "confirm/harms": ", ".join(decided.get("harms") or []) or "none"})  # fmt: skip
    sources = [("", ((summary.get("paired") or {}).get(best) or {}) if best else {}),
               ("confirm/", decided.get("comparisons") or {})]  # fmt: skip
    for prefix, paired in sources:
        for metric, c in paired.items():
            key = f"{prefix}{metric}_vs_control"
            out.update({key: c["estimate"], f"{key}_lo": c["lo"], f"{key}_hi": c["hi"]})
    return out


def trial_roles(summary: dict) -> dict[str, list[str]]:
    """{trial_id: its W&B tags}: ``control``, ``best``, ``excluded:lm_loss`` (beyond the LM tolerance),
    ``excluded:<guard metric>`` for each guard it failed, ``worse:<metric>`` for each metric significantly worse
    than the control's; a finalist's runs (its search trial and the stage's) ``confirmed`` or ``not-confirmed``."""
    best = (summary.get("best") or {}).get("trial_id")
    conf = summary.get("confirmation") or {}
    decided = conf.get("finalists") or {}
    roles: dict[str, list[str]] = {}
    for r in summary.get("rows") or []:
        t = r["trial_id"]
        tags = ["control"] if r.get("control") else []
        tags += ["best"] if t == best else []
        tags += ["excluded:val/lm_loss"] if t in (summary.get("excluded_by_lm_tolerance") or []) else []
        tags += [f"excluded:{g}" for g in (summary.get("failed_guards") or {}).get(t, [])]
        tags += [f"worse:{h}" for h in (summary.get("harms") or {}).get(t, [])]
        tags += [_decided(decided[t])] if t in decided else []
        roles[t] = tags
    for arm in conf.get("arms") or []:
        if arm["run"] in roles:  # the search's own run of the finalist
            continue
        d = decided.get(arm["finalist"])
        roles[arm["run"]] = [arm["role"], f"seed:{arm['seed']}"] + ([_decided(d)] if d else [])
    return roles


def _decided(d: dict) -> str:
    return "confirmed" if d["confirmed"] else "not-confirmed"


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
            kind = "screening guard" if summary.get("screening") else "guard"
            final = (summary.get("confirmation") or {}).get("guards") or {}
            then = f"; the confirmation decides at {final[metric]:g}" if metric in final else ""
            out.append(
                f"{kind} {metric} (non-inferiority: {worse} than the control by at most {g['max_loss']:g}, "
                f"on the paired 95 % interval's bound{then}): control {g['control']:.4g}; failed by {by}"
            )
            continue
        worse = "may fall by at most" if g["mode"] == "max" else "may rise by at most"
        out.append(f"guard {metric} ({worse} {g['max_loss']:g}): control {g['control']:.4g}, limit "
                   f"{g['limit']:.4g}; failed by {by}")  # fmt: skip
    return out
