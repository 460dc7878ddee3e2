"""The end of a search: the ranked table, failed trials with their reasons, the best trial's adapter exported
(`summarise`, what ``summary.json`` holds), and the report with its W&B summary run (`report`)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import ray.train

from raysal import storage
from raysal.metrics.records import RECORDS_FILE, ItemRecords, grounding_metrics
from raysal.orchestration.train.errors import first_line
from raysal.orchestration.train.fail_reason import read_reason
from raysal.orchestration.train.spec import RunSpec
from raysal.orchestration.train.trainer import export_best
from raysal.orchestration.train.wandb_run import log_search_summary
from raysal.search.control import choose_best
from raysal.search.cost import cost_text, search_cost, trial_cost
from raysal.search.finalists import ARM_KEY, Arm
from raysal.search.optuna_params import CONTROL_KEY, params_to_overrides
from raysal.search.override_text import format_override
from raysal.search.report_html import build_report
from raysal.search.space import SearchSpec
from raysal.search.verdict import interval_text

log = logging.getLogger("raysal.tune")


def trial_overrides(base: list[str], params: dict[str, Any], control: tuple[str, ...] = ()) -> list[str]:
    """A trial's Hydra overrides: the search's base + its sampled values (the control: base + control overrides; a
    run of the finalists' stage: base + its arm's, `raysal.search.finalists`)."""
    if params.get(CONTROL_KEY):
        return [*base, *control]
    if ARM_KEY in params:
        return [*base, *Arm.from_config(params[ARM_KEY]).overrides]
    return [*base, *(format_override(k, v) for k, v in params_to_overrides(params).items())]


# shown when a trial reported them: the hallucination rate and the localisation readout beside the objective
READOUT_COLUMNS = ("val/pope/adversarial/f1", "val/pope/adversarial/fpr", "val/rec_acc50")


def table_columns(rows: list[dict], spec: SearchSpec, guards: dict[str, Any]) -> list[str]:
    """The table's metric columns: the objectives, val/lm_loss (the LM guard), each guard's metric, then the POPE
    and readout metrics any trial reported; each once, in that order."""
    wanted = [*(o.metric for o in spec.objectives), "val/lm_loss", *guards, *READOUT_COLUMNS]
    first = wanted[: len(spec.objectives) + 1]  # always shown, reported or not
    return list(dict.fromkeys(c for c in wanted if c in first or any(c in r["metrics"] for r in rows)))


def _trial_id(result: Any) -> str:
    return (result.metrics or {}).get("trial_id") or storage.name(result.path)  # trial folders: named by trial id


def collect_trials(result_grid: Any, spec: SearchSpec, base: list[str], search_dir: str) -> tuple[list, list]:
    """→ (rows: the trials that reported the objective, failed: those that failed, with their reasons). A failed
    trial (diverged, stalled, errored) is never ranked, whatever it reported before."""
    metric = spec.objectives[0].metric
    control = spec.control.overrides if spec.control else ()
    rows, failed = [], []
    for r in result_grid:
        trial_id, metrics = _trial_id(r), r.metrics or {}
        replay = "python -m raysal.train " + " ".join(trial_overrides(base, r.config, control))
        if r.error is not None:
            reason = read_reason(storage.join(search_dir, "trials", trial_id)) or first_line(str(r.error))
            failed.append({"trial_id": trial_id, "reason": reason, "replay": replay})
        elif metric in metrics:
            rows.append({"trial_id": trial_id, "metrics": metrics, "config": r.config, "replay": replay})
    return rows, failed


def trial_records(rows: list[dict], search_dir: str) -> dict[str, ItemRecords]:
    """{trial_id: the per-item records of the evaluation its reported metrics come from (the latest checkpoint of
    its Train run, ``eval_records.json``)}, read through the storage layer. A trial whose records are missing, or
    do not reproduce its reported LM loss, is left out and said: it is judged as having no paired comparison."""
    out: dict[str, ItemRecords] = {}
    for row in rows:
        run_dir = storage.join(search_dir, "trials", row["trial_id"])
        try:
            latest = ray.train.Result.from_path(run_dir).checkpoint
        except Exception as e:  # no Train run snapshot: nothing to pair
            log.warning("trial %s: no Train run to read its evaluation records from (%s)", row["trial_id"], e)
            continue
        if latest is None:
            continue
        path = storage.join(run_dir, storage.name(latest.path), RECORDS_FILE)
        try:
            if not storage.exists(path):
                continue  # evaluations from before records were kept
            records = ItemRecords.from_json(storage.read_text(path))
        except (OSError, ValueError) as e:
            log.warning("trial %s: its evaluation records %s cannot be read: %s", row["trial_id"], path, e)
            continue
        lm = grounding_metrics(records.images)["lm_loss"] if records.images["image_id"] else None
        if lm is not None and lm != row["metrics"].get("val/lm_loss"):
            log.warning("trial %s: %s is not the evaluation its metrics come from (val/lm_loss %s, records %s)",
                        row["trial_id"], path, row["metrics"].get("val/lm_loss"), lm)  # fmt: skip
            continue
        out[row["trial_id"]] = records
    return out


def table(rows: list[dict], failed: list[dict], spec: SearchSpec, best: dict | None, decision: dict,
          top: int) -> str:  # fmt: skip
    """The console's and the report's markdown table: the top ranked trials, then the failed ones. A trial compared
    paired with the control shows, beside each value, its ratio or difference with the control's and the 95 %
    interval (``4.2 (2.33× [1.90, 2.80])``)."""
    control = spec.control.overrides if spec.control else ()
    excluded, failed_guards = set(decision["excluded_by_lm_tolerance"]), decision["failed_guards"]
    unranked, harms = decision.get("unranked") or {}, decision.get("harms") or {}
    columns = table_columns(rows, spec, decision["guards"])
    lines = [
        f"| rank | trial | {' | '.join(columns)} | step | cost | sampled parameters | replay |",
        "|---|---|" + "---|" * len(columns) + "---|---|---|---|",
    ]
    for i, row in enumerate(rows[:top]):
        shown = " ".join(format_override(k, v) for k, v in params_to_overrides(row["config"]).items())
        is_control = bool(row["config"].get(CONTROL_KEY))
        if is_control:
            shown = "control: " + " ".join(control)
        t = row["trial_id"]
        marks = [f" ({unranked[t]})"] if t in unranked else []
        marks += [" (lm > limit)"] if t in excluded else []
        marks += [f" (guard: {g})" for g in failed_guards.get(t, [])]
        # a harm is named even where it is within its margin, the best's too
        worse = f" (significantly worse than the control: {', '.join(harms[t])})" if harms.get(t) else ""
        mark = (" (best)" if row is best else "".join(marks)) + worse
        paired = decision.get("paired", {}).get(row["trial_id"], {})
        values = " | ".join(f"{row['metrics'].get(c, float('nan')):.4g}"
                            + (f" ({interval_text(paired[c])})" if c in paired and not is_control else "")
                            for c in columns)  # fmt: skip
        cost = trial_cost(row["metrics"])
        lines.append(
            f"| {i + 1}{mark} | {row['trial_id']} | {values} | "
            f"{row['metrics'].get('train/step', float('nan')):.0f} | {cost_text(cost) if cost else ''} | {shown} | "
            f"`{row['replay']}` |"
        )
    for f in failed:
        lines.append(f"| failed | {f['trial_id']} | {'| ' * len(columns)}| | {f['reason']} | `{f['replay']}` |")
    return "\n".join(lines)


def summary_row(row: dict, decision: dict) -> dict:
    """One ranked trial as summary.json keeps it, for `python -m raysal.report`."""
    failed_guards = decision["failed_guards"].get(row["trial_id"], [])
    return {
        "trial_id": row["trial_id"],
        "control": bool(row["config"].get(CONTROL_KEY)),
        "params": params_to_overrides(row["config"]),
        "metrics": {k: v for k, v in row["metrics"].items() if k.startswith(("val/", "train/", "cost/"))},
        "cost": trial_cost(row["metrics"]),
        "guards": {g: g not in failed_guards for g in decision["guards"]},
        "replay": row["replay"],
    }


def _ranked(metric: str, mode: str):
    """Sort key: the best first, a non-finite objective last (a NaN compares false both ways: it could sort
    anywhere)."""

    def key(row: dict) -> tuple[int, float]:
        v = row["metrics"].get(metric)
        ok = isinstance(v, int | float) and math.isfinite(v)
        return (0, -v if mode == "max" else v) if ok else (1, 0.0)

    return key


def summarise(result_grid: Any, spec: SearchSpec, base: list[str], search_dir: str, top: int = 10) -> dict:
    """What summary.json holds of the search: the ranked trials with replay commands, the failed ones with their
    reasons, the choice of the best (`choose_best`: the control, the budget, the LM tolerance, the screening
    guards) and its finalists. Each trial is judged at its last evaluation: the checkpoint whose records are
    compared here is the one the finalists' stage confirms and `settle` exports."""
    metric, mode = spec.objectives[0].metric, spec.objectives[0].mode
    rows, failed = collect_trials(result_grid, spec, base, search_dir)
    control = spec.control
    best, decision = choose_best(rows, metric, mode, control.lm_tolerance if control else None,
                                 control.screening_guards if control else (), trial_records(rows, search_dir),
                                 top_k=spec.finalists.top_k if spec.finalists else 1)  # fmt: skip
    rows.sort(key=_ranked(metric, mode))
    summary: dict[str, Any] = {
        "search": spec.name,
        "metric": metric,
        "mode": mode,
        "trials": len(result_grid),
        "reported": len(rows),
        "trials_dir": storage.join(search_dir, "trials"),
        "rows": [summary_row(row, decision) for row in rows],
        "failed": failed,
        "cost": search_cost(trial_cost(r.metrics or {}) for r in result_grid),
        **decision,
        "screening": bool(control and control.screening is not None),
        "table": table(rows, failed, spec, best, decision, top),
    }
    if best is not None:
        summary["best"] = {"trial_id": best["trial_id"], "replay": best["replay"]}
    return summary


