"""A trial against the control on the same images: the paired bootstrap over images (Koehn 2004; Dror et al. 2018).

Both evaluations' per-item records (`raysal.metrics.records`) are restricted to the images both have. One set of
``B`` resamples of those images (with replacement; seeded, so every trial of a search is compared on the *same*
resamples) weighs every item by how often its image was drawn: an image carries all its caption tokens, POPE
questions and read-out phrases. Each resample computes the metric for the trial and for the control with the same
weights, so what the two share (which images are hard) cancels in their comparison, then

* ``ratio`` = trial / control for AMR (chance-normalised: "2.3× the control's") and the LM loss ("+0.8 %"),
* ``difference`` = trial − control for everything else (F1, FPR, AP, pointing, accuracy at IoU 0.5, ...),

and the 95 % interval is a studentized one: the estimate ± Student's t with n − 1 degrees of freedom times the
bootstrap standard error over the B resamples (corrected by √(n / (n − 1)): the bootstrap's plug-in variance is
biased by (n − 1) / n), on the log scale for a ratio. Not the percentile interval: it is too narrow for few images
(a trial exactly at a guard's margin passes 4.8 % of the time at 11 images, ~3 % at 64, for a nominal 2.5 %); this
one holds its level from 11 images on (`scripts/guard_power.py --at-margin`; docs/verdict.md). Vectorised: the
resamples are a (B, n) count matrix, every metric a few matrix products over per-image sums, so a 64-trial
search's comparisons take seconds.

Records may hold several rows of one image (the seeds of one configuration evaluated on the same images,
`ItemRecords.concat`): each row is weighed by its image's count, so a pooled metric is the metric of all rows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from raysal.metrics.pope import LOGIT_RANGE, SETTINGS
from raysal.metrics.records import ItemRecords

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0
DEFINED = 0.9  # the least fraction of resamples on which the statistic must be defined for an interval
RATIO = frozenset({"amr", "lm_loss"})  # compared as trial / control
POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio", "fpr", "auroc", "mass")
_IMAGE_METRICS = ("lm_loss", "amr", "ap", "nss", "pointing")
_READOUT_METRICS = ("rec_acc50", "rec_miou")
_BINS = 1000  # POPE's AUROC bins (`raysal.metrics.pope.PopeSums`): ties within a bin, as the reported AUROC


@dataclass(frozen=True)
class Comparison:
    metric: str  # val/...
    kind: str  # "ratio" | "difference"
    trial: float  # the trial's value on the paired images
    control: float  # the control's value on the paired images
    estimate: float  # trial / control or trial − control
    lo: float  # the interval's bounds (LEVEL), NaN where the metric is undefined on > 10 % of the resamples
    hi: float
    images: int  # images both evaluations have
    method: str = "studentized"  # or "seeds": pooled over training seeds (`raysal.metrics.seeds`)

    def as_dict(self) -> dict:
        return asdict(self)


def comparable(metric: str) -> bool:
    """Whether ``metric`` (val/...) is computed from per-item records, so it can be compared paired."""
    parts = metric.split("/")
    if parts[:2] == ["val", "pope"]:
        return len(parts) == 4 and parts[2] in SETTINGS and parts[3] in POPE_METRICS
    return len(parts) == 2 and parts[0] == "val" and parts[1] in (*_IMAGE_METRICS, *_READOUT_METRICS)


def kind_of(metric: str) -> str:
    """``"ratio"`` (AMR, the LM loss) or ``"difference"``: how ``metric`` is compared with the control's."""
    return "ratio" if metric.split("/")[-1] in RATIO else "difference"


