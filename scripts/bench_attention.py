"""What a saliency step costs: plain SDPA LoRA step vs the seed's eager ``output_attentions`` method vs raysal's
capture, side by side in one run. No download: the model is built from a config with random weights.

    python scripts/bench_attention.py --preset cpu-small --json bench_attention_cpu.json
    python scripts/bench_attention.py --preset llava-1.5-7b --json a.json      # GPU (bf16)
    python scripts/bench_attention.py --preset llava-next-7b --json b.json     # GPU (bf16), 640×480 → 2340 image tokens
    python scripts/bench_attention.py --preset cpu-small-qwen --json q.json    # the small LM as Qwen2.5-VL
    python scripts/bench_attention.py --preset qwen2.5-vl-7b --json c.json     # GPU (bf16), 640×480 → 391 image tokens

Each method runs in its own subprocess so that its peak memory is its own: CUDA ``max_memory_allocated`` on a GPU,
the peak-RSS increase over the built model (``ru_maxrss``) on a CPU. Times: forward + backward + optimizer step,
after warm-up, median and 10/90 % quantiles over the repetitions. A method that runs out of memory is recorded as
``oom``. Needs torch/transformers/peft only (no Ray), so it runs on a bare GPU machine.

Qwen2.5-VL presets: the image is the 7B model config's (`configs/model/qwen2.5-vl-7b.yaml`: min_pixels 3136,
max_pixels 1003520) resize of a 640×480 image, 34×46 patches of 14 px → 391 image tokens after the 2×2 merger;
the batch carries the processor's float patch rows and ``image_grid_thw``, the image tokens between
``<|vision_start|>`` and ``<|vision_end|>``, and ``mm_token_type_ids`` (M-RoPE's positions). ``maskembed`` is
LLaVA's (a CLIP tower's patch features at the projector's input): skipped on Qwen, whose merger is inside the tower.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peak_memory import RSSPeak, tensor_peak  # scripts/ is on sys.path: this file runs as a script

from raysal.attention.capture import AttentionCapture, CapturePlan, enable_capture
from raysal.batch import model_inputs
from raysal.criteria.kl import KLCriterion
from raysal.criteria.lm import LMCriterion
from raysal.criteria.maskembed import MaskEmbedCriterion
from raysal.criteria.protocol import AttachesModules
from raysal.criteria.seed_kl import SeedKLCriterion
from raysal.loop.evaluate import evaluate
from raysal.loop.step import plan_step, train_step
from raysal.model.build import QWEN, apply_lora, load_processor, model_info

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM (NVIDIA datasheet); A100: 312e12


@dataclass(frozen=True)
class Preset:
    arch: str
    text: dict
    vision: dict
    batch: int
    caption_tokens: int
    prompt_tokens: int = 24
    gpu_only: bool = False


SMALL_LM = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
            "num_key_value_heads": 8, "vocab_size": 8192}  # fmt: skip
SMALL_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
CLIP_L = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16}
# Qwen2.5-VL: M-RoPE sections (temporal, height, width) summing to head_dim / 2, in the 7B model's 1 : 1.5 : 1.5
QWEN_SMALL_LM = {**SMALL_LM, "num_key_value_heads": 2, "rope_parameters": {"rope_type": "default",
                 "mrope_section": [8, 12, 12], "rope_theta": 1e6}}  # fmt: skip
QWEN_SMALL_VISION = {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                     "fullatt_block_indexes": [1]}  # fmt: skip
# Qwen/Qwen2.5-VL-7B-Instruct's config.json: Qwen2.5-7B (28 layers, 28 query heads on 4 KV heads) and its ViT
# (32 blocks, window attention but in blocks 7/15/23/31; the merger 4 × 1280 → 3584)
QWEN25_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "vocab_size": 152064,
             "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}}  # fmt: skip
QWEN25_VIT = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
              "fullatt_block_indexes": [7, 15, 23, 31]}  # fmt: skip
QWEN_PIXELS = (3136, 1003520)  # configs/model/qwen2.5-vl-7b.yaml: min_pixels, max_pixels
# the Qwen presets' special tokens: small ids, below the random text's (≥ 10)
QWEN_IDS = {"image_token_id": 3, "video_token_id": 4, "vision_start_token_id": 5, "vision_end_token_id": 6}
PRESETS = {
    # fits this project's 2-core CPU machine: 8 layers, hidden 512, the real 576-token image grid
    "cpu-small": Preset("llava", SMALL_LM, SMALL_VISION, batch=2, caption_tokens=96),
    # the same small LM with LLaVA-NeXT's anyres grid (640×480 → 2340 image tokens): where eager maps explode
    "cpu-small-next": Preset("llava_next", {**SMALL_LM, "num_key_value_heads": 2}, SMALL_VISION, batch=1,
                             caption_tokens=96),
    "llava-1.5-7b": Preset("llava", {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                           "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064},
                           CLIP_L, batch=4, caption_tokens=160, gpu_only=True),
    "llava-next-7b": Preset("llava_next", {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32064},
                            CLIP_L, batch=2, caption_tokens=160, gpu_only=True),
    # the cpu-small LM (GQA, 2 KV heads) as Qwen2.5-VL: M-RoPE, a 2-block window-attention ViT with its merger,
    # the 7B config's pixel limits (640×480 → 391 image tokens)
    "cpu-small-qwen": Preset("qwen2_5_vl", QWEN_SMALL_LM, QWEN_SMALL_VISION, batch=2, caption_tokens=96),
    "qwen2.5-vl-7b": Preset("qwen2_5_vl", QWEN25_7B, QWEN25_VIT, batch=4, caption_tokens=160, gpu_only=True),
}  # fmt: skip
MASKEMBED_QWEN = (
    "maskembed is LLaVA's (a CLIP tower's patch features at the projector's input, its "
    "vision_feature_layer); Qwen's merger is inside its vision tower: not run on a Qwen preset"
)


def methods(n_layers: int, arch: str = "llava") -> dict[str, list]:
    """(a) plain, (b) the seed's eager method, (c) raysal capture at several selections (Qwen: no maskembed)."""
    last2 = [n_layers - 2, n_layers - 1]
    out = {
        "plain_sdpa": [LMCriterion()],
        "seed_eager": [LMCriterion(), SeedKLCriterion(weight=0.5, layers="all")],
        "capture_kl_2layers": [LMCriterion(), KLCriterion(weight=0.5, layers=last2, heads="all")],
        "capture_kl_2layers_8heads": [LMCriterion(), KLCriterion(weight=0.5, layers=last2, heads=list(range(8)))],
        "capture_kl_all_layers": [LMCriterion(), KLCriterion(weight=0.5, layers="all", heads="all")],
        # Locality Alignment's MaskEmbed beside the LM loss: vision LoRA student, frozen teacher (one extra no-grad
        # vision forward), a 1-layer decoder
        "maskembed": [LMCriterion(), MaskEmbedCriterion(weight=1.0, mask_ratio=0.5)],
    }
    if arch not in MaskEmbedCriterion.families:
        del out["maskembed"]
    return out


