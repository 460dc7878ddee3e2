"""POPE and the localisation readout on a real (tiny) model, end to end from the shards: the questions go through
the chat template and the processor, the first answer token's logits decide, and the answers land in the right
setting with the right label — a planted yes-bias says yes to everything, a planted oracle that answers from the
segments is always right; the readout scores each phrase's own tokens — attention planted on the regions reads
out as hits, uniform attention as misses."""

from __future__ import annotations

import math
import re

import pytest
import torch

import raysal.loop.pope_eval as pope_eval
import raysal.loop.readout_eval as readout_eval
from raysal.attention.capture import CapturePlan, enable_capture
from raysal.data.pope_set import select_pope
from raysal.data.shards import read_manifest
from raysal.metrics.pope import SETTINGS, yes_no_token_ids
from raysal.model.build import load_model, load_processor
from raysal.probes.probe_set import select_probes
from raysal.probes.readout_items import readout_items


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def tiny(request) -> tuple:
    path = request.getfixturevalue("tiny_llava" if request.param == "llava" else "tiny_next")
    processor = load_processor(str(path))
    model = load_model(str(path), dtype="float32", device=torch.device("cpu"))
    return model, processor


def _plant(model, processor, answer) -> torch.utils.hooks.RemovableHandle:
    """Add +30 to the yes or the no logit of each row, as ``answer(question_text) -> bool`` says. A forward on a
    cache (the questions' own tokens after the image's shared prefix) is read with that prefix before it."""
    yes, no = yes_no_token_ids(processor.tokenizer)
    asked: list[str] = []
    prefix: list[torch.Tensor] = []

    def before(module, args, kwargs):
        ids = kwargs["input_ids"]
        if kwargs.get("cache") is not None:
            ids = torch.cat([prefix[0].expand(len(ids), -1), ids], 1)
        else:
            prefix[:] = [ids[:1]]
        asked[:] = processor.tokenizer.batch_decode(ids)

    def after(module, args, out):
        bias = torch.zeros_like(out)
        for i, text in enumerate(asked):
            if text.rstrip().endswith(("ASSISTANT:", "[/INST]")):  # a question's last token: not the shared prefix
                bias[i, ..., yes if answer(text) else no] = 30.0
        return out + bias

    return [model.register_forward_pre_hook(before, with_kwargs=True), model.lm_head.register_forward_hook(after)]


def test_a_yes_bias_and_an_oracle(tiny, small_shards, monkeypatch):
    model, processor = tiny
    pope = select_pope(str(small_shards), "train2017", images=64)  # the train split: more images with 3 things
    assert len(pope.images) >= 3
    names = {int(c["id"]): c["name"] for c in read_manifest(str(small_shards))["categories"]}
    n_pos = sum(q.label for q in pope.build.questions if q.setting == "random")
    n_all = sum(1 for q in pope.build.questions if q.setting == "random")
    assert 0 < n_pos < n_all  # both labels are asked

    hooks = _plant(model, processor, lambda text: True)
    try:
        biased = pope_eval.pope_scores(model, processor, pope, device="cpu")
    finally:
        [h.remove() for h in hooks]
    for s in SETTINGS:
        n = sum(1 for q in pope.build.questions if q.setting == s)
        pos = sum(q.label for q in pope.build.questions if q.setting == s)
        assert biased[f"pope/{s}/yes_ratio"] == 1.0 and biased[f"pope/{s}/recall"] == 1.0
        assert biased[f"pope/{s}/fpr"] == 1.0 and math.isclose(biased[f"pope/{s}/precision"], pos / n)
        assert biased[f"pope/{s}/n"] == n and biased[f"pope/{s}/mass"] > 0.99

    # the oracle: the image it is asked about (the one being decoded), the thing the question names
    current: dict = {}
    decode = pope_eval.decode_image
    by_bytes = {item.sample.image_bytes: item.sample for item in pope.images}

    def decoding(data: bytes):
        current["sample"] = by_bytes[data]
        return decode(data)

    def present(text: str) -> bool:
        name = re.search(r"Is there an? (.+?) in the image\?", text).group(1)
        return name in {names[c] for c in current["sample"].category_ids}

    monkeypatch.setattr(pope_eval, "decode_image", decoding)
    hooks = _plant(model, processor, present)
    try:
        oracle = pope_eval.pope_scores(model, processor, pope, device="cpu")
    finally:
        [h.remove() for h in hooks]
    for s in SETTINGS:
        assert oracle[f"pope/{s}/f1"] == 1.0 and oracle[f"pope/{s}/fpr"] == 0.0 and oracle[f"pope/{s}/auroc"] == 1.0
        assert oracle[f"pope/{s}/accuracy"] == 1.0


