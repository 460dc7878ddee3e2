"""POPE at every evaluation: the model's yes/no answers to the POPE set's questions, from its first answer token.

Per image, its distinct questions go in one batch: the model's chat template with the image and the question in the
user turn and the assistant turn opened (``add_generation_prompt``), right padded; the tokens every question
shares (the image's and the template's before the question) run once and their KV cache serves each question's
own tokens (`answer_logits`); the logits kept only at each row's last position (the first answer token),
`raysal.metrics.pope.p_yes` from them, one record per question (`raysal.metrics.records`). Several ranks: each asks
about its part of the images (every ``world``-th), and the records are gathered, so every rank returns the whole
set's metrics; an FSDP model (``lockstep``) runs as many forwards on every rank, a rank with fewer images repeating
one, uncounted. Plain PyTorch/transformers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from raysal.batch import MODEL_KEYS
from raysal.data.decode import decode_image
from raysal.data.pope_set import PopeImage, PopeSet
from raysal.distributed import all_gather_objects, my_part
from raysal.metrics.pope import p_yes, yes_no_token_ids
from raysal.metrics.records import ItemRecords, pope_metrics_of


def _messages(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def shared_prefix(input_ids: torch.Tensor, lengths: torch.Tensor) -> int:
    """How many leading tokens every row has in common (the chat template's user turn up to the question: the
    image's tokens and what precedes them), keeping at least one token of each row for the suffix."""
    same = (input_ids == input_ids[:1]).all(0)  # (L,)
    differs = (~same).nonzero()
    common = int(differs[0]) if len(differs) else input_ids.shape[1]
    return max(0, min(common, int(lengths.min()) - 1))


@torch.no_grad()
def answer_logits(
    model: torch.nn.Module,
    processor: Any,
    image: Any,  # (H, W, 3) uint8
    questions: Sequence[str],
    *,
    device: torch.device | str,
    autocast: contextlib.AbstractContextManager | None = None,
    share_prefix: bool = True,
    forwards: int = 0,
) -> torch.Tensor:
    """(Q, V) float32 logits of the first answer token of each question about ``image``.

    ``share_prefix``: the tokens every question shares — the image's and the template's before the question — run
    once (vision tower, projector, their attention) into a KV cache of one row; then each question's own tokens run
    on it, one question at a time (the cache cropped back after each: memory of one row, not of Q copies); the
    logits equal one full forward per question (to float rounding). ``forwards``: at least this many question
    forwards (the first question repeated, uncounted): an FSDP model's ranks must run as many. False: the questions
    in one batch, the image once per question (the path this replaced; kept to compare with)."""
    texts = [processor.apply_chat_template(_messages(q), add_generation_prompt=True, tokenize=False) for q in questions]
    enc = processor(text=texts, images=[image] * len(texts), return_tensors="pt", padding=True,
                    padding_side="right", input_data_format="channels_last")  # fmt: skip
    mask = enc["attention_mask"]  # (Q, L)
    last = mask.sum(1) - 1  # (Q,): right padded, so the last real token is the one that predicts the answer
    inputs = {k: enc[k].to(device) for k in MODEL_KEYS if k in enc}
    with autocast or contextlib.nullcontext():
        if not share_prefix:
            keep, where = torch.unique(last, return_inverse=True)  # (K,) positions whose logits are computed at all
            logits = model(**inputs, use_cache=False, logits_to_keep=keep.to(device)).logits  # (Q, K, V)
            return logits[torch.arange(len(texts), device=logits.device), where.to(logits.device)].float()
        ids, attn = inputs["input_ids"], inputs["attention_mask"]
        prefix = shared_prefix(enc["input_ids"], mask.sum(1))
        images = {k: v[:1] for k, v in inputs.items() if k in ("pixel_values", "image_sizes", "image_grid_thw")}
        if "image_grid_thw" in inputs:  # Qwen: the first image's patch rows; the prefix's M-RoPE token types
            images["pixel_values"] = inputs["pixel_values"][: int(inputs["image_grid_thw"][0].prod())]
            images["mm_token_type_ids"] = inputs["mm_token_type_ids"][:1, :prefix]
        cache = model(input_ids=ids[:1, :prefix], attention_mask=attn[:1, :prefix], use_cache=True, logits_to_keep=1,
                      **images).cache  # fmt: skip
        rows = []
        qwen = "image_grid_thw" in inputs
        for i in [*range(len(texts)), *[0] * max(0, forwards - len(texts))]:
            end = int(last[i]) + 1
            # the row is unpadded up to `end` (right padding): its mask is all ones. Qwen (transformers 5.25) makes
            # a cached forward's M-RoPE positions from the whole mask's length (one per token of the mask, not of
            # the suffix); without a mask it continues from the cache with the prefix's offset, which is exact
            mask_kw = {} if qwen else {"attention_mask": attn[i : i + 1, :end]}
            out = model(input_ids=ids[i : i + 1, prefix:end], cache=cache, use_cache=True, logits_to_keep=1,
                        **mask_kw)  # fmt: skip
            cache.crop(prefix - end)  # back to the shared part (a negative count: the tokens to drop)
            rows.append(out.logits[0, -1])  # (V,)
    return torch.stack(rows[: len(texts)]).float()  # (Q, V)


def ask(
    model: torch.nn.Module,
    processor: Any,
    item: PopeImage,
    yes_ids: Sequence[int],
    no_ids: Sequence[int],
    *,
    device: torch.device | str,
    autocast: contextlib.AbstractContextManager | None = None,
    forwards: int = 0,
) -> list[dict]:
    """Ask about one image → one record per question (`raysal.metrics.records` ``pope`` rows), setting by setting.
    ``forwards``: `answer_logits`'s (lockstep)."""
    texts = list(dict.fromkeys(q.text for q in item.questions))  # a positive is asked once for all settings
    logits = answer_logits(model, processor, decode_image(item.sample.image_bytes), texts, device=device,
                           autocast=autocast, forwards=forwards)  # fmt: skip
    p, mass = p_yes(logits, yes_ids, no_ids)  # (Q_distinct,)
    row = {t: i for i, t in enumerate(texts)}
    p, mass = p.double().tolist(), mass.double().tolist()
    return [
        {"image_id": int(q.image_id), "setting": setting, "label": bool(q.label), "p_yes": p[row[q.text]],
         "mass": mass[row[q.text]]}
        for setting in dict.fromkeys(q.setting for q in item.questions)
        for q in item.questions
        if q.setting == setting
    ]  # fmt: skip


def pope_scores(
    model: torch.nn.Module,
    processor: Any,
    pope: PopeSet,
    *,
    device: torch.device | str,
    autocast: contextlib.AbstractContextManager | None = None,
    sharded: bool = False,
    lockstep: bool = False,
    records: ItemRecords | None = None,
) -> dict[str, float]:
    """→ {"pope/<setting>/<metric>": value} (un-namespaced; the caller prefixes ``val/``) over the whole set,
    computed from the questions' records (``records``: filled with them, the ranks' parts gathered)."""
    yes_ids, no_ids = yes_no_token_ids(processor.tokenizer)
    was_training = model.training
    model.eval()
    rows: list[dict] = []
    try:
        # an FSDP model's ranks run as many forwards: each image as many questions as the set's most asked image
        most = max((len({q.text for q in item.questions}) for item in pope.images), default=0) if lockstep else 0
        for item, counted in my_part(pope.images, sharded=sharded, lockstep=lockstep):
            answers = ask(model, processor, item, yes_ids, no_ids, device=device, autocast=autocast, forwards=most)
            if counted:
                rows += answers
    finally:
        model.train(was_training)
    if sharded:
        rows = [r for part in all_gather_objects(rows) for r in part]
    into = records if records is not None else ItemRecords()
    into.replace("pope", rows)
    return pope_metrics_of(into.pope)