def build(preset: Preset, device: torch.device, dtype: torch.dtype):
    if preset.arch in QWEN:
        return build_qwen(preset, device, dtype)
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        MistralConfig,
    )

    from raysal.model.tiny import PINPOINTS

    vision = CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=768, **preset.vision)
    common = {"max_position_embeddings": 8192, "tie_word_embeddings": False, "pad_token_id": 0}
    if preset.arch == "llava":
        cfg = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**preset.text, **common), image_token_id=3,
                          vision_feature_layer=-2, vision_feature_select_strategy="default")  # fmt: skip
        cls = LlavaForConditionalGeneration
    else:
        text = MistralConfig(**preset.text, sliding_window=None, **common)
        cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=3, vision_feature_layer=-2,
                              vision_feature_select_strategy="default", image_grid_pinpoints=PINPOINTS)  # fmt: skip
        cls = LlavaNextForConditionalGeneration
    with torch.device(device):
        model = cls(cfg).to(dtype)
    model.config._attn_implementation = "sdpa"
    model.set_attn_implementation("sdpa")
    return model


def build_qwen(preset: Preset, device: torch.device, dtype: torch.dtype):
    """Qwen2.5-VL from a config (random weights): the preset's LM and ViT, the merger into the LM's width."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = {**preset.text, "max_position_embeddings": 8192, "tie_word_embeddings": False, "pad_token_id": 0,
            "bos_token_id": 1, "eos_token_id": 2, "rms_norm_eps": 1e-6}  # fmt: skip
    vision = {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
              "out_hidden_size": preset.text["hidden_size"], **preset.vision}  # fmt: skip
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **QWEN_IDS)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(cfg).to(dtype)
    model.config._attn_implementation = "sdpa"
    model.set_attn_implementation("sdpa")
    return model


@functools.cache
def _image(arch: str) -> tuple[dict, int]:
    """The image's model inputs as the arch's processor makes them for a 640×480 image, and its image tokens."""
    from transformers import AutoProcessor

    from raysal.model.tiny import write_tiny

    img = np.zeros((480, 640, 3), np.uint8)
    with tempfile.TemporaryDirectory() as d:
        path = write_tiny(Path(d) / "t", arch)
        if arch in QWEN:  # the tiny processor with the 7B config's pixel limits: the 7B geometry
            ip = load_processor(str(path), *QWEN_PIXELS).image_processor
            enc = ip(images=img, return_tensors="pt")  # pixel_values (patches, 3·2·14·14), image_grid_thw (1, 3)
            return dict(enc), int(enc["image_grid_thw"].prod()) // ip.merge_size**2
        proc = AutoProcessor.from_pretrained(path)
    enc = proc(text="<image>", images=img, return_tensors="pt")
    return dict(enc), int((enc["input_ids"] == proc.tokenizer.convert_tokens_to_ids("<image>")).sum())


def make_batch(preset: Preset, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """A batch with the real image-token layout (from the real image processor geometry) and random text. Qwen: the
    image tokens between <|vision_start|> and <|vision_end|>, the processor's patch rows once per sample."""
    enc, n_image = _image(preset.arch)  # cached: tensors only read below (copied per batch)
    qwen = preset.arch in QWEN
    g = torch.Generator().manual_seed(seed)
    B, P, T = preset.batch, preset.prompt_tokens, preset.caption_tokens
    vocab = preset.text["vocab_size"]
    text = torch.randint(10, vocab, (B, P + T), generator=g)
    image = torch.full((B, n_image), QWEN_IDS["image_token_id"] if qwen else 3)
    if qwen:
        start, end = (torch.full((B, 1), QWEN_IDS[k]) for k in ("vision_start_token_id", "vision_end_token_id"))
        ids = torch.cat([text[:, :P], start, image, end, text[:, P:]], 1)  # (B, L)
        first = P + 1  # the first image token
    else:
        ids = torch.cat([text[:, :P], image, text[:, P:]], 1)  # (B, L)
        first = P
    L = ids.shape[1]
    c0 = L - T  # the first caption token
    labels = torch.full_like(ids, -100)
    labels[:, c0:] = ids[:, c0:]
    S = 6
    segs = torch.full((B, L, 1), -1, dtype=torch.int32)
    named = torch.rand(B, T, generator=g) < 0.6  # ~60 % of caption tokens name a segment
    segs[:, c0:, 0] = torch.where(named, torch.randint(1, S + 1, (B, T), generator=g), -1).int()
    cov = torch.rand(B, n_image, S, generator=g)
    cov = cov / cov.sum(-1, keepdim=True)  # (B, I, S)
    rows = [torch.nonzero(r).squeeze(1) for r in (segs >= 0).any(-1) & (labels != -100)]  # as encode_sample finds
    grounded = torch.full((B, max(len(r) for r in rows)), -1, dtype=torch.long)  # (B, T), −1 pad
    for i, r in enumerate(rows):
        grounded[i, : len(r)] = r
    batch = {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "token_segments": segs,
        "image_pos": torch.arange(first, first + n_image).expand(B, n_image).clone(), "grounded_pos": grounded,
        "coverage": cov, "segment_ids": torch.arange(1, S + 1).expand(B, S).int(),
    }  # fmt: skip
    if qwen:  # every sample's patch rows, concatenated (as `raysal.batch.patchify_batch`), and its grid
        batch["pixel_values"] = enc["pixel_values"].repeat(B, 1).to(dtype)
        batch["image_grid_thw"] = enc["image_grid_thw"].expand(B, 3).clone()
        batch["mm_token_type_ids"] = (ids == QWEN_IDS["image_token_id"]).long()  # 1 at image tokens
    else:
        batch["pixel_values"] = enc["pixel_values"].expand(B, *enc["pixel_values"].shape[1:]).clone().to(dtype)
    if "image_sizes" in enc:
        batch["image_sizes"] = enc["image_sizes"].expand(B, 2).clone()
    return {k: v.to(device) for k, v in batch.items()}, n_image


