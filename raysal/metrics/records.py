"""Per-item evaluation records: what every validation metric is made of, per hold-out image.

One evaluation keeps three column tables (lists of equal length, JSON-ready), keyed by the dataset's image id:

* ``images``: one row per evaluated image — ``lm_sum`` (Σ next-token CE over its caption tokens), ``lm_n`` (its
  caption tokens), ``tokens`` (its grounded tokens) and ``amr``, ``ap``, ``nss``, ``pointing``: the nanmean of each
  over the image's grounded tokens (NaN where no token of the image defines it; ``null`` in JSON).
* ``pope``: one row per POPE question asked — ``image_id``, ``setting``, ``label`` (the thing is there), ``p_yes``
  and ``mass`` (p(yes) + p(no)).
* ``readout``: one row per read-out phrase — ``image_id`` and ``iou`` (0 for a miss).

The reported metrics are computed *from* these tables (`grounding_metrics`, `pope_metrics_of`, `readout_metrics`),
on every rank after the ranks' parts are gathered and put in a canonical order (by image id), so the records are
the one source of truth: summing them again reproduces every reported value exactly, and a paired comparison of
two trials (`raysal.metrics.paired`) resamples the very items their metrics were computed from. An image carries
all its tokens, questions and phrases: it is the unit of resampling.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from raysal.metrics.grounding import METRICS
from raysal.metrics.localization import LocalizationSums
from raysal.metrics.pope import SETTINGS, PopeSums, pope_metrics

IMAGE_COLUMNS = ("image_id", "lm_sum", "lm_n", "tokens", *METRICS)
POPE_COLUMNS = ("image_id", "setting", "label", "p_yes", "mass")
READOUT_COLUMNS = ("image_id", "iou")
TABLES = {"images": IMAGE_COLUMNS, "pope": POPE_COLUMNS, "readout": READOUT_COLUMNS}
RECORDS_FILE = "eval_records.json"  # in each checkpoint folder: the records of the evaluation it was saved after


def _empty(columns: tuple[str, ...]) -> dict[str, list]:
    return {c: [] for c in columns}


@dataclass
class ItemRecords:
    images: dict[str, list] = field(default_factory=lambda: _empty(IMAGE_COLUMNS))
    pope: dict[str, list] = field(default_factory=lambda: _empty(POPE_COLUMNS))
    readout: dict[str, list] = field(default_factory=lambda: _empty(READOUT_COLUMNS))

    def add(self, table: str, rows: Iterable[dict]) -> None:
        cols = getattr(self, table)
        for row in rows:
            for c in TABLES[table]:
                cols[c].append(row[c])

    def rows(self, table: str) -> list[dict]:
        cols = getattr(self, table)
        names = TABLES[table]
        return [dict(zip(names, values, strict=True)) for values in zip(*(cols[c] for c in names), strict=True)]

    def replace(self, table: str, rows: Iterable[dict]) -> None:
        """This table's rows from ``rows`` (the ranks' gathered parts), in the canonical order: by image id, each
        image's rows in the order they were recorded (one rank evaluates an image)."""
        setattr(self, table, _empty(TABLES[table]))
        self.add(table, sorted(rows, key=lambda r: r["image_id"]))

    @classmethod
    def concat(cls, parts: Iterable[ItemRecords]) -> ItemRecords:
        """One set of records holding every row of ``parts`` (the seeds of one configuration, evaluated on the same
        images): an image then has one row per part in each table, and a metric of the whole is the metric of all
        the rows (`raysal.metrics.seeds`)."""
        out = cls()
        for part in parts:
            for t in TABLES:
                out.add(t, part.rows(t))
        return out

    def to_json(self) -> str:
        def clean(v: object) -> object:  # NaN → null: standard JSON, read by any client
            return None if isinstance(v, float) and math.isnan(v) else v

        return json.dumps({t: {c: [clean(v) for v in vs] for c, vs in getattr(self, t).items()} for t in TABLES})

    @classmethod
    def from_json(cls, text: str) -> ItemRecords:
        raw = json.loads(text)
        out = cls()
        for t, columns in TABLES.items():
            got = raw.get(t) or {}
            missing = [c for c in columns if c not in got]
            if missing:
                raise ValueError(f"{RECORDS_FILE}: table {t!r} lacks the columns {missing}")
            floats = set(columns) - {"image_id", "setting", "label"}
            setattr(out, t, {c: [math.nan if (c in floats and v is None) else v for v in got[c]] for c in columns})
        return out


def grounding_metrics(images: dict[str, list]) -> dict[str, float]:
    """→ {"lm_loss", "amr", "ap", "nss", "pointing", "images", "tokens"} of an ``images`` table: the LM loss over all
    caption tokens; each grounding metric the mean over the images where it is defined (NaN with none)."""
    lm_n = sum(images["lm_n"])
    out = {"lm_loss": math.fsum(images["lm_sum"]) / lm_n if lm_n else math.nan}
    for name in METRICS:
        defined = [v for v in images[name] if not math.isnan(v)]
        out[name] = math.fsum(defined) / len(defined) if defined else math.nan
    out.update(images=float(len(images["image_id"])), tokens=float(sum(images["tokens"])))
    return out


def pope_metrics_of(pope: dict[str, list]) -> dict[str, float]:
    """`raysal.metrics.pope.pope_metrics` of a ``pope`` table (questions added setting by setting, in order)."""
    sums = PopeSums()
    for setting in SETTINGS:
        idx = [i for i, s in enumerate(pope["setting"]) if s == setting]
        if idx:
            sums.add(setting, [pope["p_yes"][i] for i in idx], [pope["mass"][i] for i in idx],
                     [bool(pope["label"][i]) for i in idx])  # fmt: skip
    return pope_metrics(sums)


def readout_metrics(readout: dict[str, list]) -> dict[str, float]:
    """→ {"rec_acc50", "rec_miou", "rec_phrases"} of a ``readout`` table."""
    sums = LocalizationSums()
    for iou in readout["iou"]:
        sums.add(iou)
    return {**sums.metrics(), "rec_phrases": sums.n}
