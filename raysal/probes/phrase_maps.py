"""Where the model looks for each probe phrase: attention on the evaluation protocol, on the user's pixels.

For every probe image, one batch holds the image once per phrase, each copy grounding only that phrase's tokens
(the token ids are the same; only the grounding differs), so one forward per image gives every phrase's maps. The
attention is the evaluation protocol's (the same layers, heads and query rows as `val/amr`), averaged over the
phrase's tokens, mapped back onto the original image (`backproject`), with the phrase's own AMR / AP / NSS /
pointing. Plain PyTorch; the caller sets the capture attention implementation (as for `evaluate`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from raysal.attention.capture import AttentionCapture, CapturePlan
from raysal.attention.targets import grounding_targets, renormalise
from raysal.batch import PixelNorm, model_inputs, to_device
from raysal.data.decode import decode_image
from raysal.data.mask import decode_mask_png
from raysal.metrics.grounding import METRICS, token_scores
from raysal.preprocess.collate import collate
from raysal.preprocess.encode import DEFAULT_PROMPT, encode_sample
from raysal.probes.backproject import Backprojection
from raysal.probes.probe_set import Probe


@dataclass
class PhraseMap:
    probe: int  # index in the probe set
    phrase: int  # index among the probe's phrases
    image_id: int
    text: str
    image: np.ndarray  # (H, W, 3) uint8, the original pixels
    region: np.ndarray  # (H, W) bool: the phrase's segments
    heat: np.ndarray  # (H, W) float32 in [0, 1]; NaN where the processor cropped the image away
    scores: dict[str, float]  # amr, ap, nss, pointing: means over the phrase's grounded tokens

    @property
    def key(self) -> str:
        """Stable across trials and steps: W&B lines trials up by it."""
        return f"probe{self.probe}_{self.phrase}"


@torch.no_grad()
def phrase_maps(
    model: torch.nn.Module,
    processor,
    probes: list[Probe],
    protocol: CapturePlan,
    *,
    prompt: str = DEFAULT_PROMPT,
    padding_side: str = "right",
    device: torch.device | str = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
    theta: float = 0.5,
) -> list[PhraseMap]:
    pad_id = processor.tokenizer.pad_token_id
    pixels = PixelNorm.from_processor(processor)
    out: list[PhraseMap] = []
    was_training = model.training
    model.eval()
    try:
        for k, probe in enumerate(probes):
            s = probe.sample
            image, segment_map = decode_image(s.image_bytes), decode_mask_png(s.mask_bytes)
            encoded = [
                encode_sample(image, segment_map, s.caption, [(p.start, p.end, p.segment_ids)], s.segment_ids,
                              processor, prompt)
                for p in probe.phrases
            ]  # fmt: skip
            batch = to_device(collate(encoded, pad_id, padding_side), device, pixels)
            t = grounding_targets(batch, protocol.query_offset)
            capture = AttentionCapture(protocol.layers, protocol.heads, t.query_pos, t.key_pos, reduce=True)
            with capture as cap, autocast or contextlib.nullcontext():
                model(**model_inputs(batch), use_cache=False)
            p = renormalise(cap.mean(), t.key_valid)  # (B, T, I) mean over the protocol's layers × heads
            to_pixels = Backprojection(*segment_map.shape, processor)
            for j, phrase in enumerate(probe.phrases):
                heat, scores = _one_phrase(p[j], t.token_valid[j], t.region[j], t.key_valid[j], segment_map.shape,
                                           to_pixels, theta)  # fmt: skip
                region = np.isin(segment_map, phrase.segment_ids)
                out.append(PhraseMap(k, j, s.image_id, phrase.text, image, region, heat, scores))
    finally:
        model.train(was_training)
    return out


def _one_phrase(
    p: torch.Tensor,  # (T, I) protocol attention of every grounded-token slot
    valid: torch.Tensor,  # (T,) this phrase's grounded, visible tokens
    region: torch.Tensor,  # (T, I) the region each token names, per image token
    key_valid: torch.Tensor,  # (I,) real image tokens (not batch padding)
    shape: tuple[int, int],
    to_pixels: Backprojection,
    theta: float,
) -> tuple[np.ndarray, dict[str, float]]:
    h, w = shape
    if not bool(valid.any()):  # the phrase's region lies outside what the model sees (cropped away)
        return np.full((h, w), np.nan, np.float32), dict.fromkeys(METRICS, float("nan"))
    n_img = int(key_valid.sum())
    sal = p[valid][:, :n_img]  # (N, I)
    sc = token_scores(sal, region[valid][:, :n_img], theta=theta)
    scores = {m: float(torch.nanmean(x)) for m, x in sc.as_dict().items()}
    return to_pixels(sal.mean(0).cpu().numpy()), scores
