"""The localisation readout at every evaluation: each grounded phrase's attention map → a box, IoU with its region's
box (`raysal.metrics.localization`: the rule), over the readout set's images.

The map is the one the probes draw (`raysal.probes.phrase_maps`): the evaluation protocol's attention (layers,
heads, query rows of ``val/amr``), averaged over the phrase's grounded tokens, mapped onto the original pixels
through the inverse coverage (`raysal.probes.backproject`). One forward per image: the caption with every chosen
phrase grounded, the attention of all their tokens captured at once; a phrase's tokens are those its own encoding
grounds (the same token ids, so the same attention). A phrase whose region the model cannot see (cropped away) is
not scored. Several ranks: every ``world``-th image each, sums added over the ranks; an FSDP model (``lockstep``)
runs as many forwards on every rank. Plain PyTorch.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from raysal.attention.capture import AttentionCapture, CapturePlan
from raysal.attention.targets import grounding_targets, renormalise
from raysal.batch import PixelNorm, model_inputs, to_device
from raysal.data.decode import decode_image
from raysal.data.mask import decode_mask_png
from raysal.distributed import all_reduce_sum, my_part, world_size
from raysal.metrics.localization import LocalizationSums, cell_side, phrase_iou
from raysal.preprocess.collate import collate
from raysal.preprocess.coverage import coverage
from raysal.preprocess.encode import DEFAULT_PROMPT, encode_sample
from raysal.probes.backproject import GRID, Backprojection
from raysal.probes.probe_set import Probe


@torch.no_grad()
def read_out(
    model: torch.nn.Module,
    processor: Any,
    probe: Probe,
    protocol: CapturePlan,
    sums: LocalizationSums | None,
    *,
    prompt: str = DEFAULT_PROMPT,
    padding_side: str = "right",
    device: torch.device | str = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
) -> None:
    """Read out every phrase of one image into ``sums`` (None: uncounted, a lockstep forward)."""
    s = probe.sample
    image, segment_map = decode_image(s.image_bytes), decode_mask_png(s.mask_bytes)
    cov = coverage(segment_map, s.segment_ids, processor)  # (I, S): once for the image, not once per phrase
    spans = [(p.start, p.end, p.segment_ids) for p in probe.phrases]
    union = encode_sample(image, segment_map, s.caption, spans, s.segment_ids, processor, prompt, cov=cov)
    batch = to_device(collate([union], processor.tokenizer.pad_token_id, padding_side), device,
                      PixelNorm.from_processor(processor))  # fmt: skip
    t = grounding_targets(batch, protocol.query_offset)
    capture = AttentionCapture(protocol.layers, protocol.heads, t.query_pos, t.key_pos, reduce=True)
    with capture as cap, autocast or contextlib.nullcontext():
        model(**model_inputs(batch), use_cache=False)
    if sums is None:
        return
    p = renormalise(cap.mean(), t.key_valid)[0]  # (T, I) over the union's grounded tokens
    n_img = int(t.key_valid[0].sum())
    # a batch of one has no padding: the union's positions are numbered as a phrase's own encoding numbers them
    row_of = {int(pos): i for i, pos in enumerate(union["grounded_pos"].tolist())}
    visible = t.token_valid[0]  # (T,) grounded and inside the model's view
    to_pixels = Backprojection(*segment_map.shape, processor)
    side = cell_side(*segment_map.shape, GRID)
    for phrase, span in zip(probe.phrases, spans, strict=True):
        own = encode_sample(image, segment_map, s.caption, [span], s.segment_ids, processor, prompt, cov=cov)
        rows = [row_of[int(q)] for q in own["grounded_pos"] if int(q) in row_of]
        rows = [r for r in rows if bool(visible[r])]
        if not rows:  # the phrase's region lies outside what the model sees: nothing to localise
            continue
        heat = to_pixels(p[rows, :n_img].mean(0).double().cpu().numpy())  # (H, W)
        sums.add(phrase_iou(heat, np.isin(segment_map, phrase.segment_ids), side))


def readout_scores(
    model: torch.nn.Module,
    processor: Any,
    probes: list[Probe],
    protocol: CapturePlan,
    *,
    prompt: str = DEFAULT_PROMPT,
    padding_side: str = "right",
    device: torch.device | str = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
    sharded: bool = False,
    lockstep: bool = False,
) -> dict[str, float]:
    """→ {"rec_acc50", "rec_miou", "rec_phrases"} over the whole readout set (un-namespaced)."""
    was_training = model.training
    model.eval()
    sums = LocalizationSums()
    kw = {"prompt": prompt, "padding_side": padding_side, "device": device, "autocast": autocast}
    try:
        for probe, counted in my_part(probes, sharded=sharded, lockstep=lockstep):
            read_out(model, processor, probe, protocol, sums if counted else None, **kw)
    finally:
        model.train(was_training)
    if sharded and world_size() > 1:
        sums = LocalizationSums.from_tensor(torch.tensor(all_reduce_sum(sums.tensor().tolist(), device)))
    return {**sums.metrics(), "rec_phrases": sums.n}
