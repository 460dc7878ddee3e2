"""POPE object-hallucination probe (Li et al. 2023, "Evaluating Object Hallucination in Large Vision-Language
Models") built from panoptic annotations, scored from the first answer token's logits.

Protocol
--------
Each question is a yes/no poll ``"Is there {a|an} {name} in the image?"`` about one thing category. Per kept image,
three *positives* (things in the image, label yes) are each paired with one *negative* (a thing absent from the
image, label no) under each of three negative-sampling settings, so every setting is 50 % yes (less where a negative
is missing, see below). The model answers from the logits of its first answer token; probabilities are a softmax
over the *full* vocabulary: ``mass = Σ p(yes ids) + Σ p(no ids)`` and ``p_yes = Σ p(yes ids) / mass``; the answer
is yes iff ``p_yes > 0.5``.

Question rules (`build_pope`), exactly
--------------------------------------
* Only thing categories (``categories[id]["isthing"] == 1``) count; stuff segments are ignored everywhere. Names are
  used as given in ``categories`` (nothing is stripped).
* An image is kept iff it has >= 3 distinct thing categories. Its positives are its first 3 distinct things in file
  (segment) order. Every thing in the image (not only the positives) counts as *present*.
* Cap: the kept images are sorted by ``image_id`` (ascending) and the first ``max_images`` are the *evaluated*
  images; the input order never matters. Everything below is counted over the evaluated images only:
  ``seen`` (thing categories present in at least one evaluated image), ``freq[c]`` (number of evaluated images
  containing ``c``) and ``cooc[a][b]`` (number of evaluated images containing both ``a`` and ``b``, ``a != b``).
* A negative is always a ``seen`` category absent from its image; an image's negatives within a setting are
  distinct. Per image, in ``image_id`` order:

  - random: one call ``rng.sample(candidates, k)`` with ``rng = random.Random(seed)`` shared over the images,
    ``candidates`` = the absent ``seen`` categories sorted by id, ``k = min(3, len(candidates))``; the i-th sample
    is the i-th positive's negative.
  - popular: the absent ``seen`` categories ranked by ``(-freq, id)``; the i-th positive gets the i-th.
  - adversarial: for each positive ``p`` in order, the absent ``seen`` category not already used as an adversarial
    negative of this image minimising ``(-cooc[p][c], -freq[c], id)``; a zero co-occurrence still qualifies (the
    ranking then falls back to frequency).

  Where no candidate is left, that positive has no negative in that setting; the positive is still asked and the
  shortfall is counted in `PopeBuild.missing`.
* Article: "an" iff the name's first letter is a vowel letter (a, e, i, o, u, case-insensitive), else "a".

Metrics (`PopeSums`, `pope_metrics`)
------------------------------------
Per setting: counts ``tp, fp, tn, fn`` (positive class = yes), ``n``, ``Σ mass`` and two histograms of ``p_yes``
(one per label) with `PopeSums.bins` bins whose edges are uniform in log-odds ``z = log(p_yes / (1 - p_yes))`` on
``[-LOGIT_RANGE, LOGIT_RANGE]`` (the end bins take the tails). Log-odds rather than ``p_yes`` itself so that a
confident model (``p_yes`` of 0.999 vs 0.99999) is still resolved. Everything is a flat float64 tensor of sums, so
shards merge exactly by all-reduce (SUM). AUROC is computed from the histograms as ``P(s+ > s-) + ½ P(s+ = s-)``
with pairs sharing a bin counted as ties (½): its error is at most half the fraction of (positive, negative) pairs
that share a bin, i.e. the precision is one bin (log-odds width ``2 · LOGIT_RANGE / bins``). A quantity whose
denominator is zero is NaN.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

SETTINGS = ("random", "popular", "adversarial")
N_POSITIVES = 3
YES_VARIANTS = ("Yes", "yes", " Yes", " yes")
NO_VARIANTS = ("No", "no", " No", " no")
# vocabulary pieces also tried (a variant may encode to two tokens, e.g. "▁" + "Yes"): bare word, SentencePiece
# word start, GPT-2 byte-level space
_PIECE_PREFIXES = ("", "▁", "Ġ")
LOGIT_RANGE = 16.0  # histogram edges span z in [-16, 16], i.e. p_yes in [1.1e-7, 1 - 1.1e-7]
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio", "fpr", "auroc", "mass", "n")


# ---------------------------------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class Question:
    image_id: int
    setting: str  # one of SETTINGS
    category_id: int
    name: str
    label: bool  # True: the category is in the image (answer yes)
    text: str


@dataclass(frozen=True)
class PopeBuild:
    """What `build_pope` made: the questions (image → setting → positive, its negative) and how it got there."""

    questions: tuple[Question, ...]
    image_ids: tuple[int, ...]  # the evaluated images, ascending
    n_kept: int  # images with >= 3 distinct things, before the cap
    missing: dict[str, int] = field(default_factory=dict)  # setting → positives left without a negative


def article(name: str) -> str:
    """ "an" before a vowel letter (a, e, i, o, u), else "a"."""
    return "an" if name[:1].lower() in ("a", "e", "i", "o", "u") else "a"


def question_text(name: str) -> str:
    return f"Is there {article(name)} {name} in the image?"


def _things_in_order(cats: Iterable[int], categories: Mapping[int, Mapping]) -> list[int]:
    """Distinct thing category ids in first-appearance order."""
    out: dict[int, None] = {}
    for c in cats:
        c = int(c)
        if c not in categories:
            raise ValueError(f"category id {c} is not in categories")
        if categories[c].get("isthing") == 1:
            out.setdefault(c, None)
    return list(out)


def build_pope(
    images: Iterable[tuple[int, Sequence[int]]],
    categories: Mapping[int, Mapping],
    *,
    seed: int = 0,
    max_images: int | None = None,
) -> PopeBuild:
    """POPE questions for panoptic images, by the rules of the module docstring.

    ``images``: ``(image_id, category_ids)`` with the image's segments' category ids in file order (repeats and stuff
    allowed). ``categories``: id → ``{"id", "name", "isthing", ...}`` as in a COCO panoptic file. ``max_images``: keep
    the first N images by ascending ``image_id`` among those with >= 3 distinct things (None: all).
    """
    if max_images is not None and max_images < 0:
        raise ValueError(f"max_images must be >= 0 or None; got {max_images}")
    things: dict[int, list[int]] = {}  # image_id → distinct things in file order
    for image_id, cats in images:
        image_id = int(image_id)
        if image_id in things:
            raise ValueError(f"image_id {image_id} appears twice")
        things[image_id] = _things_in_order(cats, categories)
    kept = sorted(i for i, t in things.items() if len(t) >= N_POSITIVES)
    evaluated = kept if max_images is None else kept[:max_images]

    freq: Counter[int] = Counter()
    cooc: dict[int, Counter[int]] = {}
    for i in evaluated:
        present = things[i]
        freq.update(present)
        for a in present:
            cooc.setdefault(a, Counter()).update(b for b in present if b != a)
    seen = sorted(freq)
    by_popularity = sorted(seen, key=lambda c: (-freq[c], c))

    rng = random.Random(seed)
    questions: list[Question] = []
    missing = dict.fromkeys(SETTINGS, 0)
    for i in evaluated:
        present = set(things[i])
        positives = things[i][:N_POSITIVES]
        absent = [c for c in seen if c not in present]  # ascending id
        negatives: dict[str, list[int]] = {
            "random": rng.sample(absent, min(len(positives), len(absent))),
            "popular": [c for c in by_popularity if c not in present][: len(positives)],
        }
        adversarial: list[int] = []
        for p in positives:
            left = [c for c in absent if c not in adversarial]
            if left:
                adversarial.append(min(left, key=lambda c, p=p: (-cooc[p][c], -freq[c], c)))
        negatives["adversarial"] = adversarial

        for setting in SETTINGS:
            negs = negatives[setting]
            missing[setting] += len(positives) - len(negs)
            for k, p in enumerate(positives):
                questions.append(_question(i, setting, p, categories, True))
                if k < len(negs):
                    questions.append(_question(i, setting, negs[k], categories, False))
    return PopeBuild(tuple(questions), tuple(evaluated), len(kept), missing)


def build_questions(
    images: Iterable[tuple[int, Sequence[int]]],
    categories: Mapping[int, Mapping],
    *,
    seed: int = 0,
    max_images: int | None = None,
) -> list[Question]:
    """`build_pope`'s questions only."""
    return list(build_pope(images, categories, seed=seed, max_images=max_images).questions)


