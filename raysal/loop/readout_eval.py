"""The localisation readout at every evaluation: each grounded phrase's attention map → a box, IoU with its region's
box (`raysal.metrics.localization`: the rule), over the readout set's images.

The map is the one the probes draw (`raysal.probes.phrase_maps`): the evaluation protocol's attention (layers,
heads, query rows of ``val/amr``), averaged over the phrase's grounded tokens, mapped onto the original pixels
through the inverse coverage (`raysal.probes.backproject`). The inputs come encoded, once, where the set was chosen
(`raysal.probes.readout_items`): per image one batch, the caption with every chosen phrase grounded, so one
forward captures the attention of all their tokens, and per phrase the rows of that capture its own encoding
grounds. A phrase whose region the model cannot see (cropped away) is not scored. Several ranks: every
``world``-th image each, the records gathered; an FSDP model (``lockstep``) runs as many forwards on every
rank. Plain PyTorch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from raysal.attention.capture import AttentionCapture, CapturePlan
from raysal.attention.targets import grounding_targets, renormalise
from raysal.batch import PixelNorm, model_inputs, to_device
from raysal.distributed import all_gather_objects, my_part
from raysal.metrics.localization import cell_side, phrase_iou
from raysal.metrics.records import ItemRecords, readout_metrics
from raysal.probes.readout_items import ReadoutItem


@torch.no_grad()
def read_out(
    model: torch.nn.Module,
    item: ReadoutItem,
    protocol: CapturePlan,
    *,
    pixels: PixelNorm,
    device: torch.device | str = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
) -> None:
    """Read out every phrase of one image → one record per phrase (``readout`` rows of `raysal.metrics.records`)."""
    batch = to_device(item.batch, device, pixels)  # a new dict: the item's host batch stays uint8
    t = grounding_targets(batch, protocol.query_offset)
    capture = AttentionCapture(protocol.layers, protocol.heads, t.query_pos, t.key_pos, reduce=True)
    with capture as cap, autocast or contextlib.nullcontext():
        model(**model_inputs(batch), use_cache=False)
    p = renormalise(cap.mean(), t.key_valid)[0]  # (T, I) over the union's grounded tokens
    n_img = int(t.key_valid[0].sum())
    visible = t.token_valid[0]  # (T,) grounded and inside the model's view (depends on the protocol's offset)
    to_pixels = item.pixels.dense()  # (I, C) coverage rebuilt for this image's phrases, dropped after
    side = cell_side(*item.segment_map.shape, item.pixels.grid)
    out = []
    for phrase in item.phrases:
        rows = [r for r in phrase.rows if bool(visible[r])]
        if not rows:  # the phrase's region lies outside what the model sees: nothing to localise
            continue
        heat = to_pixels(p[rows, :n_img].mean(0).double().cpu().numpy())  # (H, W)
        iou = phrase_iou(heat, np.isin(item.segment_map, phrase.segment_ids), side)
        out.append({"image_id": int(item.image_id), "iou": iou})
    return out


def readout_scores(
    model: torch.nn.Module,
    processor: Any,
    items: Sequence[ReadoutItem],
    protocol: CapturePlan,
    *,
    device: torch.device | str = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
    sharded: bool = False,
    lockstep: bool = False,
    records: ItemRecords | None = None,
) -> dict[str, float]:
    """→ {"rec_acc50", "rec_miou", "rec_phrases"} over the whole readout set (un-namespaced), from the phrases'
    records (``records``: filled with them, the ranks' parts gathered). ``processor``: only for its pixel
    normalisation, done on the device."""
    was_training = model.training
    model.eval()
    rows: list[dict] = []
    kw = {"pixels": PixelNorm.from_processor(processor), "device": device, "autocast": autocast}
    try:
        for item, counted in my_part(items, sharded=sharded, lockstep=lockstep):
            phrases = read_out(model, item, protocol, **kw)
            if counted:
                rows += phrases
    finally:
        model.train(was_training)
    if sharded:
        rows = [r for part in all_gather_objects(rows) for r in part]
    into = records if records is not None else ItemRecords()
    into.replace("readout", rows)
    return readout_metrics(into.readout)
