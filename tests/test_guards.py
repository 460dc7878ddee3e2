"""Guards against the control: which way each metric is worse, the space file's `control.guards`, the best chosen
only among trials that pass them, and what the summary and console say of each."""

from __future__ import annotations

import json
import math
import re

import pytest
from search_space_files import minimal, write

from raysal.metrics.records import ItemRecords
from raysal.search.control import choose_best
from raysal.search.guards import Guard, direction
from raysal.search.optuna_params import CONTROL_KEY
from raysal.search.space_file import SearchSpaceError, load_search_space
from raysal.search.verdict import guard_lines


def test_each_metric_has_its_better_side():
    assert direction("val/pope/adversarial/f1") == "max" and direction("val/pope/random/auroc") == "max"
    assert direction("val/pope/popular/fpr") == "min" and direction("val/lm_loss") == "min"
    assert direction("val/rec_acc50") == "max" and direction("val/amr") == "max"
    for bad, why in [
        ("val/pope/adversarial/yes_ratio", "base rate"),
        ("val/pope/hard/f1", "val/pope/<random|popular|adversarial>"),
        ("train/loss", "validation metrics"),
        ("val/bleu", "not a metric raysal reports"),
    ]:
        with pytest.raises(ValueError, match=why):
            direction(bad)


def test_the_space_file_reads_guards_and_refuses_bad_ones(tmp_path):
    control = {"lm_tolerance": 0.02, "guards": {"val/pope/adversarial/f1": 0.01, "val/pope/adversarial/fpr": 0.01}}
    spec = load_search_space(write(tmp_path, minimal(control=control)))
    assert spec.control.guards == (Guard("val/pope/adversarial/f1", 0.01), Guard("val/pope/adversarial/fpr", 0.01))
    for guards, where in [
        ({"val/pope/adversarial/yes_ratio": 0.01}, "control.guards.val/pope/adversarial/yes_ratio"),
        ({"val/pope/adversarial/f1": -0.1}, "control.guards.val/pope/adversarial/f1"),
        ([0.01], "control.guards"),
    ]:
        with pytest.raises(SearchSpaceError, match=re.escape(where)):
            load_search_space(write(tmp_path, minimal(control={"guards": guards})))


def row(trial: str, amr: float, f1: float, fpr: float, *, control: bool = False, lm: float = 5.0) -> dict:
    metrics = {"val/amr": amr, "val/lm_loss": lm, "val/pope/adversarial/f1": f1, "val/pope/adversarial/fpr": fpr}
    return {"trial_id": trial, "metrics": metrics, "config": {CONTROL_KEY: True} if control else {}}


GUARDS = (Guard("val/pope/adversarial/f1", 0.01), Guard("val/pope/adversarial/fpr", 0.01))


def test_the_best_passes_every_guard_by_the_metrics_direction():
    rows = [
        row("c", 1.0, 0.80, 0.10, control=True),
        row("a", 3.0, 0.70, 0.10),  # best AMR, but F1 fell by 0.10
        row("b", 2.5, 0.81, 0.125),  # hallucinates more: FPR rose by 0.025
        row("d", 2.0, 0.795, 0.105),  # within both guards (F1 −0.005, FPR +0.005)
        row("e", 4.0, float("nan"), 0.0),  # no F1: cannot pass
    ]
    best, decision = choose_best(rows, "val/amr", "max", 0.02, GUARDS)
    assert best["trial_id"] == "d"
    assert decision["failed_guards"] == {
        "a": ["val/pope/adversarial/f1"], "b": ["val/pope/adversarial/fpr"], "e": ["val/pope/adversarial/f1"],
    }  # fmt: skip
    g = decision["guards"]["val/pope/adversarial/fpr"]
    assert g["mode"] == "min" and g["control"] == 0.10 and math.isclose(g["limit"], 0.11)
    assert math.isclose(decision["guards"]["val/pope/adversarial/f1"]["limit"], 0.79)
    lines = guard_lines(decision)
    f1 = "guard val/pope/adversarial/f1 (may fall by at most 0.01): control 0.8, limit 0.79; failed by a, e"
    assert lines[0] == f1
    assert lines[1].endswith("control 0.1, limit 0.11; failed by b")
    # the LM tolerance still applies beside them
    rows.append(row("f", 5.0, 0.9, 0.0, lm=5.2))
    best, decision = choose_best(rows, "val/amr", "max", 0.02, GUARDS)
    assert best["trial_id"] == "d" and decision["excluded_by_lm_tolerance"] == ["f"]