def _question(
    image_id: int, setting: str, category_id: int, categories: Mapping[int, Mapping], label: bool
) -> Question:
    name = str(categories[category_id]["name"])
    return Question(image_id, setting, category_id, name, label, question_text(name))


def questions_by_image(questions: Iterable[Question]) -> dict[int, list[Question]]:
    """Questions grouped per image (images in first-appearance order, questions in their order) for batching one
    image's questions together. A positive is asked once per setting, so its text repeats within an image."""
    out: dict[int, list[Question]] = {}
    for q in questions:
        out.setdefault(q.image_id, []).append(q)
    return out


# ---------------------------------------------------------------------------------------------------- answers


def _tokenizer_label(tokenizer) -> str:
    name = getattr(tokenizer, "name_or_path", "") or "<unnamed>"
    return f"{name!r} ({type(tokenizer).__name__})"


def _single_token_ids(tokenizer, variants: Sequence[str]) -> tuple[list[int], list[str]]:
    """Ids of the variants that are one (non-unknown) token, via ``encode`` and then via vocabulary pieces."""
    unk = getattr(tokenizer, "unk_token_id", None)
    ids: list[int] = []
    tried: list[str] = []
    for v in variants:
        enc = tokenizer.encode(v, add_special_tokens=False)
        tried.append(f"encode({v!r}) -> {list(enc)}")
        if len(enc) == 1 and enc[0] != unk:
            ids.append(int(enc[0]))
    for word in dict.fromkeys(v.strip() for v in variants):
        for prefix in _PIECE_PREFIXES:
            piece = prefix + word
            tid = tokenizer.convert_tokens_to_ids(piece)
            tried.append(f"piece {piece!r} -> {tid}")
            if tid is None or tid == unk or tokenizer.convert_ids_to_tokens(int(tid)) != piece:
                continue
            ids.append(int(tid))
    return list(dict.fromkeys(ids)), tried


