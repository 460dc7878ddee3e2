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
        "-0.004 [-0.030, +0.020], within the 0.1 margin; indistinguishable from b (their intervals overlap)"
    )


def test_the_confirmation_figures_follow_the_selection_figures():
    s = _summary("a")
    s["confirmation"] = {
        "images": 9,
        "best": {"trial_id": "a", "metrics": {"val/amr": 2.0}},
        "paired": {"val/amr": {"kind": "ratio", "estimate": 1.8, "lo": 1.2, "hi": 2.6, "images": 9},
                   "val/lm_loss": {"kind": "ratio", "estimate": 1.0, "lo": 0.99, "hi": 1.02, "images": 9}},
    }  # fmt: skip
    assert verdict(s).endswith(
        "; confirmed on 9 images never chosen on: val/amr 1.80× [1.20, 2.60] the control's; val/lm_loss +0.0% "
        "[-1.0%, +2.0%]"
    )
    s["confirmation"]["paired"] = {}
    assert verdict(s).endswith("; confirmed on 9 images never chosen on: val/amr 2")


def test_the_search_summary_run_keeps_the_comparisons_with_their_intervals(tmp_path):
    """What W&B will show: the summary run's summary, read back from the offline run file."""
    from wandb_records import read_run

    from raysal.orchestration.train.wandb_run import log_search_summary
    from raysal.search.verdict import summary_values

    s = _summary("a")
    s["paired"] = {"a": {"val/amr": {"kind": "ratio", "estimate": 4.0, "lo": 3.1, "hi": 5.2, "images": 19}}}
    s["confirmation"] = {
        "images": 9,
        "best": {"metrics": {}},
        "paired": {
            "val/pope/adversarial/fpr": {"kind": "difference", "estimate": 0.01, "lo": -0.02, "hi": 0.04, "images": 9}
        },
    }
    s["verdict"] = verdict(s)
    values = summary_values(s)
    log_search_summary({}, project="p", entity=None, group="g", mode="offline", directory=tmp_path / "w",
                       mirror_to=str(tmp_path / "search"), values=values)  # fmt: skip
    (run_file,) = (tmp_path / "search" / "wandb").glob("offline-run-*-g-summary/run-*.wandb")
    summary = read_run(run_file)["summary"]
    assert summary["best/trial_id"] == "a" and summary["verdict"] == s["verdict"]
    assert (summary["val/amr_vs_control"], summary["val/amr_vs_control_lo"], summary["val/amr_vs_control_hi"]) == (
        4.0, 3.1, 5.2)  # fmt: skip
    assert summary["confirm/val/pope/adversarial/fpr_vs_control_hi"] == 0.04