def test_the_image_runs_once_and_the_answers_equal_one_forward_per_question(tiny, small_shards):
    """The tokens every question of an image shares (its image tokens and the template before the question) run
    once, their KV cache repeated over the questions: the first answer token's logits equal a full forward per
    question (fp32, within 1e-5), for LLaVA-1.5 and NeXT; the shared part holds the image's tokens."""
    model, processor = tiny
    pope = select_pope(str(small_shards), "train2017", images=2)
    item = pope.images[0]
    texts = list(dict.fromkeys(q.text for q in item.questions))
    image = pope_eval.decode_image(item.sample.image_bytes)
    calls: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        shared = pope_eval.answer_logits(model.eval(), processor, image, texts, device="cpu")
        full = pope_eval.answer_logits(model, processor, image, texts, device="cpu", share_prefix=False)
    finally:
        hook.remove()
    assert shared.shape == full.shape == (len(texts), model.config.text_config.vocab_size)
    assert (shared - full).abs().max() < 1e-5
    assert (full[0] - full[1]).abs().max() > 1e-4, "the questions differ: the comparison can fail"
    prefix, *questions, whole = calls
    assert len(questions) == len(texts) and prefix > 576 > max(questions), calls  # the image's tokens run once
    assert prefix + max(questions) == whole, calls  # the longest question: the batch's padded length
    # an FSDP model's ranks run as many forwards: padded with a repeated question, the answers unchanged
    padded = pope_eval.answer_logits(model, processor, image, texts, device="cpu", forwards=len(texts) + 2)
    assert torch.equal(padded, shared)
    # a model routed through the capture attention (as a run's model is) answers the same on the cache
    impl = model.config.text_config._attn_implementation
    enable_capture(model)
    try:
        captured = pope_eval.answer_logits(model, processor, image, texts, device="cpu")
    finally:
        model.set_attn_implementation({"text_config": impl})
    assert (captured - full).abs().max() < 1e-5


def test_a_tokenizer_without_one_token_answers_is_refused_with_the_key(small_shards):
    from raysal.orchestration.train.val_extras import val_extras

    class Spec:  # what val_extras reads of a RunSpec
        def __init__(self) -> None:
            self.data = {"shards": str(small_shards), "train_split": "train2017", "val_split": "val2017", "prompt": ""}
            self.config = {"trainer": {"pope": {"images": 8}, "readout": {"images": 0}}}
            self.run_dir, self.model = "/nonexistent/r", {}

    class NoAnswers:
        name_or_path, unk_token_id = "plain", 0

        def encode(self, text, add_special_tokens=False):
            return [5, 6]

        def convert_tokens_to_ids(self, piece):
            return 0

    class Proc:
        tokenizer = NoAnswers()

    with pytest.raises(ValueError, match=r"trainer\.pope: .*trainer\.pope\.images=0 turns POPE off"):
        val_extras(Spec(), Proc(), torch.device("cpu"), sharded=False, lockstep=False, write=False)


def test_the_readout_scores_each_phrases_own_tokens(tiny, small_shards, monkeypatch):
    model, processor = tiny
    probes = select_probes(str(small_shards), "train2017", images=6, phrases=10**6)
    items = readout_items(probes, processor)
    tc = model.config.text_config
    protocol = CapturePlan(tuple(range(tc.num_hidden_layers)), tuple(range(tc.num_attention_heads)), 0)
    targets: dict = {}
    real_targets = readout_eval.grounding_targets

    def keep(batch, offset):
        targets["t"] = real_targets(batch, offset)
        return targets["t"]

    class Planted:
        """The capture, replaced: each grounded token attends to its own region's image tokens (or uniformly)."""

        def __init__(self, *args, uniform: bool = False, **kw) -> None:
            self.uniform = uniform

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def mean(self) -> torch.Tensor:
            region = targets["t"].region  # (B, T, I)
            return torch.ones_like(region) if self.uniform else region

    monkeypatch.setattr(readout_eval, "grounding_targets", keep)
    monkeypatch.setattr(readout_eval, "AttentionCapture", Planted)
    on_region = readout_eval.readout_scores(model, processor, items, protocol, device="cpu")
    phrases = sum(len(p.phrases) for p in probes)
    assert 0 < on_region["rec_phrases"] <= phrases
    # a perfect map is not a perfect box: the smoothing widens small shapes' boxes (the readout's own bias)
    assert on_region["rec_acc50"] >= 0.7 and on_region["rec_miou"] >= 0.5, on_region
    monkeypatch.setattr(readout_eval, "AttentionCapture", lambda *a, **k: Planted(uniform=True))
    uniform = readout_eval.readout_scores(model, processor, items, protocol, device="cpu")
    # uniform over tokens is not uniform on the pixels (NeXT's base and tile tokens have other footprints), and a
    # big region's box can be hit by luck: far fewer hits, never the planted map's
    assert uniform["rec_phrases"] == on_region["rec_phrases"], uniform
    assert uniform["rec_acc50"] <= on_region["rec_acc50"] - 0.5 and uniform["rec_miou"] < 0.3, (on_region, uniform)


@pytest.mark.parametrize(("objective", "fails"), [("val/pope/adversarial/f1", True), ("val/amr", False)])
def test_a_pope_objective_without_pope_questions_fails_with_the_reason(monkeypatch, objective, fails):
    """Validation images with fewer than 3 distinct things leave no POPE question: a run that ranks by a POPE
    metric could never report it, so it stops saying why; any other run goes on without val/pope."""
    from types import SimpleNamespace

    import raysal.orchestration.train.val_extras as extras

    monkeypatch.setattr(extras, "yes_no_token_ids", lambda tok: None)
    no_questions = SimpleNamespace(images=[], build=SimpleNamespace(n_kept=5))
    monkeypatch.setattr(extras, "select_pope", lambda *a, **k: no_questions)
    data = {"shards": "/x", "train_split": "train2017", "val_split": "val2017", "prompt": ""}
    trainer = {"pope": {"images": 8}, "readout": {"images": 0}}
    spec = SimpleNamespace(data=data, config={"trainer": trainer}, run_dir="/nonexistent/r", model={},
                           objective={"metric": objective})  # fmt: skip
    proc = SimpleNamespace(tokenizer=None)
    if fails:
        with pytest.raises(ValueError, match=r"no validation image has 3 distinct things \(of 5\).*never reported"):
            extras.val_extras(spec, proc, torch.device("cpu"), sharded=False, lockstep=False, write=False)
    else:
        assert extras.val_extras(spec, proc, torch.device("cpu"), sharded=False, lockstep=False, write=False) is None