def _steps(model, batch, criteria, plan, opt, autocast, device, warmup: int, reps: int, times: list) -> None:
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        train_step(model, batch, criteria, plan, step=i, autocast=autocast)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)


# the protocol = all layers x all heads, no grad; pope_image: POPE's questions about one image (`raysal.loop.pope_eval`)
EVAL_METHODS = ("evaluation", "evaluation_stored_maps", "pope_image", "pope_image_full")
POPE_QUESTIONS, POPE_TEXT_TOKENS = 12, 14  # one image's distinct questions at most (3 positives + 9 negatives)
POPE_TEMPLATE_TOKENS = 3  # "USER:" before the image: the shared prefix is these and the image's tokens


class _StoredMaps(AttentionCapture):
    """Evaluation as it was before the reduction: every protocol layer's (B, h, T, I) kept, then stacked and
    averaged. Swapped into `evaluate` for an A/B of the same code."""

    def __init__(self, *args, reduce: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)

    def mean(self) -> torch.Tensor:
        return self.stacked().float().mean((1, 2))  # (B, T, I)


def _evals(model, batch, info, method, autocast, device, warmup: int, reps: int, times: list) -> None:
    protocol = CapturePlan(tuple(range(info.n_layers)), tuple(range(info.n_heads)), 0)
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        if method.startswith("pope_image"):  # shared: as `answer_logits`; full: a forward per question (before)
            with torch.no_grad(), autocast or contextlib.nullcontext():
                if method == "pope_image":
                    _pope_shared(model, model_inputs(batch))
                else:
                    model(**model_inputs(batch), use_cache=False, logits_to_keep=1)
        elif method == "evaluation":
            evaluate(model, [batch], protocol, device=device, autocast=autocast)
        else:
            with mock.patch("raysal.loop.evaluate.AttentionCapture", _StoredMaps):
                evaluate(model, [batch], protocol, device=device, autocast=autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)


