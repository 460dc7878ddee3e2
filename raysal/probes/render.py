"""A phrase map as a picture: the original image, the attention as a heat overlay, the phrase's region outlined.

Pillow + NumPy only. Where the processor cropped the image away (LLaVA-1.5's centre crop) the image is dimmed and
grey: the model never saw it. The strip above the image names the phrase and its scores.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:  # an annotation only: importing it would load torch in every process that draws (W&B's actor)
    from raysal.probes.phrase_maps import PhraseMap

SIDE = 320  # pixels of the longer side in the picture (small images are enlarged): readable, light in W&B
STRIP = 30  # caption strip: two lines of Pillow's default font
# a perceptual dark-to-bright ramp (close to matplotlib's "inferno"): black → purple → orange → pale yellow
_STOPS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)
OUTLINE = (0, 255, 255)  # cyan: visible on the ramp and on most photos


def colormap(x: np.ndarray) -> np.ndarray:
    """(…) values in [0, 1] → (…, 3) float32 RGB in [0, 255]."""
    pos = np.clip(x, 0, 1) * (len(_STOPS) - 1)
    i = np.minimum(pos.astype(np.int64), len(_STOPS) - 2)
    f = (pos - i)[..., None]
    return _STOPS[i] * (1 - f) + _STOPS[i + 1] * f


def _resize(a: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize(size, resample))


def _outline(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool → the mask's boundary, 2 px wide."""
    m = mask.copy()
    inner = m.copy()
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1), (2, 0), (-2, 0), (0, 2), (0, -2)):
        inner &= np.roll(np.roll(m, dy, 0), dx, 1)
    return m & ~inner


def render(pm: PhraseMap) -> np.ndarray:
    """(h, w, 3) uint8 picture of one phrase map."""
    h, w = pm.heat.shape
    scale = SIDE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = _resize(pm.image, size, Image.BILINEAR).astype(np.float32)
    heat = _resize(pm.heat.astype(np.float32), size, Image.NEAREST)  # NaN stays NaN under nearest
    region = _resize(pm.region.astype(np.uint8) * 255, size, Image.NEAREST) > 127
    seen = np.isfinite(heat)
    hv = np.where(seen, heat, 0.0)
    alpha = (0.25 + 0.6 * hv)[..., None]  # attention shows as colour; the photo stays readable underneath
    out = np.where(seen[..., None], img * (1 - alpha) + colormap(hv) * alpha, img.mean(-1, keepdims=True) * 0.35)
    out[_outline(region)] = OUTLINE
    canvas = Image.new("RGB", (size[0], size[1] + STRIP), (255, 255, 255))
    canvas.paste(Image.fromarray(out.clip(0, 255).astype(np.uint8)), (0, STRIP))
    amr, pointing = pm.scores.get("amr", float("nan")), pm.scores.get("pointing", float("nan"))
    scores = f"amr {amr:.2f}  pointing {pointing:.2f}" if amr == amr else "region not seen by the model"
    chars = max(8, size[0] // 6)  # the default font is ~6 px per character
    text = pm.text if len(pm.text) <= chars - 2 else pm.text[: chars - 5] + "..."
    draw = ImageDraw.Draw(canvas)
    draw.text((3, 2), f'"{text}"', fill=(0, 0, 0))
    draw.text((3, 16), scores, fill=(80, 80, 80))
    return np.asarray(canvas)


def png_bytes(picture: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    return buf.getvalue()
