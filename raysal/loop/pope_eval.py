"""POPE at every evaluation: the model's yes/no answers to the POPE set's questions, from its first answer token.

Per image, its distinct questions go in one batch (the image once per question): the model's chat template with
the image and the question in the user turn and the assistant turn opened (``add_generation_prompt``), right
padded, the logits kept only at each row's last position (the first answer token), `raysal.metrics.pope.p_yes`
from them, one record per question (`raysal.metrics.records`). Several ranks: each asks about its part of the
images (every ``world``-th), and the records are gathered, so every rank returns the whole set's metrics; an FSDP
model (``lockstep``) runs as many forwards on every rank, a rank with fewer images repeating one, uncounted. Plain
PyTorch/transformers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from raysal.data.decode import decode_image
from raysal.data.pope_set import PopeImage, PopeSet
from raysal.distributed import all_gather_objects, my_part
from raysal.metrics.pope import p_yes, yes_no_token_ids
from raysal.metrics.records import ItemRecords, pope_metrics_of


def _messages(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


@torch.no_grad()
def answer_logits(
    model: torch.nn.Module,
    processor: Any,
    image: Any,  # (H, W, 3) uint8
    questions: Sequence[str],
    *,
    device: torch.device | str,
    autocast: contextlib.AbstractContextManager | None = None,
) -> torch.Tensor:
    """(Q, V) float32 logits of the first answer token of each question about ``image``."""
    texts = [processor.apply_chat_template(_messages(q), add_generation_prompt=True, tokenize=False) for q in questions]
    enc = processor(text=texts, images=[image] * len(texts), return_tensors="pt", padding=True,
                    padding_side="right", input_data_format="channels_last")  # fmt: skip
    mask = enc["attention_mask"]  # (Q, L)
    last = mask.sum(1) - 1  # (Q,): right padded, so the last real token is the one that predicts the answer
    keep, where = torch.unique(last, return_inverse=True)  # (K,) positions whose logits are computed at all
    inputs = {k: enc[k].to(device) for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes") if k in enc}
    with autocast or contextlib.nullcontext():
        out = model(**inputs, use_cache=False, logits_to_keep=keep.to(device))
    logits = out.logits  # (Q, K, V)
    return logits[torch.arange(len(texts), device=logits.device), where.to(logits.device)].float()  # (Q, V)


def ask(
    model: torch.nn.Module,
    processor: Any,
    item: PopeImage,
    yes_ids: Sequence[int],
    no_ids: Sequence[int],
    *,
    device: torch.device | str,
    autocast: contextlib.AbstractContextManager | None = None,
) -> list[dict]:
    """Ask about one image → one record per question (`raysal.metrics.records` ``pope`` rows), setting by setting."""
    texts = list(dict.fromkeys(q.text for q in item.questions))  # a positive is asked once for all settings
    logits = answer_logits(model, processor, decode_image(item.sample.image_bytes), texts, device=device,
                           autocast=autocast)  # fmt: skip
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
        for item, counted in my_part(pope.images, sharded=sharded, lockstep=lockstep):
            answers = ask(model, processor, item, yes_ids, no_ids, device=device, autocast=autocast)
            if counted:
                rows += answers
    finally:
        model.train(was_training)
    if sharded:
        rows = [r for part in all_gather_objects(rows) for r in part]
    into = records if records is not None else ItemRecords()
    into.replace("pope", rows)
    return pope_metrics_of(into.pope)