def resample_counts(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(1 + B, n) float64: row 0 all ones (the point estimate), then B multinomial draws of n images out of n."""
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64) if n else np.zeros((0, 0))
    return np.vstack([np.ones((1, n)), draws.reshape(resamples, n)])


def _table_for(metric: str) -> str:
    name = metric.split("/")[1]
    return "pope" if name == "pope" else "readout" if name in _READOUT_METRICS else "images"


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def _items(table: dict[str, list], index: dict[int, int], keep: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """(item → paired image column (items,) for the kept items, kept items mask) of a per-item table."""
    col = np.asarray([index.get(int(i), -1) for i in table["image_id"]], dtype=np.int64)
    ok = col >= 0 if keep is None else (col >= 0) & keep
    return col[ok], ok


def _per_image(col: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """(n, ...) the sum of ``values`` (items, ...) over each image's items: W @ this = the weighted sum."""
    out = np.zeros((n, *values.shape[1:]))
    np.add.at(out, col, values)
    return out


def _image_stat(images: dict[str, list], index: dict[int, int], name: str, W: np.ndarray) -> np.ndarray:
    """(1 + B,) the metric of the images table under the weights W (1 + B, n)."""
    col, ok = _items(images, index)
    n = W.shape[1]
    if name == "lm_loss":
        s = _per_image(col, np.asarray(images["lm_sum"], float)[ok], n)
        c = _per_image(col, np.asarray(images["lm_n"], float)[ok], n)
        return _div(W @ s, W @ c)
    v = np.asarray(images[name], float)[ok]  # the image's mean over its tokens, NaN: undefined
    defined = ~np.isnan(v)
    return _div(W @ _per_image(col, np.where(defined, v, 0.0), n), W @ _per_image(col, defined.astype(float), n))


def _pope_stat(pope: dict[str, list], index: dict[int, int], setting: str, name: str, W: np.ndarray) -> np.ndarray:
    col, ok = _items(pope, index, np.asarray(pope["setting"], dtype=object) == setting)
    n = W.shape[1]
    p = np.asarray(pope["p_yes"], float)[ok]
    y = np.asarray(pope["label"], bool)[ok]
    ans = p > 0.5  # as `PopeSums.add`
    if name == "mass":
        mass = W @ _per_image(col, np.asarray(pope["mass"], float)[ok], n)
        return _div(mass, W @ _per_image(col, np.ones(len(p)), n))
    if name == "auroc":
        with np.errstate(divide="ignore"):
            z = np.log(p) - np.log1p(-p)  # logit, ±inf at 0 / 1 as torch.logit
        b = np.clip(np.floor((z + LOGIT_RANGE) / (2 * LOGIT_RANGE) * _BINS), 0, _BINS - 1).astype(np.int64)
        onehot = np.zeros((len(b), _BINS))
        onehot[np.arange(len(b)), b] = 1.0
        pos = W @ _per_image(col, onehot * y[:, None], n)  # (1 + B, bins)
        neg = W @ _per_image(col, onehot * ~y[:, None], n)
        below = np.cumsum(neg, axis=1) - neg
        return _div((pos * (below + 0.5 * neg)).sum(1), pos.sum(1) * neg.sum(1))
    counts = W @ _per_image(col, np.stack([ans & y, ans & ~y, ~ans & ~y, ~ans & y], 1).astype(float), n)
    tp, fp, tn, fn = counts.T  # each (1 + B,)
    return {
        "accuracy": lambda: _div(tp + tn, tp + fp + tn + fn),
        "precision": lambda: _div(tp, tp + fp),
        "recall": lambda: _div(tp, tp + fn),
        "f1": lambda: _div(2 * tp, 2 * tp + fp + fn),
        "yes_ratio": lambda: _div(tp + fp, tp + fp + tn + fn),
        "fpr": lambda: _div(fp, fp + tn),
    }[name]()


def _readout_stat(readout: dict[str, list], index: dict[int, int], name: str, W: np.ndarray) -> np.ndarray:
    col, ok = _items(readout, index)
    n = W.shape[1]
    iou = np.asarray(readout["iou"], float)[ok]
    value = (iou >= 0.5).astype(float) if name == "rec_acc50" else iou  # IOU_HIT as `LocalizationSums`
    return _div(W @ _per_image(col, value, n), W @ _per_image(col, np.ones(len(iou)), n))


def metric_under_weights(records: ItemRecords, metric: str, ids: list[int], W: np.ndarray) -> np.ndarray:
    """(1 + B,) ``metric`` of ``records`` restricted to the images ``ids`` (in that order), each image weighed by
    its column of W (1 + B, len(ids)); every row of an image (several seeds' records concatenated) by its weight."""
    table = _table_for(metric)
    parts = metric.split("/")
    index = {int(i): k for k, i in enumerate(ids)}
    if table == "images":
        return _image_stat(records.images, index, parts[1], W)
    if table == "pope":
        return _pope_stat(records.pope, index, parts[2], parts[3], W)
    return _readout_stat(records.readout, index, parts[1], W)


def paired_ids(*records: ItemRecords, metric: str) -> list[int]:
    """The images every one of ``records`` has for ``metric``'s table, ascending."""
    table = _table_for(metric)
    sets = [set(int(i) for i in getattr(r, table)["image_id"]) for r in records]
    return sorted(set.intersection(*sets)) if sets else []


def transform(stat: np.ndarray, kind: str) -> np.ndarray:
    """The scale intervals are symmetric on: log for a ratio, the difference itself otherwise."""
    if kind != "ratio":
        return stat
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(np.where(stat > 0, stat, np.nan))


def untransform(x: float, kind: str) -> float:
    return math.exp(x) if kind == "ratio" else x


def boot_variance(t: np.ndarray) -> float:
    """The bootstrap variance of a transformed statistic (1 + B,) over its defined resamples, corrected by
    n / (n − 1) by the caller; NaN when it is undefined on more than 1 − DEFINED of them."""
    boot = t[1:]
    finite = boot[np.isfinite(boot)]
    if len(finite) < max(DEFINED * len(boot), 2):
        return math.nan
    return float(np.var(finite, ddof=1))


def t_interval(estimate: float, variance: float, df: float, level: float, kind: str) -> tuple[float, float]:
    """estimate ± t(df) · √variance on the transformed scale, back-transformed; NaN bounds without a variance."""
    if not (math.isfinite(estimate) and math.isfinite(variance)) or df <= 0:
        return math.nan, math.nan
    half = float(stats.t.ppf(1 - (1 - level) / 2, df)) * math.sqrt(max(variance, 0.0))
    return untransform(estimate - half, kind), untransform(estimate + half, kind)


def compare(
    trial: ItemRecords,
    control: ItemRecords,
    metric: str,
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> Comparison:
    """``metric`` (val/..., `comparable`) of the trial against the control's on the images both have, with its
    studentized paired-bootstrap interval. ValueError when the two share no image for it."""
    if not comparable(metric):
        raise ValueError(f"{metric!r} is not computed from per-item records: it cannot be compared paired")
    ids = paired_ids(trial, control, metric=metric)
    if not ids:
        raise ValueError(f"the trial and the control share no evaluated image for {metric}")
    n = len(ids)
    W = resample_counts(n, resamples, seed)
    t = metric_under_weights(trial, metric, ids, W)
    c = metric_under_weights(control, metric, ids, W)
    kind = kind_of(metric)
    stat = _div(t, c) if kind == "ratio" else t - c  # (1 + B,)
    z = transform(stat, kind)
    # a resample can leave a metric undefined (no absent thing drawn: no FPR): the variance is taken over the
    # resamples where it is defined, as long as they are the great majority; otherwise there is no honest interval
    variance = boot_variance(z) * n / max(n - 1, 1)
    lo, hi = t_interval(float(z[0]), variance, n - 1, level, kind)
    return Comparison(metric, kind, float(t[0]), float(c[0]), float(stat[0]), lo, hi, n)