def settle(summary: dict, search_dir: str) -> dict:
    """The search's answer once the finalists' stage decided: the winner — the confirmed finalist with the best
    pooled objective, else the search's best, unconfirmed — with its judged checkpoint (its last, the one its
    records were compared on and confirmed) exported into the search folder → the summary's ``best``,
    ``confirmed`` (None without a stage), ``why`` and ``best_adapter`` (a LoRA trial) or ``best_model``."""
    best = summary.get("best")
    if not best:
        return {"confirmed": None}
    conf = summary.get("confirmation") or {}
    decided = conf.get("finalists") or {}
    winner, confirmed, why = best["trial_id"], None, None
    if decided:
        yes = [f for f, d in decided.items() if d["confirmed"]]
        metric = summary["metric"]
        estimate = lambda f: (decided[f]["comparisons"].get(metric) or {}).get("estimate", -math.inf)  # noqa: E731
        winner = max(yes, key=estimate) if yes else next(iter(decided))
        confirmed, why = bool(yes), decided[winner]["why"]
    row = next((r for r in summary["rows"] if r["trial_id"] == winner), None)
    out: dict[str, Any] = {"confirmed": confirmed, "why": why}
    out["best"] = {"trial_id": winner, "replay": row["replay"] if row else best["replay"], "confirmed": confirmed}
    run = ray.train.Result.from_path(storage.join(search_dir, "trials", winner))
    ckpt = run.checkpoint  # the judged one: its last evaluation, at the full budget
    if ckpt is None:
        return out
    out["best"]["checkpoint"] = ckpt.path
    metrics = {**(row["metrics"] if row else {}), **out["best"], "why": why}
    key, path = export_best(ckpt, search_dir, metrics)
    out[key] = path
    return out


def report(
    search_dir: str, run_spec: RunSpec, wandb_mode: str, wandb_local: Path, name: str,
    values: dict[str, Any] | None = None, table: tuple[list[str], list[list]] | None = None,
) -> None:  # fmt: skip
    """report.html + the W&B summary run; a finished search stays finished if its report fails (said, not hidden).
    ``wandb_local``: the driver's local folder for W&B files (mirrored into the search folder)."""
    try:
        report = build_report(search_dir)
        print(f"raysal: report {report.html}", flush=True)
        w = run_spec.wandb
        log_search_summary(report.figures, project=w["project"], entity=w.get("entity"), group=name, mode=wandb_mode,
                           directory=wandb_local, mirror_to=search_dir, tags=w.get("tags") or None,
                           values=values, table=table)  # fmt: skip
    except Exception as e:
        log.warning("the search report could not be written (python -m raysal.report %s retries): %s", search_dir, e)
