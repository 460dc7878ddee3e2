"""The search report: one self-contained ``report.html`` (every picture a data URI: it opens offline, mailed or
copied off the cluster) plus the same figures as PNGs in ``report/``.

Sources, all written by the search: ``summary.json`` (trials, failures with reasons, the control and the LM limit,
the best trial), the Optuna study (``optuna.db``: parameters, values, validation metrics as user attrs), and the
trials' probe heatmaps (``trials/<id>/probes/step_*/``). Read and written through the storage layer: a search folder
on S3 rebuilds its report on any machine that can read the bucket.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from typing import Any

import optuna
from PIL import Image, ImageDraw, ImageFont

from raysal import storage
from raysal.search import report_figures as figures

LM = "val/lm_loss"


class ReportError(ValueError):
    """The folder is not a finished search (no summary.json)."""


@dataclass
class Report:
    html: str  # where report.html was written (local path or URI)
    figures: dict[str, bytes] = field(default_factory=dict)  # name → PNG, also in report/<name>.png


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return html.escape(str(v))


def _latest_probe_step(run_dir: str) -> str | None:
    """The run's last evaluation that wrote its heatmaps completely (scores.json is written last)."""
    probes = storage.join(run_dir, "probes")
    steps = [n for n in storage.list_names(probes, dirs=True) if n.startswith("step_")]
    done = [n for n in steps if storage.is_file(storage.join(probes, n, "scores.json"))]
    return storage.join(probes, max(done)) if done else None


def _png(path: str) -> bytes | None:
    return storage.read_bytes(path) if storage.is_file(path) else None


def _probe_section(
    trials_dir: str, best: str | None, control: str | None, top: str | None
) -> tuple[str, bytes | None, tuple[bytes, bytes] | None]:
    """Best trial's heatmaps beside the control's (and the top trial by the objective, when the LM limit made
    another one best), phrase by phrase, at each one's last evaluation → (the HTML table, the grid as one picture,
    the first phrase's (best, control) pair when both exist and differ)."""
    labels: dict[str, list[str]] = {}
    for name, tid in (("best", best), ("LM-only control", control), ("top by the objective", top)):
        if tid:
            labels.setdefault(tid, []).append(name)
    cols = [(" = ".join(names), tid) for tid, names in labels.items()]
    steps = {tid: _latest_probe_step(storage.join(trials_dir, tid)) for _, tid in cols}
    cols = [(name, tid) for name, tid in cols if steps[tid] is not None]
    if not cols:
        missing = f"No probe heatmaps in {trials_dir} (trainer.probes.images=0, or no trial reached an evaluation)."
        return f"<p>{html.escape(missing)}</p>", None, None
    keys = [r["key"] for r in storage.read_json(storage.join(steps[cols[0][1]], "scores.json"))]
    head = "".join(f"<th>{html.escape(n)}: {html.escape(t)} ({storage.name(steps[t])})</th>" for n, t in cols)
    pngs = [[_png(storage.join(steps[tid], f"{key}.png")) for _, tid in cols] for key in keys]
    body = []
    for key, row in zip(keys, pngs, strict=True):
        cells = [f'<td><img class="probe" src="{_uri(png)}" alt="{key}"></td>' if png is not None
                 else "<td>missing</td>" for png in row]  # fmt: skip
        body.append("<tr>" + "".join(cells) + "</tr>")
    table = f'<table class="probes"><tr>{head}</tr>{"".join(body)}</table>'
    tids = [tid for _, tid in cols]
    pair = None
    if best and control and best != control and best in tids and control in tids and pngs:
        b, c = pngs[0][tids.index(best)], pngs[0][tids.index(control)]
        pair = (b, c) if b is not None and c is not None else None
    return table, _probe_grid(pngs), pair


