"""The end of a search: the ranked table, failed trials with their reasons, the best trial's adapter exported
(`summarise`, what ``summary.json`` holds), and the report with its W&B summary run (`report`)."""

from __future__ import annotations

import logging
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
from raysal.search.optuna_params import CONTROL_KEY, params_to_overrides
from raysal.search.override_text import format_override
from raysal.search.report_html import build_report
from raysal.search.space import SearchSpec
from raysal.search.verdict import interval_text

log = logging.getLogger("raysal.tune")


def trial_overrides(base: list[str], params: dict[str, Any], control: tuple[str, ...] = ()) -> list[str]:
    """A trial's Hydra overrides: the search's base + its sampled values (the control: base + control overrides)."""
    if params.get(CONTROL_KEY):
        return [*base, *control]
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
        marks = [" (lm > limit)"] if row["trial_id"] in excluded else []
        marks += [f" (guard: {g})" for g in failed_guards.get(row["trial_id"], [])]
        mark = " (best)" if row is best else "".join(marks)
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


def summarise(result_grid: Any, spec: SearchSpec, base: list[str], search_dir: str, top: int = 10) -> dict:
    """What summary.json holds: the ranked trials with replay commands, the failed ones with their reasons, the
    choice of the best (`choose_best`: the control, the LM tolerance, the guards); the best trial's best
    checkpoint exported."""
    metric, mode = spec.objectives[0].metric, spec.objectives[0].mode
    rows, failed = collect_trials(result_grid, spec, base, search_dir)
    control = spec.control
    best, decision = choose_best(rows, metric, mode, control.lm_tolerance if control else None,
                                 control.guards if control else (), trial_records(rows, search_dir))  # fmt: skip
    rows.sort(key=lambda x: x["metrics"][metric], reverse=mode == "max")
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
        "table": table(rows, failed, spec, best, decision, top),
    }
    if best is not None:
        summary.update(export_best_trial(best, search_dir, metric, mode))
    return summary


def export_best_trial(best: dict, search_dir: str, metric: str, mode: str) -> dict:
    """The best trial's best checkpoint (by the objective) exported into the search folder → the summary's
    ``best`` and ``best_adapter`` (a LoRA trial) or ``best_model`` (full finetuning); nothing without one."""
    run = ray.train.Result.from_path(storage.join(search_dir, "trials", best["trial_id"]))
    ckpt = run.get_best_checkpoint(metric, mode)
    if ckpt is None:
        return {}
    metrics = next(m for c, m in run.best_checkpoints if c.path == ckpt.path)
    out: dict[str, Any] = {"best": {"trial_id": best["trial_id"], "replay": best["replay"], "checkpoint": ckpt.path}}
    key, path = export_best(ckpt, search_dir, {**metrics, **out["best"]})
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
