"""The search's result in plain words (`raysal.search.verdict`): the console's and the report's last sentence."""

from __future__ import annotations

from raysal.search.verdict import verdict


def _summary(best: str | None, guards: bool = True) -> dict:
    rows = [
        {"trial_id": "c", "control": True, "metrics": {"val/amr": 1.5, "val/lm_loss": 0.75}},
        {"trial_id": "a", "control": False, "metrics": {"val/amr": 6.0, "val/lm_loss": 0.7575}},
    ]
    return {"metric": "val/amr", "mode": "max", "rows": rows, "control": "c", "lm_limit": 0.765,
            "best": {"trial_id": best} if best else None, "guards": {"val/pope/adversarial/fpr": {}} if guards else {},
            "warning": "the control did not report val/pope/adversarial/fpr"}  # fmt: skip


def test_an_aligned_winner_is_said_as_a_multiple_of_the_control_at_its_lm_cost():
    text = verdict(_summary("a"))
    assert text == (
        "best trial a reaches val/amr 6, 4.00× the control's (1.5), at val/lm_loss +1.0% against the "
        "control (limit +2.0%), passing its 1 guard(s) (point estimates: no per-item records to pair)"
    )


def test_a_control_that_wins_and_no_winner_are_said_too():
    assert verdict(_summary("c")).startswith("the LM-only control c is best (val/amr 1.5): no aligned trial")
    assert verdict(_summary(None)) == "no trial could be chosen best: the control did not report " \
                                      "val/pope/adversarial/fpr"  # fmt: skip
    no_control = {**_summary("a"), "control": None}
    assert verdict(no_control) is None


def test_a_paired_winner_is_said_with_its_intervals():
    s = _summary("a")
    s["guards"] = {"val/pope/adversarial/f1": {"max_loss": 0.1, "mode": "max"}}
    s["rows"][1]["metrics"]["val/pope/adversarial/f1"] = 0.79
    s["paired"] = {"a": {
        "val/amr": {"kind": "ratio", "estimate": 4.0, "lo": 3.1, "hi": 5.2, "images": 19},
        "val/lm_loss": {"kind": "ratio", "estimate": 1.01, "lo": 1.004, "hi": 1.016, "images": 19},
        "val/pope/adversarial/f1": {"kind": "difference", "estimate": -0.004, "lo": -0.03, "hi": 0.02, "images": 19},
    }}  # fmt: skip
    s["indistinguishable"] = ["b"]
    assert verdict(s) == (
        "best trial a reaches val/amr 6, 4.00× [3.10, 5.20] the control's (1.5) on 19 paired images (95 % "
        "intervals); val/lm_loss +1.0% [+0.4%, +1.6%] against the control (limit +2.0%); val/pope/adversarial/f1 "
        "-0.004 [-0.030, +0.020], within the 0.1 margin; indistinguishable from b (paired with it: their "
        "difference's interval includes none)"
    )
    # a harm is named even within its margin, and a screening margin says so
    s.update(screening=True, harms={"a": ["val/lm_loss"]})
    assert "within the 0.1 screening margin; val/lm_loss significantly worse than the control;" in verdict(s)


def _decided(confirmed: bool) -> dict:
    comps = {"val/amr": {"kind": "ratio", "estimate": 1.8, "lo": 1.2, "hi": 2.6, "images": 90},
             "val/lm_loss": {"kind": "ratio", "estimate": 1.0, "lo": 0.99, "hi": 1.02, "images": 90},
             "val/pope/adversarial/fpr": {"kind": "difference", "estimate": 0.06, "lo": 0.02, "hi": 0.10,
                                          "images": 90}}  # fmt: skip
    why = "every condition holds" if confirmed else "val/pope/adversarial/fpr +0.060 [+0.020, +0.100]: not shown " \
        "within the 0.05 margin"  # fmt: skip
    return {
        "confirmed": confirmed,
        "why": why,
        "seeds": 3,
        "images": 90,
        "pope_images": 80,
        "comparisons": comps,
        "harms": ["val/pope/adversarial/fpr"],
        "correction": None,
        "failed": [] if confirmed else [why],
    }


