"""POPE at every evaluation: the model's yes/no answers to the POPE set's questions, from its first answer token.

Per image, its distinct questions go in one batch (the image once per question): the model's chat template with
the image and the question in the user turn and the assistant turn opened (``add_generation_prompt``), right
padded, the logits kept only at each row's last position (the first answer token), `raysal.metrics.pope.p_yes`
from them. Several ranks: each asks about its part of the images (every ``world``-th), and the sums are added
over the ranks, so every rank returns the whole set's metrics; an FSDP model (``lockstep``) runs as many forwards
on every rank, a rank with fewer images repeating one, uncounted. Plain PyTorch/transformers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from raysal.data.decode import decode_image
from raysal.data.pope_set import PopeImage, PopeSet
from raysal.distributed import all_reduce_sum, my_part, world_size
from raysal.metrics.pope import PopeSums, p_yes, pope_metrics, yes_no_token_ids


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
    sums: PopeSums | None,
    *,
    device: torch.device | str,
    autocast: contextlib.AbstractContextManager | None = None,
) -> None:
    """Ask about one image; add its answers to ``sums`` (None: uncounted, a lockstep forward)."""
    texts = list(dict.fromkeys(q.text for q in item.questions))  # a positive is asked once for all settings
    logits = answer_logits(model, processor, decode_image(item.sample.image_bytes), texts, device=device,
                           autocast=autocast)  # fmt: skip
    p, mass = p_yes(logits, yes_ids, no_ids)  # (Q_distinct,)
    if sums is None:
        return
    row = {t: i for i, t in enumerate(texts)}
    for setting in dict.fromkeys(q.setting for q in item.questions):
        qs = [q for q in item.questions if q.setting == setting]
        idx = torch.tensor([row[q.text] for q in qs], device=p.device)
        sums.add(setting, p[idx], mass[idx], torch.tensor([q.label for q in qs], device=p.device))


def pope_scores(
    model: torch.nn.Module,
    processor: Any,
    pope: PopeSet,
    *,
    device: torch.device | str,
    autocast: contextlib.AbstractContextManager | None = None,
    sharded: bool = False,
    lockstep: bool = False,
) -> dict[str, float]:
    """→ {"pope/<setting>/<metric>": value} (un-namespaced; the caller prefixes ``val/``) over the whole set."""
    yes_ids, no_ids = yes_no_token_ids(processor.tokenizer)
    was_training = model.training
    model.eval()
    sums = PopeSums()
    try:
        for item, counted in my_part(pope.images, sharded=sharded, lockstep=lockstep):
            ask(model, processor, item, yes_ids, no_ids, sums if counted else None, device=device, autocast=autocast)
    finally:
        model.train(was_training)
    if sharded and world_size() > 1:
        sums = PopeSums.from_tensor(torch.tensor(all_reduce_sum(sums.tensor().tolist(), device), dtype=torch.float64))
    return pope_metrics(sums)