def test_a_control_without_the_guarded_metric_leaves_no_winner():
    rows = [row("c", 1.0, 0.8, 0.1, control=True), row("a", 3.0, 0.8, 0.1)]
    del rows[0]["metrics"]["val/pope/adversarial/fpr"]
    best, decision = choose_best(rows, "val/amr", "max", 0.02, GUARDS)
    assert best is None and "did not report val/pope/adversarial/fpr" in decision["warning"]
    best, decision = choose_best(rows[1:], "val/amr", "max", None, GUARDS)  # no control at all
    assert best is None and "control did not finish" in decision["warning"]


def test_a_guard_excludes_a_trial_from_a_searchs_summary(tmp_path, monkeypatch):
    """The search's end (`summarise`) on three finished trials: the one with the best AMR lost F1 against the
    control, so the next is best; the table, the rows and the decision say which guard it failed."""
    from types import SimpleNamespace

    import ray.train

    from raysal.orchestration.tune.summary import summarise

    control = {"guards": {"val/pope/adversarial/f1": 0.01, "val/pope/adversarial/fpr": 0.01}}
    spec = load_search_space(write(tmp_path, minimal(control=control)))
    grid = []
    for r in (row("c", 1.0, 0.80, 0.10, control=True), row("a", 3.0, 0.60, 0.10), row("b", 2.0, 0.80, 0.10)):
        cost = {"cost/train_s": 90.0, "cost/eval_s": 10.0, "cost/gpu_hours": 0.0, "cost/worker_hours": 0.025}
        metrics = {**r["metrics"], **cost, "trial_id": r["trial_id"]}
        grid.append(
            SimpleNamespace(metrics=metrics, config=r["config"], error=None, path=str(tmp_path / r["trial_id"]))
        )
    no_checkpoint = SimpleNamespace(get_best_checkpoint=lambda *a: None)
    monkeypatch.setattr(ray.train.Result, "from_path", staticmethod(lambda path: no_checkpoint))  # nothing to export
    summary = summarise(grid, spec, [], str(tmp_path))
    assert summary["failed_guards"] == {"a": ["val/pope/adversarial/f1"]}
    assert {r["trial_id"]: r["guards"]["val/pope/adversarial/f1"] for r in summary["rows"]} == {
        "a": False, "b": True, "c": True,
    }  # fmt: skip
    assert "| 1 (guard: val/pope/adversarial/f1) | a |" in summary["table"], summary["table"]
    assert "(best) | b |" in summary["table"] and summary["control"] == "c"
    # the guarded metrics are columns of the table, beside the objective and the LM loss
    header = summary["table"].splitlines()[0]
    assert header.startswith("| rank | trial | val/amr | val/lm_loss | val/pope/adversarial/f1 | "
                             "val/pope/adversarial/fpr | step |"), header  # fmt: skip
    a = next(line for line in summary["table"].splitlines() if "| a |" in line)
    assert "| 0.6 | 0.1 |" in a, a
    # what each trial and the search cost: a column, each row, the sum
    assert "| 0.025 CPU worker-h (evaluation 10%) |" in a, a
    assert summary["rows"][0]["cost"]["eval_fraction"] == 0.1
    assert summary["cost"]["trials"] == 3 and summary["cost"]["worker_hours"] == pytest.approx(0.075)


def test_an_objective_may_be_a_pope_metric(tmp_path):
    objectives = [{"metric": "val/pope/adversarial/f1", "mode": "max"}, {"metric": "val/rec_acc50", "mode": "max"}]
    spec = load_search_space(write(tmp_path, minimal(objectives=objectives, scheduler={"type": "fifo"})))
    assert [o.metric for o in spec.objectives] == ["val/pope/adversarial/f1", "val/rec_acc50"]


# --- non-inferiority on paired records (issue 30) ---


