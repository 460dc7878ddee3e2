"""POPE questions, yes/no token ids, scoring and metrics (raysal.metrics.pope): CPU, no weights, no network."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import raysal.data
from raysal.metrics.pope import (
    METRICS,
    SETTINGS,
    PopeSums,
    build_pope,
    build_questions,
    p_yes,
    pope_metrics,
    question_text,
    questions_by_image,
    yes_no_token_ids,
)

# ---------------------------------------------------------------------------------------------------- fixtures

# id → category; 100-102 are stuff and must never be asked about
TINY_CATS = {
    1: {"id": 1, "name": "person", "isthing": 1},
    2: {"id": 2, "name": "umbrella", "isthing": 1},
    3: {"id": 3, "name": "orange", "isthing": 1},
    4: {"id": 4, "name": "elephant", "isthing": 1},
    5: {"id": 5, "name": "hot dog", "isthing": 1},
    6: {"id": 6, "name": "hair drier", "isthing": 1},
    7: {"id": 7, "name": "oven", "isthing": 1},
    100: {"id": 100, "name": "wall-other-merged", "isthing": 0},
    101: {"id": 101, "name": "sky-other-merged", "isthing": 0},
    102: {"id": 102, "name": "floor-wood", "isthing": 0},
}
# deliberately not in image_id order. Kept: 9 {4,5,7}, 10 {1,2,3,4}, 11 {5,1,6}, 14 {7,2,5,3}.
TINY_IMAGES = [
    (14, [7, 2, 5, 7, 3]),
    (10, [100, 1, 1, 2, 101, 3, 4]),
    (12, [1, 2, 100, 101, 101]),  # 2 distinct things: dropped
    (11, [5, 1, 6, 100]),
    (13, [100, 101, 102, 100]),  # 3 distinct categories, all stuff: dropped
    (9, [4, 5, 7]),
]
# By hand over the kept images: freq 5:3; 1,2,3,4,7:2; 6:1 → popularity 5,1,2,3,4,7,6.
# cooc e.g. (5,7)=2 (images 9, 14); (1,5)=(1,6)=(5,6)=1 (image 11); (2,6)=(3,6)=(4,6)=(6,7)=0.
POSITIVES = {9: [4, 5, 7], 10: [1, 2, 3], 11: [5, 1, 6], 14: [7, 2, 5]}
PRESENT = {9: {4, 5, 7}, 10: {1, 2, 3, 4}, 11: {1, 5, 6}, 14: {2, 3, 5, 7}}
POPULAR = {9: [1, 2, 3], 10: [5, 7, 6], 11: [2, 3, 4], 14: [1, 4, 6]}
ADVERSARIAL = {
    9: [1, 2, 3],  # 4: cooc 1 with 1,2,3 → id 1; 5: 2,3,6 all 1, freq 2,2,1 → 2; 7: 3 (1) > 6 (0)
    10: [5, 7, 6],  # 1: 5,6 cooc 1, freq 3 > 1 → 5; 2: 7 (1) > 6 (0); 3: only 6 left
    11: [7, 2, 3],  # 5: 7 (cooc 2); 1: 2,3,4 cooc 1, freq 2 → id 2; 6: 3,4 cooc 0, freq 2 → id 3
    14: [4, 1, 6],  # 7: 4 (1) > 1,6 (0); 2: 1 (1) > 6 (0); 5: only 6 left
}


def _by(questions, image_id, setting, label):
    return [q.category_id for q in questions if q.image_id == image_id and q.setting == setting and q.label == label]


def _coco_categories() -> dict[int, dict]:
    cats = json.loads((Path(raysal.data.__file__).parent / "coco_panoptic_categories.json").read_text())
    return {c["id"]: c for c in cats}


def _random_images(categories: dict[int, dict], n: int, seed: int) -> list[tuple[int, list[int]]]:
    """Panoptic-like images: skewed thing frequencies (ties and co-occurrence structure), stuff and repeats mixed in."""
    rng = random.Random(seed)
    things = sorted(c for c, v in categories.items() if v["isthing"] == 1)[:20]
    stuff = sorted(c for c, v in categories.items() if v["isthing"] == 0)[:5]
    weights = [1.0 / (1 + k // 3) for k in range(len(things))]
    ids = rng.sample(range(1, 10 * n), n)
    out = []
    for image_id in ids:
        segs = rng.choices(things, weights, k=rng.randint(1, 8)) + rng.choices(stuff, k=rng.randint(0, 3))
        rng.shuffle(segs)
        out.append((image_id, segs))
    return out


# ---------------------------------------------------------------------------------------------------- reference


def _reference_pope(images, categories, seed, max_images):
    """Independent loop-by-loop restatement of the rules: returns {(image, setting): (positives, negatives)}."""
    per_image = {}
    for image_id, segs in images:
        distinct = []
        for c in segs:
            if categories[c]["isthing"] == 1 and c not in distinct:
                distinct.append(c)
        per_image[image_id] = distinct
    kept = [i for i in sorted(per_image) if len(per_image[i]) >= 3]
    if max_images is not None:
        kept = kept[:max_images]
    all_seen = []
    for i in kept:
        for c in per_image[i]:
            if c not in all_seen:
                all_seen.append(c)
    all_seen.sort()

    def freq(c):
        return sum(1 for i in kept if c in per_image[i])

    def cooc(a, b):
        return sum(1 for i in kept if a in per_image[i] and b in per_image[i])

    rng = random.Random(seed)
    out = {}
    for i in kept:
        pos = per_image[i][:3]
        absent = [c for c in all_seen if c not in per_image[i]]
        out[i, "random"] = (pos, rng.sample(absent, min(3, len(absent))))
        # popular: repeatedly take the best remaining by (highest freq, lowest id)
        popular, pool = [], list(absent)
        while pool and len(popular) < 3:
            best = pool[0]
            for c in pool[1:]:
                if freq(c) > freq(best) or (freq(c) == freq(best) and c < best):
                    best = c
            popular.append(best)
            pool.remove(best)
        out[i, "popular"] = (pos, popular)
        adversarial = []
        for p in pos:
            best = None
            for c in absent:
                if c in adversarial:
                    continue
                if best is None:
                    best = c
                    continue
                key_c, key_b = (cooc(p, c), freq(c), -c), (cooc(p, best), freq(best), -best)
                if key_c > key_b:
                    best = c
            if best is not None:
                adversarial.append(best)
        out[i, "adversarial"] = (pos, adversarial)
    return out


# ---------------------------------------------------------------------------------------------------- builder


def test_tiny_fixture_by_hand():
    build = build_pope(TINY_IMAGES, TINY_CATS, seed=3)
    qs = list(build.questions)
    assert build.image_ids == (9, 10, 11, 14)
    assert build.n_kept == 4
    assert build.missing == {"random": 0, "popular": 0, "adversarial": 0}
    assert len(qs) == 4 * 3 * 6
    for i in build.image_ids:
        for setting in SETTINGS:
            assert _by(qs, i, setting, True) == POSITIVES[i]
            negs = _by(qs, i, setting, False)
            assert len(negs) == 3 and len(set(negs)) == 3
            assert not set(negs) & PRESENT[i]
            assert set(negs) <= {1, 2, 3, 4, 5, 6, 7}
        assert _by(qs, i, "popular", False) == POPULAR[i]
        assert _by(qs, i, "adversarial", False) == ADVERSARIAL[i]
    assert all(q.category_id < 100 for q in qs)  # stuff is never asked
    for setting in SETTINGS:
        labels = [q.label for q in qs if q.setting == setting]
        assert sum(labels) * 2 == len(labels)
    # the random setting is seeded: same seed same questions, another seed (here) others
    assert build_questions(TINY_IMAGES, TINY_CATS, seed=3) == qs
    other = build_questions(TINY_IMAGES, TINY_CATS, seed=4)
    assert [q for q in other if q.setting != "random"] == [q for q in qs if q.setting != "random"]


def test_articles_and_text():
    qs = build_questions(TINY_IMAGES, TINY_CATS)
    texts = {q.name: q.text for q in qs}
    assert texts["person"] == "Is there a person in the image?"
    assert texts["umbrella"] == "Is there an umbrella in the image?"
    assert texts["orange"] == "Is there an orange in the image?"
    assert texts["elephant"] == "Is there an elephant in the image?"
    assert texts["hot dog"] == "Is there a hot dog in the image?"
    assert texts["hair drier"] == "Is there a hair drier in the image?"
    assert texts["oven"] == "Is there an oven in the image?"
    assert question_text("baseball bat") == "Is there a baseball bat in the image?"
    assert question_text("Apple") == "Is there an Apple in the image?"
    assert question_text("wall-other-merged") == "Is there a wall-other-merged in the image?"  # used as given


def test_cap_first_images_by_id_and_counts_over_them():
    build = build_pope(TINY_IMAGES, TINY_CATS, max_images=2)
    assert build.image_ids == (9, 10) and build.n_kept == 4
    qs = list(build.questions)
    # over {9, 10}: freq 4:2, others 1 → popularity 4,1,2,3,5,7; 6 is unseen, so image 10 has 2 candidates
    assert _by(qs, 9, "popular", False) == [1, 2, 3]
    assert _by(qs, 10, "popular", False) == [5, 7]
    assert build.missing == {"random": 1, "popular": 1, "adversarial": 1}
    assert build_pope(TINY_IMAGES, TINY_CATS, max_images=0).questions == ()


def test_missing_negatives_counted_not_fatal():
    images = [(1, [1, 2, 3]), (2, [4, 3, 2, 1])]  # seen {1,2,3,4}: image 1 has one candidate, image 2 none
    build = build_pope(images, TINY_CATS)
    assert build.missing == {"random": 5, "popular": 5, "adversarial": 5}
    qs = list(build.questions)
    for setting in SETTINGS:
        assert _by(qs, 1, setting, True) == [1, 2, 3]
        assert _by(qs, 1, setting, False) == [4]
        assert _by(qs, 2, setting, True) == [4, 3, 2]
        assert _by(qs, 2, setting, False) == []


def test_bad_input():
    with pytest.raises(ValueError, match="999"):
        build_pope([(1, [1, 2, 999])], TINY_CATS)
    with pytest.raises(ValueError, match="twice"):
        build_pope([(1, [1, 2, 3]), (1, [4, 5, 6])], TINY_CATS)


@pytest.mark.parametrize("max_images", [None, 25])
@pytest.mark.parametrize("seed", [0, 1])
def test_builder_matches_reference(seed, max_images):
    cats = _coco_categories()
    images = _random_images(cats, 80, seed=100 + seed)
    build = build_pope(images, cats, seed=seed, max_images=max_images)
    ref = _reference_pope(images, cats, seed, max_images)
    assert build.image_ids == tuple(sorted({i for i, _ in ref}))
    assert len(build.image_ids) >= 10  # the fixture exercises something
    got = {}
    for q in build.questions:
        pos, neg = got.setdefault((q.image_id, q.setting), ([], []))
        (pos if q.label else neg).append(q.category_id)
        assert q.name == cats[q.category_id]["name"]
    assert got == {k: (list(p), list(n)) for k, (p, n) in ref.items()}
    for s in SETTINGS:
        assert build.missing[s] == sum(len(p) - len(n) for (_, st), (p, n) in ref.items() if st == s)
    for (i, _), (_, negs) in ref.items():
        segs = dict(images)[i]
        assert not set(negs) & set(segs)


def test_questions_by_image():
    qs = build_questions(TINY_IMAGES, TINY_CATS)
    grouped = questions_by_image(qs)
    assert list(grouped) == [9, 10, 11, 14]
    assert all(len(v) == 18 and {q.image_id for q in v} == {i} for i, v in grouped.items())
    assert [q for v in grouped.values() for q in v] == qs


# ---------------------------------------------------------------------------------------------------- token ids


def _word_level(vocab: dict[str, int], metaspace: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = (
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first") if metaspace else pre_tokenizers.Whitespace()
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_token_ids_whitespace_tokenizer():
    vocab = {"<unk>": 0, "Is": 1, "Yes": 2, "yes": 3, "No": 4, "no": 5, "there": 6}
    assert yes_no_token_ids(_word_level(vocab, metaspace=False)) == ([2, 3], [4, 5])


def test_token_ids_sentencepiece_style():
    # "Yes" encodes to "▁Yes"; the bare piece "Yes" exists in the vocabulary too; "▁no" does not (" no" → <unk>)
    vocab = {"<unk>": 0, "▁": 1, "▁Yes": 2, "▁yes": 3, "▁No": 4, "Yes": 5, "no": 6}
    yes, no = yes_no_token_ids(_word_level(vocab, metaspace=True))
    assert yes == [2, 3, 5]
    assert no == [4, 6]  # <unk> (the encoding of "no" / " no") is never an answer


def test_token_ids_tiny_llava_tokenizer():
    """The tiny LLaVA's tokenizer holds the answers as single tokens (as Llama's and Mistral's do), found from the
    tokenizer, and only whole words: "Yesterday" is not an answer."""
    from raysal.model.tiny import build_tokenizer

    tok = build_tokenizer()
    yes, no = yes_no_token_ids(tok)
    assert [tok.convert_ids_to_tokens(i) for i in yes] == ["Yes", " Yes"]
    assert [tok.convert_ids_to_tokens(i) for i in no] == ["No", " No"]
    # the chat template's answer turn ("ASSISTANT: Yes") starts with an answer token, not a lone "▁"
    assert tok.encode("ASSISTANT: Yes", add_special_tokens=False)[-1] in yes
    assert tok.encode("ASSISTANT: No", add_special_tokens=False)[-1] in no
    assert not set(tok.encode("Yesterday", add_special_tokens=False)) & set(yes)


def test_token_ids_errors():
    vocab = {"<unk>": 0, "Yes": 1, "maybe": 2}
    with pytest.raises(ValueError, match=r"single-token 'no'.*encode\('No'\)"):
        yes_no_token_ids(_word_level(vocab, metaspace=False))

    class Clash:  # "yes" and "no" share an id
        name_or_path = "clash"
        unk_token_id = 0

        def encode(self, text, add_special_tokens=False):
            return [7]

        def convert_tokens_to_ids(self, piece):
            return 0

        def convert_ids_to_tokens(self, i):
            return "<unk>"

    with pytest.raises(ValueError, match=r"'clash'.*share \[7\]"):
        yes_no_token_ids(Clash())


# ---------------------------------------------------------------------------------------------------- scoring


def test_p_yes_matches_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3  # (Q, V)
    yes, no = [3, 7], [5]
    got_p, got_mass = p_yes(logits, yes, no)
    prob = logits.double().softmax(-1)  # (Q, V)
    py, pn = prob[:, yes].sum(-1), prob[:, no].sum(-1)
    torch.testing.assert_close(got_mass, py + pn)
    torch.testing.assert_close(got_p, py / (py + pn))
    assert got_p.dtype == torch.float64 and got_p.shape == (6,)
    got_bf16, _ = p_yes(logits.bfloat16(), yes, no)
    assert torch.isfinite(got_bf16).all()
    with pytest.raises(ValueError):
        p_yes(logits, [3], [3])


def _planted_logits(labels: torch.Tensor, mode: str, vocab: int = 40, yes=(3, 8), no=(5,)) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(len(labels), vocab, generator=g)  # (Q, V)
    if mode == "bias":  # yes raised for every question
        logits[:, yes[0]] += 20
        logits[:, no[0]] += 15
    elif mode == "oracle":  # yes high exactly when the label is yes
        logits[labels, yes[0]] += 20
        logits[~labels, no[0]] += 20
    elif mode == "elsewhere":  # another token dominates; yes still beats no
        logits[:, 0] += 30
        logits[:, yes[0]] += 5
    return logits


def _run_planted(mode: str) -> tuple[dict[str, float], torch.Tensor]:
    qs = build_questions(TINY_IMAGES, TINY_CATS)
    sums, masses = PopeSums(), []
    for setting in SETTINGS:
        labels = torch.tensor([q.label for q in qs if q.setting == setting])  # (Q,)
        p, mass = p_yes(_planted_logits(labels, mode), [3, 8], [5])
        sums.add(setting, p, mass, labels)
        masses.append(mass)
    return pope_metrics(sums), torch.cat(masses)


def test_planted_yes_bias():
    m, mass = _run_planted("bias")
    for s in SETTINGS:
        assert m[f"pope/{s}/yes_ratio"] == 1.0
        assert m[f"pope/{s}/precision"] == 0.5
        assert m[f"pope/{s}/recall"] == 1.0
        assert m[f"pope/{s}/fpr"] == 1.0
        assert m[f"pope/{s}/accuracy"] == 0.5
        assert m[f"pope/{s}/n"] == 24
    assert (mass > 0.999).all()


def test_planted_oracle():
    m, mass = _run_planted("oracle")
    assert (mass > 0.999).all()
    for s in SETTINGS:
        assert m[f"pope/{s}/f1"] == 1.0
        assert m[f"pope/{s}/fpr"] == 0.0
        assert m[f"pope/{s}/accuracy"] == 1.0
        assert m[f"pope/{s}/yes_ratio"] == 0.5
        assert m[f"pope/{s}/auroc"] == 1.0
        assert m[f"pope/{s}/mass"] > 0.999


def test_mass_low_when_another_token_dominates():
    m, mass = _run_planted("elsewhere")
    assert (mass < 1e-6).all()
    for s in SETTINGS:
        assert m[f"pope/{s}/mass"] < 1e-6
        assert m[f"pope/{s}/yes_ratio"] == 1.0  # p_yes stays defined: yes still beats no


# ---------------------------------------------------------------------------------------------------- metrics


def test_metrics_by_hand():
    labels = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0, 0, 0]).bool()
    p = torch.tensor([0.9, 0.8, 0.7, 0.3, 0.2, 0.6, 0.1, 0.2, 0.3, 0.4])  # tp 3, fn 2, fp 1, tn 4
    mass = torch.linspace(0.5, 0.95, 10)
    sums = PopeSums()
    sums.add("popular", p, mass, labels)
    m = pope_metrics(sums)
    assert set(m) == {f"pope/{s}/{k}" for s in SETTINGS for k in METRICS}
    approx = {"accuracy": 0.7, "precision": 0.75, "recall": 0.6, "f1": 2 / 3, "yes_ratio": 0.4, "fpr": 0.2,
              "auroc": 19 / 25, "mass": float(mass.double().mean()), "n": 10}  # fmt: skip
    for k, v in approx.items():
        assert m[f"pope/popular/{k}"] == pytest.approx(v, abs=1e-12), k
    assert all(math.isnan(m[f"pope/random/{k}"]) for k in METRICS if k != "n")  # nothing added
    assert m["pope/random/n"] == 0


def test_metrics_zero_denominators():
    sums = PopeSums()
    sums.add("random", torch.tensor([0.1, 0.2]), torch.ones(2), torch.tensor([False, False]))
    m = pope_metrics(sums)
    assert m["pope/random/accuracy"] == 1.0 and m["pope/random/fpr"] == 0.0 and m["pope/random/yes_ratio"] == 0.0
    for k in ("precision", "recall", "f1", "auroc"):
        assert math.isnan(m[f"pope/random/{k}"]), k


def _brute_auroc(p: torch.Tensor, labels: torch.Tensor) -> float:
    d = p[labels][:, None] - p[~labels][None, :]  # (P, N)
    return float(((d > 0).double() + 0.5 * (d == 0).double()).mean())


@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "confident"])
def test_auroc_vs_brute_force(kind):
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        labels = torch.rand(400, generator=g) < 0.5
        shift = labels.double()
        if kind == "uniform":
            p = (torch.rand(400, generator=g, dtype=torch.float64) * 0.7 + 0.3 * shift).clamp(0, 1)
        elif kind == "logit_normal":
            p = torch.sigmoid(torch.randn(400, generator=g, dtype=torch.float64) * 3 + shift)
        else:  # a confident model: p_yes around 0.9997, still ranked
            p = torch.sigmoid(torch.randn(400, generator=g, dtype=torch.float64) * 2 + 8 + shift)
        sums = PopeSums()
        sums.add("adversarial", p, torch.ones(400), labels)
        assert pope_metrics(sums)["pope/adversarial/auroc"] == pytest.approx(_brute_auroc(p, labels), abs=1e-3)


def test_shards_merge_to_one_pass():
    g = torch.Generator().manual_seed(3)
    one, a, b = PopeSums(), PopeSums(), PopeSums()
    for s in SETTINGS:
        labels = torch.rand(100, generator=g) < 0.5
        p = torch.rand(100, generator=g, dtype=torch.float64)
        mass = torch.rand(100, generator=g, dtype=torch.float64)
        one.add(s, p, mass, labels)
        a.add(s, p[:37], mass[:37], labels[:37])
        b.add(s, p[37:], mass[37:], labels[37:])
    merged = PopeSums.from_tensor(a.tensor() + b.tensor())  # what an all-reduce SUM gives
    torch.testing.assert_close(merged.tensor(), one.tensor())
    m1, m2, m3 = pope_metrics(one), pope_metrics(merged), pope_metrics(a + b)
    assert m1.keys() == m2.keys()
    for k in m1:
        assert m2[k] == pytest.approx(m1[k], abs=1e-12) and m3[k] == pytest.approx(m1[k], abs=1e-12), k
    assert a.tensor().dtype == torch.float64 and a.tensor().ndim == 1
    with pytest.raises(ValueError):
        PopeSums.from_tensor(torch.zeros(7, dtype=torch.float64))


def test_add_validates():
    sums = PopeSums(bins=10)
    with pytest.raises(ValueError, match="setting"):
        sums.add("hard", torch.tensor([0.5]), torch.tensor([1.0]), torch.tensor([True]))
    with pytest.raises(ValueError, match="finite"):
        sums.add("random", torch.tensor([float("nan")]), torch.tensor([1.0]), torch.tensor([True]))
    with pytest.raises(ValueError, match="shape"):
        sums.add("random", torch.tensor([0.5, 0.2]), torch.tensor([1.0]), torch.tensor([True]))
    sums.add("random", torch.tensor([0.0, 1.0, 0.5]), torch.ones(3), torch.tensor([False, True, True]))  # edges
    m = pope_metrics(sums)
    assert m["pope/random/auroc"] == 1.0 and m["pope/random/recall"] == 0.5  # 0.5 is answered no