def yes_no_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the yes and no answers: the variants ``YES_VARIANTS`` / ``NO_VARIANTS`` that encode
    (``add_special_tokens=False``) to one token that is not the unknown token, plus the vocabulary pieces ``w``,
    ``"▁" + w`` and ``"Ġ" + w`` (w in Yes/yes, No/no) that exist; deduplicated, in that order.

    Raises ValueError if there is no yes id or no no id, or if the two share an id.
    """
    yes, yes_tried = _single_token_ids(tokenizer, YES_VARIANTS)
    no, no_tried = _single_token_ids(tokenizer, NO_VARIANTS)
    for word, ids, tried in (("yes", yes, yes_tried), ("no", no, no_tried)):
        if not ids:
            raise ValueError(
                f"tokenizer {_tokenizer_label(tokenizer)} has no single-token {word!r} answer "
                f"(tried {'; '.join(tried)})"
            )
    overlap = sorted(set(yes) & set(no))
    if overlap:
        raise ValueError(f"tokenizer {_tokenizer_label(tokenizer)}: yes ids {yes} and no ids {no} share {overlap}")
    return yes, no


def p_yes(
    first_logits: torch.Tensor, yes_ids: Sequence[int], no_ids: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p_yes, mass)``, both (Q,) float64, from the first answer token's logits (Q, V).

    With ``p = softmax(first_logits)`` over the full vocabulary: ``mass = Σ p[yes] + Σ p[no]``,
    ``p_yes = Σ p[yes] / mass`` (computed as ``sigmoid(logsumexp(yes) - logsumexp(no))``, finite even when the mass
    underflows).
    """
    if first_logits.ndim != 2:
        raise ValueError(f"first_logits must be (Q, V); got {tuple(first_logits.shape)}")
    yes = sorted(set(int(i) for i in yes_ids))
    no = sorted(set(int(i) for i in no_ids))
    if not yes or not no or set(yes) & set(no):
        raise ValueError(f"yes_ids and no_ids must be non-empty and disjoint; got {yes_ids}, {no_ids}")
    logits = first_logits.float()  # (Q, V)
    dev = logits.device
    lse_all = logits.logsumexp(-1)  # (Q,)
    lse_yes = logits[:, torch.tensor(yes, device=dev)].logsumexp(-1)  # (Q,)
    lse_no = logits[:, torch.tensor(no, device=dev)].logsumexp(-1)  # (Q,)
    p = torch.sigmoid((lse_yes - lse_no).double())  # (Q,)
    mass = (torch.logaddexp(lse_yes, lse_no) - lse_all).double().exp()  # (Q,)
    return p, mass


# ---------------------------------------------------------------------------------------------------- metrics

_TP, _FP, _TN, _FN, _N, _MASS = range(6)
_N_COUNTS = 6