def _power_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "guard_power.py"
    spec = importlib.util.spec_from_file_location("guard_power", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_default_screening_margins_pass_an_equally_good_trial_and_fail_a_worse_one():
    """The power calculation of docs/verdict.md on raysal's own decision path: at the search's POPE size
    (trainer.pope.images: 64), the screening margins of search_spaces/criteria.yaml pass an equally good trial ≥ 90 %
    of the time on both guards, and fail one worse by two margins ≥ 80 % (200 simulated searches each); the margins
    that decide (0.03 / 0.05, the field's) are the confirmation's (tests/test_seeds.py)."""
    from pathlib import Path

    import numpy as np

    spec = load_search_space(Path(__file__).resolve().parents[1] / "search_spaces" / "criteria.yaml")
    assert [g.max_loss for g in spec.control.guards] == [0.03, 0.05]
    guards = list(spec.control.screening_guards)
    assert {g.metric for g in guards} == {"val/pope/adversarial/f1", "val/pope/adversarial/fpr"}
    power = _power_script()
    rng = np.random.default_rng(1)
    equal = power.simulate(rng, images=64, acc=0.83, kappa=5.0, worse=0.0, guards=guards, reps=200)
    assert min(equal.values()) >= 0.90, equal
    for g in guards:  # each guard on its own: a trial worse by two of its margins
        worse = power.simulate(rng, images=64, acc=0.83, kappa=5.0, worse=2 * g.max_loss, guards=[g], reps=100)
        assert worse[g.metric] <= 0.20, (g, worse)


def test_the_demo_profiles_screening_is_sized_for_its_pope_and_its_margins_are_at_most_1_5x_the_defaults():
    """experiment=demo asks POPE about ~30 selection images: its screening margins pass an equal trial ≥ 90 %, fail
    one worse by two margins ≥ 80 % (as docs/verdict.md asks of every margin); the margins that decide are at most
    1.5× the defaults."""
    from pathlib import Path

    import numpy as np

    file = Path(__file__).resolve().parents[1] / "search_spaces" / "criteria.yaml"
    spec, default = load_search_space(file, profile="demo"), load_search_space(file)
    for g, d in zip(spec.control.guards, default.control.guards, strict=True):
        assert g.metric == d.metric and g.max_loss <= 1.5 * d.max_loss + 1e-12, (g, d)
    guards = list(spec.control.screening_guards)
    power = _power_script()
    rng = np.random.default_rng(1)
    equal = power.simulate(rng, images=30, acc=0.8, kappa=5.0, worse=0.0, guards=guards, reps=200)
    assert min(equal.values()) >= 0.90, equal
    for g in guards:
        worse = power.simulate(rng, images=30, acc=0.8, kappa=5.0, worse=2 * g.max_loss, guards=[g], reps=100)
        assert worse[g.metric] <= 0.20, (g, worse)


def _pope_records(image_ids, says_yes_to_absent: float, rng) -> ItemRecords:
    r = ItemRecords()
    rows = []
    for i in image_ids:
        for label in (True, True, True, False, False, False):
            right = rng.uniform() < 0.85
            yes = (right if label else not right) or (not label and rng.uniform() < says_yes_to_absent)
            rows.append({"image_id": i, "setting": "adversarial", "label": label, "p_yes": 0.9 if yes else 0.1,
                         "mass": 1.0})  # fmt: skip
    r.add("pope", rows)
    r.add("images", [{"image_id": i, "lm_sum": 50.0, "lm_n": 10, "tokens": 2, "amr": 1.5, "ap": 0.5, "nss": 0.1,
                      "pointing": 0.5} for i in image_ids])  # fmt: skip
    return r


def test_a_planted_hallucinating_trial_is_excluded_with_its_interval(tmp_path, monkeypatch):
    """A search's end on records kept in the trials' checkpoints: 'same' is an unchanged copy of the control
    (passes both guards, its intervals around 0), 'yes' says yes to 60 % of absent things on top (excluded by the
    FPR guard: its interval lies wholly above the margin), though its AMR is the highest."""
    from types import SimpleNamespace

    import numpy as np
    import ray.train

    from raysal.metrics.records import RECORDS_FILE, grounding_metrics, pope_metrics_of
    from raysal.orchestration.tune import summary as summary_mod

    control = {"lm_tolerance": 0.02, "guards": {"val/pope/adversarial/f1": 0.10, "val/pope/adversarial/fpr": 0.13}}
    spec = load_search_space(write(tmp_path, minimal(control=control)))
    ids = list(range(64))
    base = _pope_records(ids, 0.0, np.random.default_rng(0))
    planted = {"c": base, "same": base, "yes": _pope_records(ids, 0.6, np.random.default_rng(0))}
    grid = []
    for trial, records in planted.items():
        folder = tmp_path / "trials" / trial / "checkpoint_000003"
        folder.mkdir(parents=True)
        (folder / RECORDS_FILE).write_text(records.to_json())
        metrics = {f"val/{k}": v for k, v in {**grounding_metrics(records.images),
                                               **pope_metrics_of(records.pope)}.items()}  # fmt: skip
        metrics.update({"val/amr": {"c": 1.5, "same": 1.6, "yes": 3.0}[trial], "trial_id": trial})
        grid.append(SimpleNamespace(metrics=metrics, config={CONTROL_KEY: True} if trial == "c" else {"x": 1},
                                    error=None, path=str(tmp_path / "trials" / trial)))  # fmt: skip

    def train_run(path):  # each trial's Train run: its latest checkpoint, nothing exported
        trial = path.rstrip("/").rsplit("/", 1)[-1]
        folder = tmp_path / "trials" / trial / "checkpoint_000003"
        return SimpleNamespace(get_best_checkpoint=lambda *a: None, checkpoint=SimpleNamespace(path=str(folder)))

    monkeypatch.setattr(ray.train.Result, "from_path", staticmethod(train_run))
    summary = summary_mod.summarise(grid, spec, [], str(tmp_path))
    assert summary["rule"] == "paired" and set(summary["failed_guards"]) == {"yes"}
    assert "val/pope/adversarial/fpr" in summary["failed_guards"]["yes"]
    fpr = summary["paired"]["yes"]["val/pope/adversarial/fpr"]
    assert fpr["kind"] == "difference" and fpr["lo"] > 0.13 and fpr["images"] == 64, fpr
    same = summary["paired"]["same"]["val/pope/adversarial/fpr"]
    assert same["estimate"] == 0 and same["lo"] == 0 and same["hi"] == 0  # the control's own answers
    # excluded by both guards; the harms named as well (their intervals exclude no change)
    assert ("| 1 (guard: val/pope/adversarial/f1) (guard: val/pope/adversarial/fpr) (significantly worse than the "
            "control: val/pope/adversarial/f1, val/pope/adversarial/fpr) | yes |") in summary["table"]  # fmt: skip
    assert summary["harms"] == {"yes": ["val/pope/adversarial/f1", "val/pope/adversarial/fpr"]}
    yes = next(line for line in summary["table"].splitlines() if "| yes |" in line)
    assert f"(+{fpr['estimate']:.3f} [+{fpr['lo']:.3f}, +{fpr['hi']:.3f}])" in yes, yes  # the interval beside FPR
    assert "(best) | same |" in summary["table"], summary["table"]


# --- the verdict audit (issue 39): equal budgets, NaN objectives, runners-up against the best, harms ---


def _with_records(rows: list[dict], records: dict[str, ItemRecords]) -> list[dict]:
    from raysal.metrics.records import grounding_metrics, pope_metrics_of

    for r in rows:
        mine = records[r["trial_id"]]
        r["metrics"].update({f"val/{k}": v for k, v in {**grounding_metrics(mine.images),
                                                         **pope_metrics_of(mine.pope)}.items()})  # fmt: skip
    return rows


def _amr_records(amr: list[float], ids: list[int] | None = None) -> ItemRecords:
    r = ItemRecords()
    ids = ids or list(range(len(amr)))
    r.add("images", [{"image_id": i, "lm_sum": 50.0, "lm_n": 10, "tokens": 2, "amr": a, "ap": 0.5, "nss": 0.1,
                      "pointing": 0.5} for i, a in zip(ids, amr, strict=True)])  # fmt: skip
    return r


def test_a_trial_stopped_before_the_controls_budget_never_wins():
    """ASHA stopped 'a' at step 8 of 24: its AMR is the highest, but it trained a third of the control's budget (and
    mid-schedule): not eligible, said why; 'b' reached step 24 and wins."""
    rows = [row("c", 1.0, 0.8, 0.1, control=True), row("a", 9.0, 0.8, 0.1), row("b", 2.0, 0.8, 0.1)]
    for r, step in zip(rows, (24, 8, 24), strict=True):
        r["metrics"]["train/step"] = float(step)
    best, decision = choose_best(rows, "val/amr", "max", 0.02, GUARDS)
    assert best["trial_id"] == "b" and decision["finalists"] == ["b"]
    assert decision["unranked"] == {"a": "stopped at step 8, the control trained 24: not eligible at an unequal budget"}


def test_a_non_finite_objective_never_ranks_and_the_table_says_why(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import ray.train

    from raysal.orchestration.tune.summary import summarise

    spec = load_search_space(write(tmp_path, minimal()))
    grid = []
    for r in (row("c", 1.0, 0.8, 0.1, control=True), row("n", float("nan"), 0.8, 0.1), row("b", 2.0, 0.8, 0.1)):
        grid.append(SimpleNamespace(metrics={**r["metrics"], "trial_id": r["trial_id"]}, config=r["config"],
                                    error=None, path=str(tmp_path / r["trial_id"])))  # fmt: skip
    monkeypatch.setattr(ray.train.Result, "from_path", staticmethod(lambda path: SimpleNamespace(checkpoint=None)))
    summary = summarise(grid, spec, [], str(tmp_path))
    assert summary["best"]["trial_id"] == "b" and summary["unranked"] == {"n": "val/amr is nan: not ranked"}
    assert [r["trial_id"] for r in summary["rows"]] == ["b", "c", "n"]  # a NaN sorts last, never first
    assert "| 3 (val/amr is nan: not ranked) | n |" in summary["table"], summary["table"]


def test_runners_up_are_compared_with_the_best_directly_not_by_overlapping_intervals():
    """'b' grounds like the best 'a' on every image less a constant: their intervals against the noisy control
    overlap, but paired with each other the difference is clear, so 'b' is not called indistinguishable; 'd' is
    'a' plus symmetric noise and is."""
    import numpy as np

    rng = np.random.default_rng(0)
    base = rng.uniform(1.0, 3.0, 40)
    control = base * rng.uniform(0.5, 1.5, 40)  # the control: far from both, noisily
    noisy = base * 2.0 * rng.uniform(0.8, 1.2, 40)
    noisy *= 0.99 * (base * 2.0).mean() / noisy.mean()  # 1 % below the best on average, noisily
    records = {
        "c": _amr_records(list(control)),
        "a": _amr_records(list(base * 2.0)),
        "b": _amr_records(list(base * 1.9)),
        "d": _amr_records(list(noisy)),
    }
    rows = _with_records([row(t, 0.0, 0.8, 0.1, control=t == "c") for t in records], records)  # fmt: skip
    best, decision = choose_best(rows, "val/amr", "max", None, (), records)
    assert best["trial_id"] == "a"
    pa, pb = decision["paired"]["a"]["val/amr"], decision["paired"]["b"]["val/amr"]
    assert pb["hi"] >= pa["lo"], "their intervals against the control overlap (the old rule: indistinguishable)"
    vs = decision["vs_best"]["b"]
    assert vs["kind"] == "ratio" and vs["hi"] < 1, vs  # paired with the best: clearly below it
    assert "b" not in decision["indistinguishable"] and "d" in decision["indistinguishable"]


def test_the_exported_checkpoint_is_the_judged_one_the_last_not_the_best_by_the_objective(tmp_path, monkeypatch):
    """A trial whose best val/amr was at step 8 and whose judged (last) evaluation is step 24: the summary's best,
    best.json and the exported adapter are step 24's, the checkpoint its records were compared on."""
    from types import SimpleNamespace

    import ray.train

    from raysal.orchestration.tune.summary import settle

    folders = {}
    for step in (8, 24):
        ckpt = tmp_path / "trials" / "a" / f"checkpoint_{step:07d}"
        (ckpt / "adapter").mkdir(parents=True)
        (ckpt / "adapter" / "adapter_config.json").write_text(f'{{"step": {step}}}')
        folders[step] = ray.train.Checkpoint.from_directory(str(ckpt))
    run = SimpleNamespace(checkpoint=folders[24], get_best_checkpoint=lambda *a: folders[8])
    monkeypatch.setattr(ray.train.Result, "from_path", staticmethod(lambda path: run))
    summary = {"metric": "val/amr", "best": {"trial_id": "a", "replay": "python -m raysal.train x=1"},
               "rows": [{"trial_id": "a", "metrics": {"val/amr": 2.0, "train/step": 24.0}, "replay": "r"}],
               "confirmation": {"finalists": {"a": {"confirmed": True, "why": "every condition holds",
                                                    "comparisons": {}}}}}  # fmt: skip
    got = settle(summary, str(tmp_path))
    assert got["best"]["checkpoint"].endswith("checkpoint_0000024") and got["confirmed"] is True
    best = json.loads((tmp_path / "best_adapter" / "best.json").read_text())
    assert best["checkpoint"].endswith("checkpoint_0000024") and best["metrics"]["confirmed"] is True
    assert json.loads((tmp_path / "best_adapter" / "adapter_config.json").read_text()) == {"step": 24}


@pytest.mark.parametrize("images", [64, 30, 11])
def test_a_trial_exactly_at_a_screening_margin_passes_at_most_2_5_percent(images):
    """The search's comparisons (`raysal.metrics.paired`, studentized): a trial worse than the control by exactly
    the margin, at the default POPE size (64 images), the demo's (~30) and fewer (11); 600 simulated searches: it
    passes ≤ 2.5 % + 2 Monte Carlo standard errors (the percentile interval passed 4.8 % at 11 images)."""
    import numpy as np

    power = _power_script()
    rng = np.random.default_rng(images)
    margin = {64: 0.10, 30: 0.15, 11: 0.25}[images]
    guards = [Guard("val/pope/adversarial/f1", margin), Guard("val/pope/adversarial/fpr", margin)]
    got = power.simulate(rng, images=images, acc=0.83, kappa=5.0, worse=margin, guards=guards, reps=600)
    assert max(got.values()) <= 0.025 + 2 * math.sqrt(0.025 * 0.975 / 600), got
