"""The search report from a search folder's files (summary.json, optuna.db, the trials' probe PNGs): no Ray."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import optuna
import pytest
from PIL import Image

from raysal import storage
from raysal.report import main
from raysal.search.report_figures import pareto_front
from raysal.search.report_html import build_report


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    img = np.zeros((40, 60, 3), np.uint8)
    img[:] = color
    img[10:30, 20:40] = 255
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def search(tmp_path):
    """A finished 6-trial search: a control, 4 sampled trials (one over the LM limit), one diverged."""
    folder = tmp_path / "demo"
    folder.mkdir()
    study = optuna.create_study(study_name="demo", storage=f"sqlite:///{folder / 'optuna.db'}", direction="maximize")
    rows, rng = [], np.random.default_rng(0)
    for i in range(5):
        t = study.ask()
        lr = t.suggest_float("optim.lr", 1e-3, 1e-2, log=True)
        crit = t.suggest_categorical("criterion@criteria.align", ["kl", "mse"])
        amr, lm = 1.0 + 0.1 * i + 0.01 * rng.random(), 5.0 + (0.3 if i == 3 else 0.02 * i)
        t.set_user_attr("val/lm_loss", lm)
        study.tell(t, amr)
        params = {"optim.lr": lr, "criterion@criteria.align": crit}
        fpr = 0.1 + 0.004 * i + (0.05 if i == 2 else 0.0)  # t2 hallucinates: over the guard
        rows.append({"trial_id": f"t{i}", "control": i == 0, "params": params,
                     "metrics": {"val/amr": amr, "val/lm_loss": lm, "train/step": 24.0, FPR: fpr},
                     "guards": {FPR: i != 2}, "replay": f"python -m raysal.train optim.lr={lr}"})  # fmt: skip
    for tid, color in (("t0", (200, 0, 0)), ("t4", (0, 0, 200))):
        step = folder / "trials" / tid / "probes" / "step_0000024"
        step.mkdir(parents=True)
        (step / "probe0_0.png").write_bytes(_png(color))
        (step / "scores.json").write_text(json.dumps([{"key": "probe0_0", "image_id": 7, "phrase": "a cat"}]))
    summary = {
        "search": "demo", "metric": "val/amr", "mode": "max", "trials": 6, "reported": 5, "rows": rows,
        "failed": [{"trial_id": "t5", "reason": "diverged: val/lm_loss 9.9 >= 0.98 x ln(V)", "replay": "python -m x"}],
        "control": "t0", "lm_limit": 5.0 * 1.02, "excluded_by_lm_tolerance": ["t3"],
        "guards": {FPR: {"max_loss": 0.02, "mode": "min", "control": 0.1, "limit": 0.12}},
        "failed_guards": {"t2": [FPR]},
        "best": {"trial_id": "t4", "replay": "python -m raysal.train optim.lr=0.001"},
        "trials_dir": str(folder / "trials"),
    }  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


FPR = "val/pope/adversarial/fpr"


def _not_blank(png: bytes) -> bool:
    a = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    return a.std() > 10 and (a < 200).mean() > 0.02


def test_report_has_every_figure_and_lists_failures(search, storage_root):
    """The search folder on a local disk, behind a file:// URI and in an S3 bucket (read by a machine that did not
    run the search): the same report, heatmaps included."""
    folder = storage.join(storage_root, "demo")
    storage.upload(search, folder)
    if storage.local_path(folder) is None:  # the trials as the search wrote them: beside the summary
        summary = storage.read_json(storage.join(folder, "summary.json"))
        storage.write_json(storage.join(folder, "summary.json"), {**summary, "trials_dir": "/gone/with/the/head"})
    report = build_report(folder)
    assert report.html == storage.join(folder, "report.html")
    page = storage.read_text(report.html)
    assert set(report.figures) == {"plane", "hallucination", "importance", "history", "parallel", "probes", "lead"}
    for name, png in report.figures.items():
        assert _not_blank(png), name
        assert storage.read_bytes(storage.join(folder, "report", f"{name}.png")) == png
        assert f'<figure id="{name}">' in page or name in ("probes", "lead")
    # the lead picture: the plane, and right of it the best trial's first phrase (blue) over the control's (red)
    plane = Image.open(io.BytesIO(report.figures["plane"]))
    lead = np.asarray(Image.open(io.BytesIO(report.figures["lead"])).convert("RGB")).astype(int)
    assert lead.shape[1] > plane.width and lead.shape[0] >= plane.height
    right = lead[:, plane.width :]
    blue = np.nonzero((right[..., 2] == 200) & (right[..., 0] == 0))[0]
    red = np.nonzero((right[..., 0] == 200) & (right[..., 2] == 0))[0]
    assert blue.size and red.size and blue.max() < red.min(), "best above control"
    assert "diverged: val/lm_loss 9.9" in page and "(LM over the limit)" in page and "t4</td>" in page
    assert f"(failed {FPR})" in page and f"guards: {FPR} ≤ 0.12" in page  # the guard and who failed it
    assert page.count("data:image/png;base64,") == 5 + 2  # 5 figures + best and control probe heatmaps
    assert not re.search(r'src="(?!data:)', page), "every picture is embedded: the page opens offline"


def test_the_lead_picture_holds_the_whole_verdict(search):
    """A verdict with intervals runs to many lines: the picture grows to hold every one, its last line drawn."""
    from raysal.search.report_html import _lead_picture

    report = build_report(search)
    plane, pair = report.figures["plane"], (report.figures["plane"], report.figures["plane"])

    def picture(verdict: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(_lead_picture(plane, pair, "b", "c", verdict, None))).convert("L"))

    short, long = picture("best trial b"), picture(" ".join(["val/amr 1.12x [1.10, 1.15]"] * 120) + " END")
    assert long.shape[0] >= short.shape[0] + 10 * 22, (short.shape, long.shape)  # >= 10 more lines of text
    ink = np.nonzero((long < 128).any(axis=1))[0]
    assert ink.max() > long.shape[0] - 22 - 16, "the last line is drawn, inside the picture"


def test_the_language_plane_greys_the_trials_the_lm_tolerance_excluded(search):
    """A trial over the LM tolerance is drawn grey (it cannot win), the others blue."""
    from raysal.search.report_figures import grounding_language_plane

    rows = json.loads((search / "summary.json").read_text())["rows"]

    def grey_pixels(excluded: set[str]) -> int:
        png = grounding_language_plane(rows, "val/amr", "max", 5.1, "t4", excluded=excluded)
        return int((np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) == 170).all(axis=-1).sum())

    assert grey_pixels({"t3"}) > grey_pixels(set()) + 20


def test_pareto_front():
    pts = [(5.0, 1.0), (5.1, 1.2), (5.2, 1.1), (4.9, 0.9), (5.3, 1.3)]
    assert pareto_front(pts, maximise=True) == [3, 0, 1, 4]


def test_cli_says_what_is_missing(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no summary.json" in capsys.readouterr().err


def test_cli_rebuilds_a_report_from_a_bucket(search, s3_server, capsys):
    folder = storage.join(s3_server.new_prefix(), "demo")
    storage.upload(search, folder)
    assert main([folder]) == 0
    assert f"raysal: report {storage.join(folder, 'report.html')}" in capsys.readouterr().out
    assert storage.read_text(storage.join(folder, "report.html")).count('class="probe"') == 2


def test_no_lead_picture_when_the_control_is_best(search):
    """Nothing to set beside the control when it won: the report has no lead picture (and says nothing false)."""
    summary = json.loads((search / "summary.json").read_text())
    summary["best"] = {"trial_id": "t0", "replay": "python -m raysal.train '~criterion@criteria.align'"}
    (search / "summary.json").write_text(json.dumps(summary))
    report = build_report(str(search))
    assert "lead" not in report.figures and "probes" in report.figures
    assert not (search / "report" / "lead.png").exists()


def test_both_planes_draw_each_trials_paired_intervals(monkeypatch):
    """Issue 30: every trial compared paired with the control gets 95 % interval bars on both planes, in the
    metric's own units (a ratio's bounds times the control's value, a difference's plus it)."""
    import matplotlib.axes

    from raysal.search import report_figures as rf

    drawn = []
    real = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", lambda self, *a, **k: drawn.append((a, k)) or real(
        self, *a, **k))  # fmt: skip
    rows = [{"trial_id": "c", "control": True, "metrics": {"val/amr": 1.5, "val/lm_loss": 0.75,
                                                           "val/pope/adversarial/fpr": 0.1}},
            {"trial_id": "a", "control": False, "metrics": {"val/amr": 3.0, "val/lm_loss": 0.76,
                                                            "val/pope/adversarial/fpr": 0.12}}]  # fmt: skip
    paired = {"a": {"val/amr": {"kind": "ratio", "control": 1.5, "estimate": 2.0, "lo": 1.5, "hi": 2.5},
                    "val/lm_loss": {"kind": "ratio", "control": 0.75, "estimate": 1.0133, "lo": 1.0, "hi": 1.03},
                    "val/pope/adversarial/fpr": {"kind": "difference", "control": 0.1, "estimate": 0.02,
                                                 "lo": -0.01, "hi": 0.05}}}  # fmt: skip
    assert rf.value_interval(paired["a"]["val/amr"]) == (2.25, 3.75)
    assert rf.value_interval(paired["a"]["val/pope/adversarial/fpr"]) == pytest.approx((0.09, 0.15))
    assert rf.value_interval({"kind": "ratio", "control": 1.0, "lo": float("nan"), "hi": 2.0}) is None
    assert rf.grounding_language_plane(rows, "val/amr", "max", 0.765, "a", paired=paired)[:4] == b"\x89PNG"
    assert rf.grounding_hallucination_plane(rows, "val/amr", "max", 0.23, "a", paired=paired)[:4] == b"\x89PNG"
    assert len(drawn) == 2  # one trial, one bar set per plane; the control has none
    _, k = drawn[1]
    assert k["yerr"] == [[pytest.approx(0.75)], [pytest.approx(0.75)]]
    assert k["xerr"] == [[pytest.approx(0.03)], [pytest.approx(0.03)]]


def test_the_report_shows_the_confirmations_decision_each_run_and_each_harm(search):
    """The Confirmation section: the decision and why, each pooled comparison with its interval, per-seed values
    and degrees of freedom, a harm named; every run of the stage with its role, seed, checkpoint and replay."""
    summary = json.loads((search / "summary.json").read_text())
    comp = {
        "kind": "difference",
        "trial": 0.31,
        "control": 0.30,
        "estimate": 0.01,
        "lo": 0.002,
        "hi": 0.06,
        "images": 120,
        "seeds": 3,
        "per_seed": [0.01, 0.02, 0.0],
        "se": 0.01,
        "df": 2.5,
        "seed_share": 0.4,
    }
    summary["confirmation"] = {
        "finalists": {"t4": {"confirmed": True, "why": "every condition holds", "seeds": 3, "images": 32,
                             "comparisons": {FPR: comp}, "harms": [FPR]}},
        "arms": [{"key": "t4/finalist/seed1", "finalist": "t4", "role": "finalist", "seed": 1, "run": "a_00000",
                  "checkpoint": "checkpoint_0000024", "step": 24, "images": 32, "metrics": {FPR: 0.31},
                  "replay": "python -m raysal.train seed=1"}],
    }  # fmt: skip
    summary["harms"] = {"t4": [FPR]}
    (search / "summary.json").write_text(json.dumps(summary))
    page = (search / build_report(str(search)).html.rsplit("/", 1)[-1]).read_text()
    section = page.split("<h2>Confirmation", 1)[1].split("<h2>", 1)[0]
    assert "t4: confirmed</b> — every condition holds (3 seeds × 32 confirmation images" in section, section
    assert "0.01 [0.002, 0.06] — significantly worse than the control" in section
    assert "<td>0.01, 0.02, 0</td><td>2.5</td><td>40 %</td>" in section
    assert "a_00000" in section and "python -m raysal.train seed=1" in section
    assert "(significantly worse than the control: val/pope/adversarial/fpr)" in page  # the trials table too