def _pope_shared(model, inputs: dict) -> None:
    """`raysal.loop.pope_eval.answer_logits` on the bench's layout: the template's and the image's tokens once (one
    row, cached), then each question's own POPE_TEXT_TOKENS on the cache, one at a time, the cache cropped back."""
    ids, mask, cut = inputs["input_ids"], inputs["attention_mask"], inputs["input_ids"].shape[1] - POPE_TEXT_TOKENS
    images = {k: inputs[k][:1] for k in ("pixel_values", "image_sizes", "image_grid_thw") if k in inputs}
    qwen = "image_grid_thw" in inputs
    if qwen:  # as answer_logits: the first image's patch rows, the prefix's token types; rows without a mask
        images["pixel_values"] = inputs["pixel_values"][: int(inputs["image_grid_thw"][0].prod())]
        images["mm_token_type_ids"] = inputs["mm_token_type_ids"][:1, :cut]
    cache = model(input_ids=ids[:1, :cut], attention_mask=mask[:1, :cut], use_cache=True, logits_to_keep=1,
                  **images).cache  # fmt: skip
    for i in range(len(ids)):
        row = {"input_ids": ids[i : i + 1, cut:]} | ({} if qwen else {"attention_mask": mask[i : i + 1]})
        model(**row, cache=cache, use_cache=True, logits_to_keep=1)
        cache.crop(-POPE_TEXT_TOKENS)


