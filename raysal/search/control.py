"""The LM-only control trial and the honest best.

An objective like val/amr alone can be won by a model that no longer speaks (a dead model's flat attention scored
a higher AMR than a healthy one's). So every search runs an LM-only control trial first, enqueued in the Optuna
study before any sampling and never stopped early, and the best trial is the one with the best objective among
the trials whose val/lm_loss is within ``lm_tolerance`` of the control's and that pass the space file's guards
(``control.guards``: POPE's hallucination rate, say; `raysal.search.guards`). The constraint is applied when choosing
the best, not inside Optuna: TPE keeps learning from every trial's objective (a trial that hurt language still
tells it where grounding is), ASHA keeps its single metric, and the rule is one line a user can check in the
table. If the control failed, no trial is best (the summary says why): a search with a control never ends with a
winner it could not judge; a file that wants none says ``control: null``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import optuna
from optuna.trial import TrialState

from raysal.metrics.paired import Comparison, comparable, compare
from raysal.metrics.records import ItemRecords
from raysal.search.guards import Guard, judge
from raysal.search.optuna_params import CONTROL_KEY
from raysal.search.space import SearchSpec

LM_METRIC = "val/lm_loss"


def open_study(study_name: str, storage: optuna.storages.BaseStorage | str, spec: SearchSpec) -> optuna.Study:
    """The search's study (created on first use) with the objectives' directions."""
    modes = [o.mode for o in spec.objectives]
    directions = ["maximize" if m == "max" else "minimize" for m in modes]
    return optuna.create_study(
        storage=storage, study_name=study_name, load_if_exists=True,
        **({"direction": directions[0]} if len(directions) == 1 else {"directions": directions}),
    )  # fmt: skip


LOST = "lost with the search driver before Tune recorded it; sampled again"


def settle_study(
    study: optuna.Study, known: set[int], *, want_control: bool, fresh: bool, control_params: dict | None = None
) -> dict[str, int]:
    """Make the study agree with the Tune experiment that is about to run.

    ``known``: the study's trial ids (``_trial_id``) that the Tune experiment knows (none on a fresh start). A
    RUNNING trial Tune does not know was created by a driver that died before Tune saved its state: nobody will
    ever finish it, so it is marked FAIL with the reason. The control is one trial across restarts: a fresh start
    queues it (unless it is queued already), a restore queues it again only if the lost trial was the control (a
    finished control, or one Tune knows, stays the control); ``control_params``: its values as fixed parameters
    (`raysal.search.sampling.fixed_values`). → counts of what was done."""
    storage = study._storage
    trials = study.get_trials(deepcopy=False)
    lost = [t for t in trials if t.state == TrialState.RUNNING and t._trial_id not in known]
    for t in lost:
        storage.set_trial_user_attr(t._trial_id, "fail_reason", LOST)
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    queued = any(t.state == TrialState.WAITING and t.user_attrs.get(CONTROL_KEY) for t in trials)
    lost_control = any(t.user_attrs.get(CONTROL_KEY) for t in lost)
    enqueue = want_control and not queued and (fresh or lost_control)
    if enqueue:
        study.enqueue_trial(dict(control_params or {}), user_attrs={CONTROL_KEY: True})
    return {"lost": len(lost), "control_enqueued": int(enqueue)}


def paired_comparisons(
    rows: list[dict], control: dict, metrics: list[str], records: dict[str, ItemRecords]
) -> dict[str, dict[str, Comparison]] | None:
    """{trial_id: {metric: the trial against the control on the same images}} for every row with per-item records
    (the control against itself included: a ratio of 1, a difference of 0); None when the control has none (a
    search from before records were kept, or evaluations without them)."""
    base = records.get(control["trial_id"])
    if base is None:
        return None
    out: dict[str, dict[str, Comparison]] = {}
    for r in rows:
        mine = records.get(r["trial_id"])
        if mine is None:
            continue
        out[r["trial_id"]] = {}
        for m in metrics:
            if comparable(m) and m in r["metrics"] and m in control["metrics"]:
                # no shared image for this metric: no comparison, said by its absence (a guard then fails)
                with contextlib.suppress(ValueError):
                    out[r["trial_id"]][m] = compare(mine, base, m)
    return out


def significantly_worse(c: Comparison | dict, mode: str) -> bool:
    """Whether the interval of a comparison with the control excludes "no harm": its better bound lies on the worse
    side of no change (a ratio's 1, a difference's 0). Said of a trial even when the harm is within its margin
    (CONSORT for non-inferiority trials): ``mode`` is the metric's better side."""
    get = c.get if isinstance(c, dict) else lambda k: getattr(c, k)
    none = 1.0 if get("kind") == "ratio" else 0.0
    lo, hi = get("lo"), get("hi")
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return False
    return hi < none if mode == "max" else lo > none


def _unranked(rows: list[dict], control: dict | None, metric: str) -> dict[str, str]:
    """{trial_id: why it is not ranked}: a non-finite objective (a NaN can sort anywhere), or a budget short of the
    control's (a trial that ASHA stopped at a rung trained less, mid-schedule: it is compared at unequal steps)."""
    out: dict[str, str] = {}
    budget = (control or {}).get("metrics", {}).get("train/step")
    for r in rows:
        value = r["metrics"].get(metric)
        if not isinstance(value, int | float) or not math.isfinite(value):
            out[r["trial_id"]] = f"{metric} is {value}: not ranked"
            continue
        step = r["metrics"].get("train/step")
        if budget is not None and r is not control and (step is None or step < budget):
            at = "no step reported" if step is None else f"stopped at step {step:.0f}"
            out[r["trial_id"]] = f"{at}, the control trained {budget:.0f}: not eligible at an unequal budget"
    return out