def _lead_picture(
    plane: bytes, pair: tuple[bytes, bytes], best: str, control: str, verdict: str | None, hallucination: bytes | None
) -> bytes:
    """The search at a glance (README-sized): the grounding-vs-language plane (over the grounding-vs-hallucination
    one when POPE ran), and beside them the first probe phrase's heatmap of the best trial over the control's, with
    the whole verdict under them (the canvas grows with it: a verdict with intervals runs to a dozen lines)."""

    font = ImageFont.load_default(size=15)
    planes = [Image.open(io.BytesIO(p)).convert("RGB") for p in (plane, hallucination) if p is not None]
    left = Image.new("RGB", (max(p.width for p in planes), sum(p.height for p in planes)), (255, 255, 255))
    for i, p in enumerate(planes):
        left.paste(p, (0, sum(q.height for q in planes[:i])))
    pics = [Image.open(io.BytesIO(p)).convert("RGB") for p in pair]
    pad, line = 16, 22
    right_w = max(max(p.width for p in pics), 420)
    width = left.width + pad + right_w
    top = max(left.height, sum(line + p.height + pad for p in pics))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows: list[str] = []
    for w in (verdict or "").replace("×", "x").split():  # the embedded font has no "×"; wrapped to the width
        if rows and measure.textlength(f"{rows[-1]} {w}", font=font) <= width - 2 * pad:
            rows[-1] = f"{rows[-1]} {w}"
        else:
            rows.append(w)
    canvas = Image.new("RGB", (width, top + len(rows) * line + pad), (255, 255, 255))
    canvas.paste(left, (0, 0))
    draw, x, y = ImageDraw.Draw(canvas), left.width + pad, 0
    for label, pic in ((f"best trial {best}", pics[0]), (f"LM-only control {control}", pics[1])):
        draw.text((x, y), label, fill=(0, 0, 0), font=font)
        canvas.paste(pic, (x, y + line))
        y += line + pic.height + pad
    for i, row in enumerate(rows):
        draw.text((pad, top + i * line), row, fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _probe_grid(pngs: list[list[bytes | None]]) -> bytes | None:
    """The comparison as one picture (for W&B): rows = phrases, columns = trials."""

    pics = [[Image.open(io.BytesIO(p)).convert("RGB") if p is not None else None for p in row] for row in pngs]
    flat = [p for row in pics for p in row if p is not None]
    if not flat:
        return None
    w, h = max(p.width for p in flat), max(p.height for p in flat)
    n_cols = max(len(row) for row in pics)
    canvas = Image.new("RGB", (w * n_cols, h * len(pics)), (255, 255, 255))
    for i, row in enumerate(pics):
        for j, p in enumerate(row):
            if p is not None:
                canvas.paste(p, (j * w, i * h))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def _guards_text(summary: dict[str, Any]) -> str:
    guards = summary.get("guards") or {}
    if not guards:
        return "no guard in this search"
    return "; ".join(f"{m} {'≥' if g['mode'] == 'max' else '≤'} {g['limit']:.4g}" for m, g in guards.items())


def _trials_table(summary: dict[str, Any]) -> str:
    metric, mode = summary["metric"], summary["mode"]
    rows = sorted(summary.get("rows", []), key=lambda r: r["metrics"].get(metric, float("nan")), reverse=mode == "max")
    excluded = set(summary.get("excluded_by_lm_tolerance") or [])
    best = (summary.get("best") or {}).get("trial_id")
    out = [f"<tr><th>rank</th><th>trial</th><th>{html.escape(metric)}</th><th>val/lm_loss</th><th>step</th>"
           "<th>parameters</th><th>replay</th></tr>"]  # fmt: skip
    unranked, harms = summary.get("unranked") or {}, summary.get("harms") or {}
    for i, r in enumerate(rows):
        failed_guards = [m for m, ok in (r.get("guards") or {}).items() if not ok]
        mark = (" (best)" if r["trial_id"] == best else f" ({unranked[r['trial_id']]})" if r["trial_id"] in unranked
                else " (LM over the limit)" if r["trial_id"] in excluded
                else f" (failed {', '.join(failed_guards)})" if failed_guards else "")  # fmt: skip
        if harms.get(r["trial_id"]):
            mark += f" (significantly worse than the control: {', '.join(harms[r['trial_id']])})"
        params = "LM-only control" if r["control"] else " ".join(f"{k}={v}" for k, v in r["params"].items())
        out.append(
            f'<tr class="{"best" if mark == " (best)" else ""}"><td>{i + 1}{mark}</td><td>{r["trial_id"]}</td>'
            f"<td>{_fmt(r['metrics'].get(metric, float('nan')))}</td>"
            f"<td>{_fmt(r['metrics'].get(LM, float('nan')))}</td>"
            f"<td>{_fmt(r['metrics'].get('train/step', ''))}</td><td>{_fmt(params)}</td>"
            f"<td><code>{html.escape(r['replay'])}</code></td></tr>"
        )
    for f in summary.get("failed", []):
        out.append(f'<tr class="failed"><td>failed</td><td>{f["trial_id"]}</td><td colspan="4">'
                   f'{html.escape(f["reason"])}</td><td><code>{html.escape(f["replay"])}</code></td></tr>')  # fmt: skip
    return '<table class="trials">' + "".join(out) + "</table>"


def _confirmation_section(summary: dict[str, Any]) -> str:
    """The finalists' stage: each finalist's decision and why, its pooled comparisons with its matched control
    (interval, seeds, images, harms), and every run of the stage on the confirmation images."""
    conf = summary.get("confirmation") or {}
    decided = conf.get("finalists") or {}
    if not decided:
        why = "the search's best is the control: nothing to confirm" if summary.get("best") else "no best trial"
        return f"<p>No finalists' stage ({html.escape(why)}).</p>"
    out = []
    for f, d in decided.items():
        state = "confirmed" if d["confirmed"] else "not confirmed"
        out.append(f'<p class="{state.replace(" ", "-")}"><b>{html.escape(f)}: {state}</b> — {html.escape(d["why"])} '
                   f"({d['seeds']} seeds × {d['images']} confirmation images, each seed beside its matched control)"
                   "</p>")  # fmt: skip
        rows = ["<tr><th>metric</th><th>finalist</th><th>matched controls</th><th>against them (95 %)</th>"
                "<th>per seed</th><th>df</th><th>from the seeds</th></tr>"]  # fmt: skip
        for m, c in (d.get("comparisons") or {}).items():
            worse = " — significantly worse than the control" if m in (d.get("harms") or []) else ""
            per = ", ".join(_fmt(v) for v in c.get("per_seed") or [])
            rows.append(f"<tr><td>{html.escape(m)}</td><td>{_fmt(c['trial'])}</td><td>{_fmt(c['control'])}</td>"
                        f"<td>{_fmt(c['estimate'])} [{_fmt(c['lo'])}, {_fmt(c['hi'])}]{html.escape(worse)}</td>"
                        f"<td>{per}</td><td>{_fmt(c.get('df'))}</td><td>{_fmt(100 * c.get('seed_share', 0))} %</td>"
                        "</tr>")  # fmt: skip
        out.append('<table class="confirmation">' + "".join(rows) + "</table>")
    arms = ["<tr><th>run</th><th>role</th><th>of</th><th>seed</th><th>checkpoint</th><th>metrics</th><th>replay</th>"
            "</tr>"]  # fmt: skip
    for a in conf.get("arms") or []:
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in a["metrics"].items())
        arms.append(f"<tr><td>{html.escape(a['run'])}</td><td>{a['role']}</td><td>{html.escape(a['finalist'])}</td>"
                    f"<td>{a['seed']}</td><td>{html.escape(a['checkpoint'])}</td><td>{shown}</td>"
                    f"<td><details><summary>replay</summary><code>{html.escape(a.get('replay') or '')}</code>"
                    "</details></td></tr>")  # fmt: skip
    return "".join(out) + '<table class="arms">' + "".join(arms) + "</table>"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } .lead { color: #555; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ddd; padding: 4px 6px; }
tr.best { background: #eef7ee; } tr.failed { background: #fbeeee; } code { font-size: 11px; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 13px; max-width: 900px; } img.probe { width: 320px; }
"""


def build_report(search_dir: str) -> Report:
    """Write ``report.html`` and ``report/*.png`` into the search folder (where summary.json is; a local path or a
    URI)."""
    folder = str(search_dir).rstrip("/")
    if not storage.is_file(storage.join(folder, "summary.json")):
        raise ReportError(f"{folder}: no summary.json: not a finished search (run python -m raysal.tune first)")
    summary = storage.read_json(storage.join(folder, "summary.json"))
    metric, mode = summary["metric"], summary["mode"]
    # the trials beside the summary (a search folder copied elsewhere), else where the search wrote them
    trials_dir = storage.join(folder, "trials")
    if not storage.is_dir(trials_dir):
        trials_dir = summary.get("trials_dir") or trials_dir
    best, control = (summary.get("best") or {}).get("trial_id"), summary.get("control")
    study = None
    db = storage.join(folder, "optuna.db")
    if storage.is_file(db):
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with storage.local_copy(db) as path:  # SQLite needs a real file; loaded into memory below
            study = optuna.load_study(study_name=summary["search"], storage=f"sqlite:///{path}")
            study = _in_memory(study)

    figs: dict[str, bytes] = {}
    sections: list[str] = []

    def figure(name: str, title: str, png: bytes | None, caption: str, missing: str) -> None:
        sections.append(f"<h2>{html.escape(title)}</h2>")
        if png is None:
            sections.append(f'<p class="missing" id="{name}">{html.escape(missing)}</p>')
            return
        figs[name] = png
        sections.append(f'<figure id="{name}"><img src="{_uri(png)}" alt="{html.escape(title)}">'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")  # fmt: skip

    sections.append("<h2>Confirmation: finalists against matched controls, over seeds</h2>"
                    + _confirmation_section(summary))  # fmt: skip
    sections.append("<h2>Trials</h2>" + _trials_table(summary))
    figure(
        "plane", "Grounding vs language", figures.grounding_language_plane(
            summary.get("rows", []), metric, mode, summary.get("lm_limit"), best, paired=summary.get("paired"),
            excluded=set(summary.get("excluded_by_lm_tolerance") or [])),
        f"Each trial's final {metric} against its val/lm_loss, with its 95 % intervals paired with the LM-only control "
        "(the star) on the same images where the trials kept per-item records. Grey trials lost more than the LM "
        "tolerance of language quality (their interval reaches right of the dashed line) and cannot be chosen best; "
        "the grey line is the Pareto front.", "No trial reported both metrics.",
    )  # fmt: skip
    fpr_guard = (summary.get("guards") or {}).get(figures.HALLUCINATION)
    figure(
        "hallucination", "Grounding vs hallucination", figures.grounding_hallucination_plane(
            summary.get("rows", []), metric, mode, fpr_guard["limit"] if fpr_guard else None, best,
            paired=summary.get("paired")),
        f"Each trial's final {metric} against POPE's adversarial false-positive rate (it says yes to an object "
        "that is not in the image). The LM-only control is the star; grey trials failed a guard against it "
        f"({_guards_text(summary)}) and cannot be chosen best.", "No trial reported POPE (trainer.pope.images=0, "
        "or no validation image has 3 distinct things).",
    )  # fmt: skip
    if study is not None:
        png, note = figures.importance(study, metric, mode)
        figure("importance", "Which parameters mattered", png, note, note)
        figure("history", "Optimisation history", figures.history(study),
               "The objective of every completed trial in the order Optuna sampled them, and the best so far.",
               "No completed trial.")  # fmt: skip
        figure("parallel", "Parallel coordinates", figures.parallel_coordinates(study),
               "Every completed trial's sampled values, coloured by the objective.",
               "Fewer than 2 completed sampled trials.")  # fmt: skip
    ranked = [r for r in summary.get("rows", []) if metric in r["metrics"]]
    top = max(ranked, key=lambda r: r["metrics"][metric] * (1 if mode == "max" else -1))["trial_id"] if ranked else None
    probes, grid, pair = _probe_section(trials_dir, best, control, top)
    sections.append("<h2>Where the attention goes: best trial, LM-only control, top trial</h2>"
                    "<p>The evaluation protocol's attention for each probe phrase, on the original image; the phrase's "
                    "region is outlined; greyed parts were cropped away by the processor.</p>" + probes)  # fmt: skip
    if grid is not None:
        figs["probes"] = grid
    if pair is not None and "plane" in figs:  # report/lead.png: the picture to show (the README's is the demo's)
        figs["lead"] = _lead_picture(figs["plane"], pair, str(best), str(control), summary.get("verdict"),
                                     figs.get("hallucination"))  # fmt: skip

    n_failed = len(summary.get("failed", []))
    lead = (f"{summary['trials']} trials, {summary['reported']} ranked, {n_failed} failed. Objective: {metric} "
            f"({mode}); best: {best or 'none'}")  # fmt: skip
    if summary.get("lm_limit") is not None:
        lead += f"; LM-only control {control}, val/lm_loss limit {summary['lm_limit']:.4g}"
    if summary.get("guards"):
        lead += f"; guards: {_guards_text(summary)}"
    if summary.get("verdict"):
        lead += f". In words: {summary['verdict']}."
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>raysal search {html.escape(summary['search'])}"
            f"</title><style>{STYLE}</style></head><body><h1>raysal search: {html.escape(summary['search'])}</h1>"
            f"<p class='lead'>{html.escape(lead)}</p>{''.join(sections)}</body></html>")  # fmt: skip
    for name, png in figs.items():
        storage.write_bytes(storage.join(folder, "report", f"{name}.png"), png)
    out = storage.join(folder, "report.html")
    storage.write_text(out, page)
    return Report(out, figs)


def _in_memory(study: Any) -> Any:
    """A copy of the study in memory (the SQLite file it came from may be a temporary copy)."""
    copy = optuna.create_study(directions=study.directions, study_name=study.study_name)
    copy.add_trials(study.get_trials(deepcopy=False))
    return copy