class PopeSums:
    """Per-setting sums for POPE metrics, mergeable by summation (all-reduce SUM of `tensor`).

    Layout per setting (row of a (S, 6 + 2·bins) float64 table, S = len(SETTINGS)):
    ``[tp, fp, tn, fn, n, Σ mass, hist_pos (bins), hist_neg (bins)]``; `tensor` flattens it.
    """

    def __init__(self, bins: int = 1000, device: torch.device | str | None = None) -> None:
        if bins < 1:
            raise ValueError(f"bins must be >= 1; got {bins}")
        self.bins = bins
        self.table = torch.zeros(len(SETTINGS), _N_COUNTS + 2 * bins, dtype=torch.float64, device=device)  # (S, C)

    def _bin(self, p: torch.Tensor) -> torch.Tensor:
        z = torch.logit(p)  # (Q,), ±inf at 0 / 1
        edges = (z + LOGIT_RANGE) / (2 * LOGIT_RANGE) * self.bins
        return edges.clamp(0, self.bins - 1).floor().long()  # (Q,)

    def add(self, setting: str, p_yes: torch.Tensor, mass: torch.Tensor, labels: torch.Tensor) -> None:
        """Add Q answered questions of one setting: ``p_yes`` (Q,), ``mass`` (Q,), ``labels`` (Q,) bool."""
        if setting not in SETTINGS:
            raise ValueError(f"setting must be one of {SETTINGS}; got {setting!r}")
        dev = self.table.device
        p = torch.as_tensor(p_yes, dtype=torch.float64, device=dev).reshape(-1)  # (Q,)
        m = torch.as_tensor(mass, dtype=torch.float64, device=dev).reshape(-1)  # (Q,)
        y = torch.as_tensor(labels, device=dev).reshape(-1).bool()  # (Q,)
        if not (p.shape == m.shape == y.shape):
            raise ValueError(f"p_yes, mass and labels must have one shape; got {p.shape}, {m.shape}, {y.shape}")
        if not bool(torch.isfinite(p).all()) or bool(((p < 0) | (p > 1)).any()):
            raise ValueError("p_yes must be finite and in [0, 1]")
        ans = p > 0.5  # (Q,)
        row = self.table[SETTINGS.index(setting)]  # (C,) view
        row[_TP] += (ans & y).sum()
        row[_FP] += (ans & ~y).sum()
        row[_TN] += (~ans & ~y).sum()
        row[_FN] += (~ans & y).sum()
        row[_N] += p.numel()
        row[_MASS] += m.sum()
        b = self._bin(p)  # (Q,)
        ones = torch.ones_like(p)
        row[_N_COUNTS : _N_COUNTS + self.bins].index_add_(0, b[y], ones[y])
        row[_N_COUNTS + self.bins :].index_add_(0, b[~y], ones[~y])

    def tensor(self) -> torch.Tensor:
        """Flat float64 copy (S · (6 + 2·bins),) to all-reduce with SUM."""
        return self.table.reshape(-1).clone()

    @classmethod
    def from_tensor(cls, flat: torch.Tensor) -> PopeSums:
        """Inverse of `tensor` (bins inferred from the length)."""
        per = flat.numel() / len(SETTINGS)
        bins = (per - _N_COUNTS) / 2
        if flat.ndim != 1 or bins != int(bins) or bins < 1:
            raise ValueError(f"not a PopeSums tensor: shape {tuple(flat.shape)}")
        out = cls(int(bins), device=flat.device)
        out.table = flat.detach().to(torch.float64).reshape(len(SETTINGS), -1).clone()
        return out

    def __add__(self, other: PopeSums) -> PopeSums:
        if other.bins != self.bins:
            raise ValueError(f"cannot merge PopeSums with {self.bins} and {other.bins} bins")
        return PopeSums.from_tensor(self.tensor() + other.tensor().to(self.table.device))


def _div(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def _auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(s+ > s-) + ½ P(s+ = s-) from per-bin counts pos, neg (bins,); same bin = tie."""
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    below = torch.cumsum(neg, 0) - neg  # (bins,) negatives in lower bins
    return float((pos * (below + 0.5 * neg)).sum()) / (n_pos * n_neg)


def pope_metrics(sums: PopeSums) -> dict[str, float]:
    """``{"pope/{setting}/{metric}": value}`` for every setting and metric in `METRICS`; NaN where undefined.

    accuracy = (tp + tn) / n; precision = tp / (tp + fp); recall = tp / (tp + fn); f1 = 2tp / (2tp + fp + fn);
    yes_ratio = (tp + fp) / n (fraction answered yes); fpr = fp / (fp + tn) (hallucination rate); auroc from the
    histograms (module docstring); mass = mean of p(yes) + p(no); n = questions.
    """
    table = sums.table.detach().cpu()
    out: dict[str, float] = {}
    for s, setting in enumerate(SETTINGS):
        row = table[s]
        tp, fp, tn, fn, n, mass = (float(row[k]) for k in range(_N_COUNTS))
        values = {
            "accuracy": _div(tp + tn, n),
            "precision": _div(tp, tp + fp),
            "recall": _div(tp, tp + fn),
            "f1": _div(2 * tp, 2 * tp + fp + fn),
            "yes_ratio": _div(tp + fp, n),
            "fpr": _div(fp, fp + tn),
            "auroc": _auroc(row[_N_COUNTS : _N_COUNTS + sums.bins], row[_N_COUNTS + sums.bins :]),
            "mass": _div(mass, n),
            "n": n,
        }
        out.update({f"pope/{setting}/{k}": values[k] for k in METRICS})
    return out
