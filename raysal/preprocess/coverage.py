"""Image-token × segment coverage: which fraction of each image token's pixel cell each segment covers.

DESIGN.md §3.2. The (H, W) segment-id map is pushed through the *same* geometry as the pixels — pad-to-square,
resize, centre crop (llava-1.5); base squash, best-pinpoint canvas with central padding, 336 tiles, token-unit
unpadding and ``image_newline`` rows (LLaVA-NeXT); per-side ``smart_resize`` and 2×2 patch merging (Qwen2.5-VL,
Qwen3-VL) — read from the image processor's own config and computed with
transformers' own size helpers. Nearest-neighbour resampling is done on 1-D index maps (every step is axis
aligned, so rows and columns transform independently); only the final lookup is 2-D. Padding maps to index -1,
which lands on a void row/column appended to the compact label map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from transformers.image_processing_utils import get_patch_output_size, get_size_dict, select_best_resolution
from transformers.image_transforms import get_resize_output_image_size
from transformers.image_utils import ChannelDimension

try:  # present in transformers 4.4x-5.x; only needed for exotic size dicts
    from transformers.image_transforms import get_size_with_aspect_ratio
except ImportError:  # pragma: no cover
    get_size_with_aspect_ratio = None
try:
    from transformers.image_utils import get_image_size_for_max_height_width
except ImportError:  # pragma: no cover
    get_image_size_for_max_height_width = None

VOID = 0
_LUT_MAX = 1 << 20  # ids below this use a direct lookup table (4 MiB at most); larger ones use searchsorted


# ---------------------------------------------------------------------------------------------- size arithmetic


def _size_dict(size: Any, default_to_square: bool, name: str) -> dict[str, int]:
    """SizeDict / dict / int → plain dict without None values (transformers' own normalisation)."""
    if size is None:
        return {}
    if not isinstance(size, int | list | tuple):
        size = {k: v for k, v in dict(size).items() if v is not None}  # SizeDict iterates its non-None items
    return dict(get_size_dict(size, default_to_square=default_to_square, param_name=name))


def _dummy(h: int, w: int) -> np.ndarray:
    # transformers' size helpers read only the shape; a zero-stride view costs nothing
    return np.broadcast_to(np.zeros((), dtype=np.uint8), (1, h, w))


def _resize_output_size(h: int, w: int, size: dict[str, int]) -> tuple[int, int]:
    """The output (height, width) of the backends' ``resize(image, size)`` (same dispatch order)."""
    se, le = size.get("shortest_edge"), size.get("longest_edge")
    if se and le and get_size_with_aspect_ratio is not None:
        return tuple(get_size_with_aspect_ratio((h, w), se, le))
    if se:
        return tuple(
            get_resize_output_image_size(
                _dummy(h, w), size=se, default_to_square=False, input_data_format=ChannelDimension.FIRST
            )
        )
    if size.get("max_height") and size.get("max_width") and get_image_size_for_max_height_width is not None:
        return tuple(get_image_size_for_max_height_width((h, w), size["max_height"], size["max_width"]))
    if size.get("height") and size.get("width"):
        return size["height"], size["width"]
    raise ValueError(f"unsupported image processor size {size}")


# --------------------------------------------------------------------------------------- 1-D index-map geometry
# An axis map is an int64 array (n,) giving, for each pixel along that axis of the current image, the row (or
# column) of the ORIGINAL image it came from; -1 marks padding.


def _resize(idx: np.ndarray, n_out: int) -> np.ndarray:
    # nearest neighbour with pixel-centre alignment, the convention PIL and torchvision use for the pixels
    n_in = len(idx)
    if n_out == n_in:
        return idx
    src = ((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64)
    return idx[np.minimum(src, n_in - 1)]


def _pad(idx: np.ndarray, before: int, after: int) -> np.ndarray:
    return np.concatenate([np.full(before, -1, np.int64), idx, np.full(after, -1, np.int64)])


def _center_crop(idx: np.ndarray, n: int, ceil_pad: bool) -> np.ndarray:
    # offsets of image_transforms.center_crop / TorchvisionBackend.center_crop: (in - out) // 2 when cropping;
    # an image smaller than the crop is padded first — numpy pads ceil(d/2) before, torchvision floor(d/2)
    m = len(idx)
    if n > m:
        before = (n - m + 1) // 2 if ceil_pad else (n - m) // 2
        return _pad(idx, before, n - m - before)
    top = (m - n) // 2
    return idx[top : top + n]


def _ceil_crop_pad(image_processor) -> bool:
    # only matters when the image is smaller than crop_size; the torchvision backend floors, numpy/PIL ceil
    return getattr(image_processor, "backend", "pil") != "torchvision"


def _resize_and_crop(rows: np.ndarray, cols: np.ndarray, image_processor) -> tuple[np.ndarray, np.ndarray]:
    """The per-image (llava) / per-patch (NeXT) ``resize(size)`` then ``center_crop(crop_size)`` steps."""
    ip = image_processor
    if getattr(ip, "do_resize", True):
        size = _size_dict(ip.size, getattr(ip, "default_to_square", False), "size")
        nh, nw = _resize_output_size(len(rows), len(cols), size)
        rows, cols = _resize(rows, nh), _resize(cols, nw)
    if getattr(ip, "do_center_crop", False):
        crop = _size_dict(ip.crop_size, True, "crop_size")
        ceil = _ceil_crop_pad(ip)
        rows, cols = _center_crop(rows, crop["height"], ceil), _center_crop(cols, crop["width"], ceil)
    return rows, cols


# ------------------------------------------------------------------------------------------- labels and pooling


def _compact_labels(segment_map: np.ndarray, segment_ids: Sequence[int]) -> tuple[np.ndarray, int]:
    """(H, W) ids → (H+1, W+1) int32 labels in [0, S]: k = segment_ids[k], S = nothing (void, unknown id,
    padding). The extra last row/column is void so that padding index -1 lands on it."""
    seg = np.asarray(segment_map)
    if seg.ndim != 2 or not np.issubdtype(seg.dtype, np.integer):
        raise ValueError(f"segment_map must be a 2-D integer array, got {seg.dtype} {seg.shape}")
    ids = np.asarray(segment_ids, dtype=np.int64).reshape(-1)
    n = len(ids)
    if len(np.unique(ids)) != n:
        raise ValueError("segment_ids must be unique")
    order = np.arange(n, dtype=np.int32)
    keep = ids != VOID  # void never counts, even if listed: its column stays zero
    lo, hi = (int(seg.min()), int(seg.max())) if seg.size else (0, 0)
    if lo >= 0 and hi < _LUT_MAX:
        lut = np.full(hi + 1, n, dtype=np.int32)
        sel = keep & (ids >= 0) & (ids <= hi)
        lut[ids[sel]] = order[sel]
        labels = lut[seg]
    else:  # large ids (COCO panoptic R + 256·G + 256²·B): map the few distinct values, not every pixel
        uniq, inverse = np.unique(seg, return_inverse=True)
        ids_k, order_k = ids[keep], order[keep]
        sort = np.argsort(ids_k)
        ids_s, order_s = ids_k[sort], order_k[sort]
        pos = np.minimum(np.searchsorted(ids_s, uniq), max(len(ids_s) - 1, 0))
        lut = np.full(len(uniq), n, dtype=np.int32)
        if len(ids_s):
            hit = ids_s[pos] == uniq
            lut[hit] = order_s[pos[hit]]
        labels = lut[inverse.reshape(seg.shape)]
    return np.pad(labels, ((0, 1), (0, 1)), constant_values=n), n


def _gather(labels: np.ndarray, blocks: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Label maps of the processed blocks, stacked (B, h, w); all blocks must share one shape (as the pixels)."""
    shapes = {(len(r), len(c)) for r, c in blocks}
    if len(shapes) != 1:
        raise ValueError(f"processed patches differ in shape {sorted(shapes)}; the processor could not stack them")
    return np.stack([labels[r[:, None], c[None, :]] for r, c in blocks])


def _pool(block_labels: np.ndarray, n_seg: int, patch_size: int) -> np.ndarray:
    """(B, h, w) labels in [0, n_seg] → (B, h // p, w // p, n_seg) fraction of each p×p cell per segment.

    The vision tower's stride-p convolution drops a remainder row/column of pixels, so do we."""
    b, h, w = block_labels.shape
    p = patch_size
    gh, gw = h // p, w // p
    lab = block_labels[:, : gh * p, : gw * p]
    cell = (
        np.arange(b, dtype=np.intp)[:, None, None] * (gh * gw)
        + (np.arange(gh * p, dtype=np.intp) // p)[None, :, None] * gw
        + (np.arange(gw * p, dtype=np.intp) // p)[None, None, :]
    )  # (B, gh·p, gw·p) flat cell index
    counts = np.bincount((cell * (n_seg + 1) + lab).ravel(), minlength=b * gh * gw * (n_seg + 1))
    counts = counts.reshape(b, gh, gw, n_seg + 1)[..., :n_seg]  # drop the "nothing" column
    return counts.astype(np.float32) / np.float32(p * p)


# -------------------------------------------------------------------------------------------------- llava-1.5


def _llava(
    segment_map: np.ndarray, segment_ids: Sequence[int], image_processor, patch_size: int
) -> tuple[np.ndarray, tuple[int, int]]:
    labels, n_seg = _compact_labels(segment_map, segment_ids)
    h, w = labels.shape[0] - 1, labels.shape[1] - 1
    rows, cols = np.arange(h, dtype=np.int64), np.arange(w, dtype=np.int64)
    ip = image_processor
    do_pad = bool(getattr(ip, "do_pad", False))
    if do_pad and hasattr(ip, "pad_to_square"):
        # LlavaImageProcessor.pad_to_square, before resizing: (max - side) // 2 before, the rest after
        m = max(h, w)
        rows = _pad(rows, (m - h) // 2, m - h - (m - h) // 2)
        cols = _pad(cols, (m - w) // 2, m - w - (m - w) // 2)
    rows, cols = _resize_and_crop(rows, cols, ip)
    pad_size = getattr(ip, "pad_size", None)
    if do_pad and not hasattr(ip, "pad_to_square") and pad_size:
        # the generic backend pad: after crop, bottom/right, to pad_size
        ps = _size_dict(pad_size, True, "pad_size")
        rows, cols = _pad(rows, 0, ps["height"] - len(rows)), _pad(cols, 0, ps["width"] - len(cols))
    pooled = _pool(_gather(labels, [(rows, cols)]), n_seg, patch_size)[0]  # (gh, gw, S)
    return pooled.reshape(pooled.shape[0] * pooled.shape[1], n_seg), (len(rows), len(cols))


def coverage_llava(
    segment_map: np.ndarray,
    segment_ids: Sequence[int],
    image_processor,
    *,
    patch_size: int = 14,
    vision_feature_select_strategy: str = "default",
    num_additional_image_tokens: int = 1,
) -> np.ndarray:
    """(I, S) float32 coverage for llava-1.5: I = 576 for 336 px / 14 px, token k = cell (k // 24, k % 24).

    With the "full" strategy the CLS feature(s) stay in the sequence, first: they get zero rows."""
    cov, _ = _llava(segment_map, segment_ids, image_processor, patch_size)
    return _with_cls_rows(cov, num_additional_image_tokens, vision_feature_select_strategy)


def _with_cls_rows(cov: np.ndarray, num_additional_image_tokens: int, strategy: str) -> np.ndarray:
    # "default" drops one CLS feature; any the model keeps precede the patch features and see no pixels
    extra = num_additional_image_tokens - (strategy == "default")
    if extra <= 0:
        return cov
    return np.concatenate([np.zeros((extra, cov.shape[1]), np.float32), cov])


# ------------------------------------------------------------------------------------------------- LLaVA-NeXT


def _llava_next(
    segment_map: np.ndarray,
    segment_ids: Sequence[int],
    image_processor,
    patch_size: int,
    vision_feature_select_strategy: str,
) -> tuple[np.ndarray, tuple[int, int]]:
    # here only: the modeling module loads the whole LLaVA-NeXT model code, which a LLaVA-1.5 run never needs
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    if vision_feature_select_strategy != "default":
        # pack_image_features views each patch as a (24, 24) token grid; with the CLS kept (577) it cannot
        raise ValueError(f"LLaVA-NeXT supports only the 'default' strategy, got {vision_feature_select_strategy!r}")
    labels, n_seg = _compact_labels(segment_map, segment_ids)
    h, w = labels.shape[0] - 1, labels.shape[1] - 1
    ip = image_processor
    size = _size_dict(ip.size, getattr(ip, "default_to_square", False), "size")
    crop = _size_dict(getattr(ip, "crop_size", None), True, "crop_size")
    # same choices as LlavaNextImageProcessor._preprocess: base size and tile ("patch") size
    base_hw = (size["height"], size["width"]) if size.get("height") else (size["shortest_edge"],) * 2
    tile = crop.get("height") or size.get("height") or size["shortest_edge"]
    pinpoints = [list(p) for p in ip.image_grid_pinpoints]

    rows, cols = np.arange(h, dtype=np.int64), np.arange(w, dtype=np.int64)
    blocks = [(_resize(rows, base_hw[0]), _resize(cols, base_hw[1]))]  # base image, squashed
    best_h, best_w = select_best_resolution((h, w), pinpoints)
    nh, nw = get_patch_output_size(_dummy(h, w), (best_h, best_w), input_data_format=ChannelDimension.FIRST)
    # _get_padding_size: divmod(target - new, 2) → the odd pixel goes after (bottom/right)
    py, px = (best_h - nh) // 2, (best_w - nw) // 2
    canvas_r = _pad(_resize(rows, nh), py, best_h - nh - py)  # (best_h,)
    canvas_c = _pad(_resize(cols, nw), px, best_w - nw - px)  # (best_w,)
    # divide_to_patches: row-major over the canvas
    for i in range(0, best_h, tile):
        blocks += [(canvas_r[i : i + tile], canvas_c[j : j + tile]) for j in range(0, best_w, tile)]
    blocks = [_resize_and_crop(r, c, ip) for r, c in blocks]
    pooled = _pool(_gather(labels, blocks), n_seg, patch_size)  # (1 + tiles, gh, gw, S)
    _, gh, gw, _ = pooled.shape

    # pack_image_features: tiles → one (rows·gh, cols·gw) token grid, unpadded in token units, newline per row
    n_rows, n_cols = get_anyres_image_grid_shape((h, w), pinpoints, tile)
    if n_rows * n_cols != pooled.shape[0] - 1:
        raise ValueError(f"{pooled.shape[0] - 1} tiles but the model expects a {n_rows}×{n_cols} grid")
    grid = pooled[1:].reshape(n_rows, n_cols, gh, gw, n_seg).transpose(4, 0, 2, 1, 3)
    grid = grid.reshape(n_seg, n_rows * gh, n_cols * gw)  # (S, grid rows, grid cols), the model's layout
    grid = unpad_image(grid, (h, w))  # transformers' own slicing; works on numpy (S, rows, cols)
    grid = np.concatenate([grid, np.zeros((*grid.shape[:2], 1), np.float32)], axis=2)  # newline column
    packed = grid.reshape(n_seg, grid.shape[1] * grid.shape[2]).T  # (rows·(cols + 1), S), row by row
    cov = np.concatenate([pooled[0].reshape(gh * gw, n_seg), packed])
    return np.ascontiguousarray(cov, dtype=np.float32), (len(blocks[0][0]), len(blocks[0][1]))


def coverage_llava_next(
    segment_map: np.ndarray,
    segment_ids: Sequence[int],
    image_processor,
    *,
    patch_size: int = 14,
    vision_feature_select_strategy: str = "default",
) -> np.ndarray:
    """(I, S) float32 coverage for LLaVA-NeXT: the 576 base-image rows first, then the unpadded grid row by row,
    each grid row followed by one all-zero ``image_newline`` row."""
    cov, _ = _llava_next(segment_map, segment_ids, image_processor, patch_size, vision_feature_select_strategy)
    return cov


# ------------------------------------------------------------------------------------------ Qwen2.5-VL / Qwen3-VL


def qwen_resized_size(h: int, w: int, image_processor) -> tuple[int, int]:
    """The (height, width) the Qwen2-VL image processor resizes an h×w image to: ``smart_resize`` rounds each side
    on its own to a multiple of patch·merge (500×375 → 504×364 at patch 14), then scales both into
    [min_pixels, max_pixels] (the processor's ``size.shortest_edge`` / ``size.longest_edge``, pixel counts)."""
    # the PIL backend's copy: importing the torchvision one needs torchvision; both are the same function
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    ip = image_processor
    if not getattr(ip, "do_resize", True):
        return h, w
    size = _size_dict(ip.size, False, "size")
    factor = int(ip.patch_size) * int(ip.merge_size)
    return tuple(smart_resize(h, w, factor=factor, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"]))


def _qwen(segment_map: np.ndarray, segment_ids: Sequence[int], image_processor) -> tuple[np.ndarray, tuple[int, int]]:
    labels, n_seg = _compact_labels(segment_map, segment_ids)
    h, w = labels.shape[0] - 1, labels.shape[1] - 1
    nh, nw = qwen_resized_size(h, w, image_processor)
    rows, cols = _resize(np.arange(h, dtype=np.int64), nh), _resize(np.arange(w, dtype=np.int64), nw)
    # one image token = one merge window of merge×merge patches (the merger concatenates 4 consecutive patch rows
    # of pixel_values, which the processor orders window by window): an (m·p)-pixel cell; windows row-major
    cell = int(image_processor.patch_size) * int(image_processor.merge_size)
    pooled = _pool(_gather(labels, [(rows, cols)]), n_seg, cell)[0]  # (nh / cell, nw / cell, S)
    return pooled.reshape(-1, n_seg), (nh, nw)


def coverage_qwen(segment_map: np.ndarray, segment_ids: Sequence[int], image_processor) -> np.ndarray:
    """(I, S) float32 coverage for Qwen2.5-VL (patch 14) and Qwen3-VL (patch 16): I = (H'/p)·(W'/p) / merge² for
    the smart-resized H'×W', token k = merge window (k // (W'/(p·m)), k % (W'/(p·m)))."""
    cov, _ = _qwen(segment_map, segment_ids, image_processor)
    return cov


# ------------------------------------------------------------------------------------------------------ dispatch


def _expected_tokens_by_running(processor, h: int, w: int) -> int:
    # fallback for processors without the token-count helper: ask the processor itself (slower, exact)
    out = processor(text=processor.image_token, images=np.zeros((h, w, 3), np.uint8), return_tensors="np")
    return int((out["input_ids"] == processor.image_token_id).sum())


def coverage(segment_map: np.ndarray, segment_ids: Sequence[int], processor) -> np.ndarray:
    """(I, S) float32 coverage for a LlavaProcessor, LlavaNextProcessor, Qwen2_5_VLProcessor or Qwen3VLProcessor;
    I is checked against the number of image tokens the processor puts in ``input_ids`` for an image of this size."""
    # lazy classes of transformers: loaded on use
    from transformers import LlavaNextProcessor, LlavaProcessor, Qwen2_5_VLProcessor, Qwen3VLProcessor

    h, w = np.shape(segment_map)[:2]
    if isinstance(processor, Qwen2_5_VLProcessor | Qwen3VLProcessor):
        ip = processor.image_processor
        cov = coverage_qwen(segment_map, segment_ids, ip)
        # the processor's own count (replace_image_token: image_grid_thw.prod() // merge²)
        expected = ip.get_number_of_image_patches(h, w, {}) // int(ip.merge_size) ** 2
        return _checked(cov, expected, h, w, processor)
    if not isinstance(processor, LlavaNextProcessor | LlavaProcessor):
        raise TypeError(
            "coverage supports LlavaProcessor, LlavaNextProcessor, Qwen2_5_VLProcessor and Qwen3VLProcessor, got "
            f"{type(processor).__name__}"
        )
    patch = int(processor.patch_size)
    strategy = getattr(processor, "vision_feature_select_strategy", "default")
    n_add = int(getattr(processor, "num_additional_image_tokens", 0) or 0)
    if isinstance(processor, LlavaNextProcessor):
        cov, (ph, pw) = _llava_next(segment_map, segment_ids, processor.image_processor, patch, strategy)
        try:  # the processor's own count, as in LlavaNextProcessor.replace_image_token
            expected = processor._get_number_of_features(h, w, ph, pw) - (strategy == "default")
        except AttributeError:
            expected = _expected_tokens_by_running(processor, h, w)
    else:
        cov, (ph, pw) = _llava(segment_map, segment_ids, processor.image_processor, patch)
        cov = _with_cls_rows(cov, n_add, strategy)
        # LlavaProcessor.replace_image_token's count for a (ph, pw) processed image
        expected = (ph // patch) * (pw // patch) + n_add - (strategy == "default")
    return _checked(cov, expected, h, w, processor)


def _checked(cov: np.ndarray, expected: int, h: int, w: int, processor) -> np.ndarray:
    if cov.shape[0] != expected:
        raise AssertionError(
            f"coverage has {cov.shape[0]} rows but the processor puts {expected} image tokens in input_ids for a "
            f"{h}×{w} image ({type(processor).__name__}); the geometry here no longer matches transformers"
        )
    return cov