def profile_step(model, batch, criteria, plan, autocast) -> str:
    """The allocations of one step, by operator (torch.profiler, memory on): where a method's memory goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(model, batch, criteria, plan, step=0, autocast=autocast)
    return prof.key_averages().table(sort_by="self_cpu_memory_usage", row_limit=12, max_name_column_width=40)


def run_one(
    preset_name: str, method: str, reps: int, warmup: int, device_name: str, checkpointing: bool, profile: bool = False
) -> dict:
    preset = PRESETS[preset_name]
    if method == "maskembed" and preset.arch not in MaskEmbedCriterion.families:
        raise ValueError(f"{preset_name}: {MASKEMBED_QWEN}")
    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    base = build(preset, device, dtype)
    if checkpointing:  # as the 7B configs train: the layer inputs are kept, the rest is recomputed in backward
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(base, rank=16, alpha=32, targets="qv", vision=method == "maskembed")
    criteria = methods(preset.text["num_hidden_layers"], preset.arch).get(method, [LMCriterion()])  # eval: none
    for c in criteria:  # maskembed's decoder
        if isinstance(c, AttachesModules):
            c.attach(model)
    info = model_info(model)
    plan = plan_step(criteria, info)
    if method == "seed_eager":
        model.set_attn_implementation({"text_config": "eager"})
    else:
        enable_capture(model)
    if method.startswith("pope_image"):  # an image's questions: the template, the image, then the question's tokens
        preset = replace(preset, batch=POPE_QUESTIONS, prompt_tokens=POPE_TEMPLATE_TOKENS,
                         caption_tokens=POPE_TEXT_TOKENS)  # fmt: skip
    batch, n_image = make_batch(preset, device, dtype)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    times = []
    rss = RSSPeak()
    try:
        with rss:
            if method in EVAL_METHODS:
                _evals(model, batch, info, method, autocast, device, warmup, reps, times)
            else:
                _steps(model, batch, criteria, plan, opt, autocast, device, warmup, reps, times)
    except torch.OutOfMemoryError:
        return {"status": "oom"}
    table = profile_step(model, batch, criteria, plan, autocast) if profile else None
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated() - base_mem, "cuda_max_allocated_over_model"
        peak_total, tensors = torch.cuda.max_memory_allocated(), peak
    else:
        peak, kind, peak_total = rss.peak - rss.base, "rss_peak_increase_over_model_sampled", rss.peak
        # one more step (or evaluation) with the allocations recorded: the CPU counterpart of the CUDA figure
        if method in EVAL_METHODS:
            tensors = tensor_peak(lambda: _evals(model, batch, info, method, autocast, device, 0, 1, []))
        else:
            tensors = tensor_peak(lambda: _steps(model, batch, criteria, plan, opt, autocast, device, 0, 1, []))
    core = model.base_model.model.model
    n_params = sum(p.numel() for n, p in core.language_model.named_parameters() if "embed" not in n and "lora" not in n)
    vision = core.visual if preset.arch in QWEN else core.vision_tower  # Qwen: the ViT with its merger
    n_vision = sum(p.numel() for n, p in vision.named_parameters() if "lora" not in n)
    q = np.quantile(times, [0.1, 0.9]).tolist()
    return {
        "status": "ok", "median_s": statistics.median(times), "p10_s": q[0], "p90_s": q[1], "reps": reps,
        "peak_mem_bytes": peak, "peak_total_bytes": peak_total, "mem_kind": kind, "peak_tensor_bytes": tensors,
        "tokens": int(batch["input_ids"].numel()), "batch": int(batch["input_ids"].shape[0]), "image_tokens": n_image,
        "grounded_tokens": int(batch["grounded_pos"].shape[1]), "lm_params": n_params,
        "vision_tokens": int(batch["image_grid_thw"][0].prod()) if "image_grid_thw" in batch else 0,
        "vision_params": n_vision, **({"profile": table} if table else {}),
    }  # fmt: skip


def ratio(a: dict, b: dict, key: str) -> float | None:
    if a.get("status") != "ok" or b.get("status") != "ok" or not b[key]:
        return None
    return a[key] / b[key]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                    help="disable gradient checkpointing (on by default, as in the 7B model configs)")  # fmt: skip
    ap.add_argument("--profile", action="store_true", help="also record each method's allocations by operator")
    ap.add_argument("--method", help=argparse.SUPPRESS)  # internal: run one method in this process
    ap.add_argument("--batch", type=int, help="the preset's micro-batch replaced (with --method: one method)")
    args = ap.parse_args()
    preset = PRESETS[args.preset] = replace(PRESETS[args.preset], batch=args.batch or PRESETS[args.preset].batch)
    if args.method:
        r = run_one(args.preset, args.method, args.reps, args.warmup, args.device, args.checkpointing, args.profile)
        print(json.dumps(r))
        return 0
    if preset.gpu_only and not args.device.startswith("cuda"):
        ap.error(f"preset {args.preset} has 7B shapes: run it on a GPU (--device cuda)")
    results = {}
    if preset.arch not in MaskEmbedCriterion.families:
        results["maskembed"] = {"status": "skipped", "reason": MASKEMBED_QWEN}
        print(f"{'maskembed':<28} skipped ({MASKEMBED_QWEN})", flush=True)
    for name in [*methods(preset.text["num_hidden_layers"], preset.arch), *EVAL_METHODS]:
        cmd = [sys.executable, __file__, "--preset", args.preset, "--method", name, "--reps", str(args.reps),
               "--warmup", str(args.warmup), "--device", args.device]  # fmt: skip
        if not args.checkpointing:
            cmd.append("--no-checkpointing")
        if args.profile:
            cmd.append("--profile")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            oom = "out of memory" in proc.stderr.lower() or "outofmemory" in proc.stderr.lower()
            results[name] = {"status": "oom" if oom else "error", "stderr": proc.stderr[-1500:]}
        else:
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[name]
        line = f"{name:<28} {r['status']:<5}"
        if r["status"] == "ok":
            mib = {k: r[k] / 2**20 for k in ("peak_mem_bytes", "peak_tensor_bytes")}
            line += (
                f" {r['median_s']:.3f}s  {mib['peak_mem_bytes']:9.1f} MiB  tensors {mib['peak_tensor_bytes']:9.1f} MiB"
            )
        print(line, flush=True)
    plain, seed, cap = results["plain_sdpa"], results["seed_eager"], results["capture_kl_2layers"]
    ratios = {
        "capture_kl_2layers_over_plain_time": ratio(cap, plain, "median_s"),
        "capture_kl_2layers_over_plain_peak_mem": ratio(cap, plain, "peak_mem_bytes"),
        "seed_eager_over_capture_kl_2layers_peak_mem": ratio(seed, cap, "peak_mem_bytes"),
        "seed_eager_over_capture_kl_2layers_time": ratio(seed, cap, "median_s"),
        "capture_all_layers_over_plain_time": ratio(results["capture_kl_all_layers"], plain, "median_s"),
        "maskembed_over_plain_time": ratio(results.get("maskembed", {}), plain, "median_s"),
        "maskembed_over_plain_peak_mem": ratio(results.get("maskembed", {}), plain, "peak_mem_bytes"),
        # evaluation (all layers x all heads, reduced on the fly) against a training step at the same batch
        "evaluation_over_capture_kl_2layers_peak_mem": ratio(results["evaluation"], cap, "peak_mem_bytes"),
        "evaluation_over_plain_peak_mem": ratio(results["evaluation"], plain, "peak_mem_bytes"),
        "evaluation_stored_maps_over_evaluation_peak_mem": ratio(
            results["evaluation_stored_maps"], results["evaluation"], "peak_mem_bytes"
        ),
        # POPE: one image's 12 questions in one batch, against a training step (time) and an evaluation (memory)
        "pope_image_over_plain_time": ratio(results["pope_image"], plain, "median_s"),
        "pope_image_full_over_plain_time": ratio(results["pope_image_full"], plain, "median_s"),  # before
        "pope_image_over_evaluation_peak_mem": ratio(results["pope_image"], results["evaluation"], "peak_mem_bytes"),
    }
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    out = {
        "preset": args.preset,
        "device": device,
        "date": date.today().isoformat(),
        "dtype": "bfloat16" if args.device.startswith("cuda") else "float32",
        "batch": preset.batch,
        "gradient_checkpointing": args.checkpointing,
        "methods": results,
        "ratios": ratios,
    }
    if args.device.startswith("cuda") and plain.get("status") == "ok":
        # frozen base + LoRA: forward 2·N·tokens, backward 2·N·tokens (activation grads, no weight grads)
        n = plain["lm_params"] + plain["vision_params"]
        out["mfu_plain"] = 4 * n * plain["tokens"] / plain["median_s"] / H100_BF16_PEAK
        out["mfu_note"] = "4·N·tokens per step, N = LM (without embeddings) + vision tower params, peak 989 TFLOP/s"
    print("\n| ratio | value |\n|---|---|")
    for k, v in ratios.items():
        print(f"| {k} | {'n/a' if v is None else f'{v:.3f}'} |")
    if "mfu_plain" in out:
        print(f"| MFU of the plain LoRA step | {out['mfu_plain']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
