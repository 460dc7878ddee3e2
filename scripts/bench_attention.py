"""What a saliency step costs: plain SDPA LoRA step vs the seed's eager ``output_attentions`` method vs raysal's
capture, side by side in one run. No download: the model is built from a config with random weights.

    python scripts/bench_attention.py --preset cpu-small --json bench_attention_cpu.json
    python scripts/bench_attention.py --preset llava-1.5-7b --json a.json      # GPU (bf16)
    python scripts/bench_attention.py --preset llava-next-7b --json b.json     # GPU (bf16), 640×480 → 2340 image tokens

Each method runs in its own subprocess so that its peak memory is its own: CUDA ``max_memory_allocated`` on a GPU,
the peak-RSS increase over the built model (``ru_maxrss``) on a CPU. Times: forward + backward + optimizer step,
after warm-up, median and 10/90 % quantiles over the repetitions. A method that runs out of memory is recorded as
``oom``. Needs torch/transformers/peft only (no Ray), so it runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import contextlib
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
from raysal.model.build import apply_lora, model_info

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
}  # fmt: skip


def methods(n_layers: int) -> dict[str, list]:
    """(a) plain, (b) the seed's eager method, (c) raysal capture at several selections."""
    last2 = [n_layers - 2, n_layers - 1]
    return {
        "plain_sdpa": [LMCriterion()],
        "seed_eager": [LMCriterion(), SeedKLCriterion(weight=0.5, layers="all")],
        "capture_kl_2layers": [LMCriterion(), KLCriterion(weight=0.5, layers=last2, heads="all")],
        "capture_kl_2layers_8heads": [LMCriterion(), KLCriterion(weight=0.5, layers=last2, heads=list(range(8)))],
        "capture_kl_all_layers": [LMCriterion(), KLCriterion(weight=0.5, layers="all", heads="all")],
        # Locality Alignment's MaskEmbed beside the LM loss: vision LoRA student, frozen teacher (one extra no-grad
        # vision forward), a 1-layer decoder
        "maskembed": [LMCriterion(), MaskEmbedCriterion(weight=1.0, mask_ratio=0.5)],
    }


def build(preset: Preset, device: torch.device, dtype: torch.dtype):
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


def make_batch(preset: Preset, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """A batch with the real image-token layout (from the real image processor geometry) and random text."""
    from transformers import AutoProcessor

    from raysal.model.tiny import write_tiny

    with tempfile.TemporaryDirectory() as d:
        proc = AutoProcessor.from_pretrained(write_tiny(Path(d) / "t", preset.arch))
    img = np.zeros((480, 640, 3), np.uint8)
    enc = proc(text="<image>", images=img, return_tensors="pt")
    n_image = int((enc["input_ids"] == proc.tokenizer.convert_tokens_to_ids("<image>")).sum())
    g = torch.Generator().manual_seed(seed)
    B, P, T = preset.batch, preset.prompt_tokens, preset.caption_tokens
    vocab = preset.text["vocab_size"]
    text = torch.randint(10, vocab, (B, P + T), generator=g)
    ids = torch.cat([text[:, :P], torch.full((B, n_image), 3), text[:, P:]], 1)  # (B, L)
    L = ids.shape[1]
    labels = torch.full_like(ids, -100)
    labels[:, P + n_image :] = ids[:, P + n_image :]
    S = 6
    segs = torch.full((B, L, 1), -1, dtype=torch.int32)
    named = torch.rand(B, T, generator=g) < 0.6  # ~60 % of caption tokens name a segment
    segs[:, P + n_image :, 0] = torch.where(named, torch.randint(1, S + 1, (B, T), generator=g), -1).int()
    cov = torch.rand(B, n_image, S, generator=g)
    cov = cov / cov.sum(-1, keepdim=True)  # (B, I, S)
    rows = [torch.nonzero(r).squeeze(1) for r in (segs >= 0).any(-1) & (labels != -100)]  # as encode_sample finds
    grounded = torch.full((B, max(len(r) for r in rows)), -1, dtype=torch.long)  # (B, T), −1 pad
    for i, r in enumerate(rows):
        grounded[i, : len(r)] = r
    batch = {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "token_segments": segs,
        "image_pos": torch.arange(P, P + n_image).expand(B, n_image).clone(), "grounded_pos": grounded,
        "pixel_values": enc["pixel_values"].expand(B, *enc["pixel_values"].shape[1:]).clone().to(dtype),
        "coverage": cov, "segment_ids": torch.arange(1, S + 1).expand(B, S).int(),
    }  # fmt: skip
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
    images = {k: inputs[k][:1] for k in ("pixel_values", "image_sizes") if k in inputs}
    cache = model(input_ids=ids[:1, :cut], attention_mask=mask[:1, :cut], use_cache=True, logits_to_keep=1,
                  **images).cache  # fmt: skip
    for i in range(len(ids)):
        row = {"input_ids": ids[i : i + 1, cut:], "attention_mask": mask[i : i + 1]}
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
    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    base = build(preset, device, dtype)
    if checkpointing:  # as the 7B configs train: the layer inputs are kept, the rest is recomputed in backward
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(base, rank=16, alpha=32, targets="qv", vision=method == "maskembed")
    criteria = methods(preset.text["num_hidden_layers"]).get(method, [LMCriterion()])  # evaluations: no criteria
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
    lm = model.base_model.model.model.language_model
    n_params = sum(p.numel() for n, p in lm.named_parameters() if "embed" not in n and "lora" not in n)
    n_vision = sum(p.numel() for p in model.base_model.model.model.vision_tower.parameters())
    q = np.quantile(times, [0.1, 0.9]).tolist()
    return {
        "status": "ok", "median_s": statistics.median(times), "p10_s": q[0], "p90_s": q[1], "reps": reps,
        "peak_mem_bytes": peak, "peak_total_bytes": peak_total, "mem_kind": kind, "peak_tensor_bytes": tensors,
        "tokens": int(batch["input_ids"].numel()), "batch": int(batch["input_ids"].shape[0]), "image_tokens": n_image,
        "grounded_tokens": int(batch["grounded_pos"].shape[1]), "lm_params": n_params,
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
    for name in [*methods(preset.text["num_hidden_layers"]), *EVAL_METHODS]:
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
        "maskembed_over_plain_time": ratio(results["maskembed"], plain, "median_s"),
        "maskembed_over_plain_peak_mem": ratio(results["maskembed"], plain, "peak_mem_bytes"),
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