def choose_best(
    rows: list[dict],
    metric: str,
    mode: str,
    lm_tolerance: float | None,
    guards: tuple[Guard, ...] = (),
    records: dict[str, ItemRecords] | None = None,
    top_k: int = 1,
) -> tuple[dict | None, dict]:
    """rows: {"trial_id", "metrics", "config", ...} of trials that did not fail, each judged at its last evaluation
    (the checkpoint its ``records`` come from, and the one exported and confirmed); ``records``: {trial_id: those
    per-item records}. → (best row, what was decided): the best ``metric`` among the *eligible* rows — a finite
    objective, the control's budget reached (``train/step``: a trial stopped early by ASHA cannot win), shown
    within ``lm_tolerance`` of the control's val/lm_loss and non-inferior on every guard (`raysal.search.guards`;
    during a search these are its screening margins); the control is eligible. With records, both are paired
    decisions on 95 % intervals (the LM loss's ratio's upper bound ≤ 1 + lm_tolerance), every trial's comparisons
    are in ``paired``, a metric whose interval excludes no harm is named in ``harms`` (even within its margin),
    and every eligible runner-up is compared with the best directly, paired on the same images (``vs_best``; those
    whose interval includes no difference are ``indistinguishable``); without, point estimates (``rule``:
    "point"). ``finalists``: the ``top_k`` best eligible aligned trials. Without a control that reported what it
    is judged on, none is best (``warning`` says why)."""
    control = next((r for r in rows if r["config"].get(CONTROL_KEY)), None)
    decision: dict[str, Any] = {"control": None, "lm_limit": None, "excluded_by_lm_tolerance": [], "guards": {},
                                "failed_guards": {}, "rule": "point", "paired": {}, "harms": {},
                                "indistinguishable": [], "vs_best": {}, "finalists": []}  # fmt: skip
    unranked = _unranked(rows, control, metric)
    decision["unranked"] = unranked
    paired = None
    if control is not None and records:
        wanted = [metric, LM_METRIC, *(g.metric for g in guards)]
        paired = paired_comparisons(rows, control, list(dict.fromkeys(wanted)), records)
        if paired is not None:
            decision.update(rule="paired", paired={t: {m: c.as_dict() for m, c in cs.items()}
                                                   for t, cs in paired.items()})  # fmt: skip
            modes = {LM_METRIC: "min", **{g.metric: g.mode for g in guards}}
            decision["harms"] = {t: [m for m, c in cs.items() if m in modes and significantly_worse(c, modes[m])]
                                 for t, cs in paired.items()}  # fmt: skip
            decision["harms"] = {t: h for t, h in decision["harms"].items() if h}
    eligible = [r for r in rows if r["trial_id"] not in unranked]
    if lm_tolerance is not None and control is not None and LM_METRIC in control["metrics"]:
        limit = control["metrics"][LM_METRIC] * (1 + lm_tolerance)
        decision.update(control=control["trial_id"], lm_limit=limit)

        def within(r: dict) -> bool:
            if r is control:
                return True
            if paired is not None:
                c = paired.get(r["trial_id"], {}).get(LM_METRIC)
                return c is not None and math.isfinite(c.hi) and c.hi <= 1 + lm_tolerance
            return r["metrics"].get(LM_METRIC, float("inf")) <= limit

        excluded = [r["trial_id"] for r in rows if not within(r)]
        decision["excluded_by_lm_tolerance"] = excluded
        eligible = [r for r in eligible if r["trial_id"] not in excluded]
    elif lm_tolerance is not None or guards:
        # the LM guard is what makes the best honest: without a finished control no trial can be judged
        decision["warning"] = "the LM-only control did not finish: no trial can be judged against it, none is best"
        return None, decision
    if guards:
        try:
            table, failed = judge(rows, control, guards, paired)
        except ValueError as e:
            decision["warning"] = f"{e}: no trial can be judged, none is best"
            return None, decision
        decision.update(control=control["trial_id"], guards=table,
                        failed_guards={t: f for t, f in failed.items() if f})  # fmt: skip
        eligible = [r for r in eligible if not failed[r["trial_id"]]]
    ranked = sorted(eligible, key=lambda r: r["metrics"][metric], reverse=mode == "max")
    best = ranked[0] if ranked else None
    decision["finalists"] = [r["trial_id"] for r in ranked if r is not control][:top_k]
    if best is not None and records:
        decision["vs_best"] = _against_best(best, ranked[1:], metric, records)
        decision["indistinguishable"] = [t for t, c in decision["vs_best"].items() if _includes_none(c)]
    return best, decision


def _includes_none(c: dict) -> bool:
    none = 1.0 if c["kind"] == "ratio" else 0.0
    return math.isfinite(c["lo"]) and math.isfinite(c["hi"]) and c["lo"] <= none <= c["hi"]


def _against_best(best: dict, others: list[dict], metric: str, records: dict[str, ItemRecords]) -> dict[str, dict]:
    """{runner-up: its ``metric`` against the best's, paired on the images both evaluated}: whether the data tell
    them apart is a comparison of the two, not of their two intervals against the control (which overlap for
    pairs a direct comparison separates)."""
    mine = records.get(best["trial_id"])
    out: dict[str, dict] = {}
    if mine is None or not comparable(metric):
        return out
    for r in others:
        theirs = records.get(r["trial_id"])
        if theirs is None:
            continue
        with contextlib.suppress(ValueError):  # no shared image: no comparison
            out[r["trial_id"]] = compare(theirs, mine, metric).as_dict()
    return out