def test_the_verdict_leads_with_the_confirmations_decision_and_its_reason():
    s = _summary("a")
    s["confirmation"] = {"finalists": {"a": _decided(False)}, "lm_tolerance": 0.02,
                         "guards": {"val/pope/adversarial/fpr": 0.05}}  # fmt: skip
    text = verdict(s)
    assert text.startswith(
        "not confirmed: finalist a against its matched control over 3 seeds × 90 confirmation images (80 with POPE's "
        "questions): val/amr 1.80× [1.20, 2.60]; val/lm_loss +0.0% [-1.0%, +2.0%] (tolerance +2%); "
        "val/pope/adversarial/fpr +0.060 [+0.020, +0.100] (margin 0.05); val/pope/adversarial/fpr significantly worse "
        "than the control — not shown: val/pope/adversarial/fpr within 0.05. Chosen by the search: best trial a "
        "reaches val/amr 6"
    ), text
    s["confirmation"]["finalists"]["a"] = _decided(True)
    assert verdict(s).startswith("confirmed: finalist a against its matched control over 3 seeds")
    s["cost"] = {"trials": 4, "gpu_hours": 3.0, "worker_hours": 3.0, "eval_fraction": 0.2, "train_s": 1, "eval_s": 1}
    s["confirmation"]["cost"] = {"gpu_hours": 1.0, "worker_hours": 1.0}
    assert verdict(s).endswith("; the search cost 3 GPU-h (evaluation 20%) over 4 trial(s); the confirmation 1 GPU-h "
                               "(25% of the whole)")  # fmt: skip


def test_the_search_summary_run_keeps_the_comparisons_with_their_intervals(tmp_path):
    """What W&B will show: the summary run's summary, read back from the offline run file."""
    from wandb_records import read_run

    from raysal.orchestration.train.wandb_run import log_search_summary
    from raysal.search.verdict import summary_values

    s = _summary("a")
    s["paired"] = {"a": {"val/amr": {"kind": "ratio", "estimate": 4.0, "lo": 3.1, "hi": 5.2, "images": 19}}}
    s["confirmation"] = {"finalists": {"a": _decided(False)}, "cost": {"gpu_hours": 0.5, "worker_hours": 0.5}}
    s["verdict"] = verdict(s)
    values = summary_values(s)
    log_search_summary({}, project="p", entity=None, group="g", mode="offline", directory=tmp_path / "w",
                       mirror_to=str(tmp_path / "search"), values=values)  # fmt: skip
    (run_file,) = (tmp_path / "search" / "wandb").glob("offline-run-*-g-summary/run-*.wandb")
    summary = read_run(run_file)["summary"]
    assert summary["best/trial_id"] == "a" and summary["verdict"] == s["verdict"]
    assert (summary["val/amr_vs_control"], summary["val/amr_vs_control_lo"], summary["val/amr_vs_control_hi"]) == (
        4.0, 3.1, 5.2)  # fmt: skip
    assert summary["confirm/val/pope/adversarial/fpr_vs_control_hi"] == 0.10 and summary["confirm/confirmed"] == 0
    assert summary["confirm/harms"] == "val/pope/adversarial/fpr" and summary["confirm/cost/gpu_hours"] == 0.5
    assert summary["confirm/why"].endswith("not shown within the 0.05 margin")


def test_every_run_of_the_finalists_stage_is_tagged_with_its_role_seed_and_the_decision():
    from raysal.search.verdict import trial_roles

    s = _summary("a")
    s["rows"][0]["control"] = True
    s["harms"] = {"a": ["val/lm_loss"]}
    s["confirmation"] = {"finalists": {"a": _decided(True)}, "arms": [
        {"run": "a", "finalist": "a", "role": "finalist", "seed": 0},
        {"run": "c", "finalist": "a", "role": "matched-control", "seed": 0},
        {"run": "x_00000", "finalist": "a", "role": "finalist", "seed": 1},
        {"run": "x_00001", "finalist": "a", "role": "matched-control", "seed": 1}]}  # fmt: skip
    roles = trial_roles(s)
    assert roles["a"] == ["best", "worse:val/lm_loss", "confirmed"] and roles["c"] == ["control"]
    assert roles["x_00000"] == ["finalist", "seed:1", "confirmed"] and roles["x_00001"][:2] == [
        "matched-control",
        "seed:1",
    ]
