"""Peak memory of a raysal step, predicted from shapes alone: what a 7B trial needs before a GPU has measured it.

    python scripts/memory_model.py                                   # the 7B tables (LoRA; full finetuning, FSDP)
    python scripts/memory_model.py --validate --json docs/memory_model.json   # against the CPU presets
    python scripts/memory_model.py --validate --presets cpu-small-qwen          # one CPU preset (~2 min)
    python scripts/memory_model.py --compare docs/bench_attention_next_7b_gpu.json   # against a GPU run of a preset

Full finetuning sharded with FSDP2 over N GPUs is `predict_full` (its docstring; validated with
`scripts/bench_full_ft.py`). The LoRA prediction is the peak of live tensors over the model's weights and optimizer
state (what CUDA's ``max_memory_allocated`` counts), for a LoRA step with gradient checkpointing (non-reentrant,
every decoder layer), as `scripts/bench_attention.py` runs it. A step peaks in one of two phases:

- **loss**: every layer's checkpoint (its input, (B, L, d)) plus the logits and the fp32 loss around them: the
  logits (model dtype), the fp32 input of the log-softmax, its output, and the gradient of each (12 bytes per
  logit beyond the logits themselves);
- **recompute**: during backward, the checkpoints, the logits `out` still holds, and one decoder layer recomputed
  with its gradients: (11.2·d + 2·d_kv + 6·f) values per token in the model dtype, plus the fp32 copies RMSNorm
  makes of a bf16 input (2·d at 4 bytes).

Methods add: the capture keeps its maps (B, ℓ, h, T, I) and their gradient (2 copies), and — gradient
checkpointing — backward reaches every captured layer's attention at once, so ℓ − 1 captured layers are recomputed
up to their attention before their turn (softmax rows (B, h, T, L) and their gradient, the image columns, the fp32
key, the layer's q/k/v and LoRA dropout: ≈ 4·d per token). The seed's eager method keeps every layer's
(B, H, L, L) map and its gradient — from the loss phase on: the criterion's backward makes every map's gradient at
once, before the first layer's — plus, recomputing, the layer's scores and the causal mask. Evaluation holds no
checkpoint and no KV cache: the logits and the loss (the fp32 copy on bf16, the contiguous copy cross_entropy
takes, the log-softmax: 8 or 12 bytes per logit beyond the logits) or one layer's forward, whichever is larger.
A POPE image (`pope_image`: its questions in one batch, logits at the answer row) is one layer's forward.

Qwen2.5-VL (``family="qwen"``): its ViT runs on P = 4·I patches per image (14 px, merged 2×2 into the image
tokens), and with gradient checkpointing the frozen tower still leaves tensors alive through the whole training
step: one (P, d_v) per vision block (the checkpointed blocks' inputs) and three more (the patch embedding, its
window-ordered copy, the merger's norm), the tower's rotary tables (2·P·d_v/h_v) and the merged image features
(I·d), per sample; read off the profiler's trace on `cpu-small-qwen` by varying the tower's depth (+1 (P, d_v) per
block), width and heads. ``output_attentions=True`` (the seed's method) also reaches the tower, whose attention
returns no weights: transformers records each block's attention output instead, one more (P, d_v) per block.

The per-layer coefficients (11.2·d, 2·d_kv, 6·f per token; the capture's 4·d) were read off the profiler's
live-tensor trace of the small fp32 model (vary one dimension, difference the exact peaks); `--validate` checks
the whole model on the CPU presets, whose shapes (image grid, GQA, batch) differ from those ablations.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path

GIB = 2**30
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM (NVIDIA datasheet)
ASSUMED_MFU = 0.4  # for the full-finetuning time column, until a GPU has measured it
CLIP_L_336 = 303.5e6  # vision tower parameters (CLIP ViT-L/14-336)
# Qwen2.5-VL-7B's ViT (32 blocks, width 1280) and its merger (2×2 patches → 3584), counted on the built model
QWEN25_VIT, QWEN25_MERGER = 631_975_680, 44_574_464
SEVEN_B = ("llava-1.5-7b", "llava-next-7b", "qwen2.5-vl-7b")
METHODS = ("plain_sdpa", "capture_kl_2layers", "seed_eager", "evaluation", "pope_image")
POPE_QUESTIONS, POPE_TEXT_TOKENS = 12, 14  # as `scripts/bench_attention.py`: one image's questions, one batch


@dataclass(frozen=True)
class Shapes:
    batch: int  # B
    tokens: int  # L per sample: prompt + image tokens + caption
    image_tokens: int  # I
    grounded: int  # T: grounded caption tokens per sample (padded in a batch)
    hidden: int  # d
    ffn: int  # f
    layers: int  # n
    heads: int  # H query heads
    kv_heads: int
    vocab: int  # V
    dtype_bytes: int = 2  # activations: 2 for bf16 (a GPU run), 4 for fp32 (the CPU presets)
    captured_layers: int = 2  # ℓ of the capture method
    params: float = 0.0  # weights, for the "fits" column (bytes = params × dtype_bytes)
    family: str = "llava"  # "qwen": Qwen2.5-VL, whose vision tower's tensors are modelled (below)
    vision_tokens: int = 0  # P: the vision tower's tokens per sample (Qwen: patches before the 2×2 merger)
    vision_hidden: int = 0  # d_v
    vision_layers: int = 0  # ℓ_v: vision blocks
    vision_heads: int = 1  # h_v


def predict(s: Shapes, method: str) -> dict[str, float]:
    """{"peak": bytes, "phase": name, <phase>: bytes...} for one step (or one evaluation batch) of ``method``."""
    b, E = s.dtype_bytes, s.batch * s.tokens  # E: tokens in the batch
    d, f, n, V = s.hidden, s.ffn, s.layers, s.vocab
    d_kv = s.hidden // s.heads * s.kv_heads
    logits = E * V * (b + 12)
    if method == "evaluation":
        # all layers × all heads, reduced on the fly: (B, T, I) fp32, nothing per layer is kept
        # the loss without gradients: logits, their fp32 copy (bf16 only), the contiguous copy cross_entropy takes
        # and the log-softmax; no KV cache (evaluate passes use_cache=False)
        loss = E * V * (b + 8 + (4 if b < 4 else 0))
        layer = E * (8 * d + 3 * f) * b + 2 * s.batch * s.image_tokens * d * b
        reduced = s.batch * s.grounded * s.image_tokens * 4
        phases = {"loss": loss + 2 * E * d * b + reduced, "layer": layer + reduced}
        return _peak(phases)
    if method == "pope_image":
        # one image's POPE questions (`raysal.loop.pope_eval.answer_logits`): the shared prefix — the template and
        # the image, L tokens of one row — runs once into a KV cache (K and V of every layer, L·d_kv each), then
        # each question's few tokens on it, one at a time; no grad, no capture, logits at the answer row only.
        # The peak is the prefix's forward: one decoder layer's MLP (3·f + 4.3·d per token) or attention (10.1·d)
        # over L tokens beside the image features and merged embeddings (2·I·d), the cache filled so far. The
        # coefficients were read off the profiler's peak on cpu-small (`--validate` checks both CPU presets).
        L = s.tokens
        image = 2 * s.image_tokens * d * b
        cache = 2 * n * L * d_kv * b
        phases = {"mlp": L * (3 * f + 4.3 * d) * b + image + cache, "attention": L * 10.1 * d * b + image + cache,
                  "logits": V * (b + 8) + cache}  # fmt: skip
        return _peak(phases)
    checkpoints = n * E * d * b
    layer = E * (11.2 * d + 2 * d_kv + 6 * f) * b + (2 * E * d * 4 if b < 4 else 0)
    vision = vision_kept(s)  # Qwen: what the frozen vision tower leaves alive through the step (0 for LLaVA)
    phases = {"loss": logits + checkpoints + 4 * E * d * b + vision,
              "recompute": checkpoints + E * V * b + layer + vision}  # fmt: skip
    if method.startswith("capture"):
        ell, h = s.captured_layers, s.heads
        maps = s.batch * h * s.grounded * s.image_tokens * 4  # (B, h, T, I) fp32, one layer
        rows = s.batch * h * s.grounded * s.tokens * 4  # (B, h, T, L) fp32 softmax rows, one layer
        kept = 2 * ell * maps
        per_layer = 2 * rows + maps + E * d_kv * 4  # a captured layer's attention side, recomputed
        early = (ell - 1) * (per_layer + 4 * E * d * b)  # recomputed before their turn (see the docstring)
        phases = {"loss": phases["loss"] + kept, "recompute": phases["recompute"] + kept + per_layer + early}
    elif method == "seed_eager":
        att = s.batch * s.heads * s.tokens**2 * b  # (B, H, L, L), one layer
        scores = s.batch * s.heads * s.tokens**2 * 4 if b < 4 else att  # eager's fp32 softmax of the layer recomputed
        mask = s.batch * s.tokens**2 * b  # the causal mask eager attention materialises
        # Qwen: output_attentions reaches the vision tower, whose blocks' attention outputs transformers records
        records = s.vision_layers * s.batch * s.vision_tokens * s.vision_hidden * b if s.family == "qwen" else 0
        phases = {"loss": phases["loss"] + 2 * n * att + records,
                  "recompute": phases["recompute"] + 2 * n * att + scores + mask + records}  # fmt: skip
    elif method != "plain_sdpa":
        raise ValueError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    return _peak(phases)


def vision_kept(s: Shapes) -> float:
    """Bytes the frozen Qwen vision tower leaves alive through a checkpointed training step (the module
    docstring): (ℓ_v + 3) tensors of (P, d_v), the rotary tables and the merged image features, per sample."""
    if s.family != "qwen":
        return 0.0
    P, dv = s.batch * s.vision_tokens, s.vision_hidden
    return ((s.vision_layers + 3) * P * dv + 2 * P * (dv // s.vision_heads) + s.batch * s.image_tokens * s.hidden) * (
        s.dtype_bytes
    )


def predict_full(
    s: Shapes, world: int, method: str = "capture_kl_2layers", *, vision: float = CLIP_L_336, projector: float = 0.0,
    mixed: bool = True,
) -> dict[str, float]:  # fmt: skip
    """Full finetuning sharded with FSDP2 over ``world`` = N ranks (`raysal.model.shard`), per rank, in bytes.

    ``resident`` (held between steps): the fp32 master weights (the frozen vision tower too) and AdamW's two fp32
    moments, split N ways: (4 + 8) · trainable / N + 4 · frozen / N. ``step`` (over the resident: what
    `scripts/bench_full_ft.py` measures) peaks in one of four phases; every phase holds the root unit gathered
    (embeddings, lm_head, projector, vision tower; bf16 with mixed precision), whose unsharded gradients also live
    from the start of backward to its end (the root is reduce-scattered last):

    - **loss**: the LoRA step's loss phase (`predict`: checkpoints, logits and the fp32 loss around them);
    - **backward**: the LoRA step's recompute phase (one layer recomputed, the capture's maps) + two decoder
      layers gathered (the one running, the one prefetched) + one layer's unsharded gradient (bf16 and the fp32
      copy that is reduce-scattered) + the sharded gradients of half the layers (where backward peaks depends on
      the method: the captured layers are recomputed early);
    - **end**: every sharded fp32 gradient (4 · trainable / N) before the optimizer step;
    - **optimizer** (GPU): those gradients + the one temporary of the same size that foreach AdamW makes (its
      √v); CPU AdamW steps parameter by parameter.
    """
    d, f, n, V = s.hidden, s.ffn, s.layers, s.vocab
    d_kv = d // s.heads * s.kv_heads
    layer = 2 * d * d + 2 * d * d_kv + 3 * d * f + 2 * d  # one decoder layer's parameters
    trainable = lm_params(d, f, n, s.heads, s.kv_heads, V) + projector
    root_trainable = 2 * V * d + d + projector
    pb = 2 if mixed else 4  # bytes of a gathered parameter or an unsharded gradient
    resident = (12 * trainable + 4 * vision) / world
    grads = 4 * trainable / world
    root = (root_trainable + vision) * pb + root_trainable * pb  # gathered weights + their unsharded gradients
    layer_grads = layer * (pb + 4 if mixed else 4)
    lora = predict(s, method)
    phases = {
        "loss": root + lora["loss"],
        "backward": root + lora["recompute"] + 2 * layer * pb + layer_grads + 4 * layer * (n / 2) / world,
        "end": root + grads,
        "optimizer": 2 * grads if mixed else grads,
    }
    phase = max(phases, key=phases.__getitem__)
    return {"peak": resident + phases[phase], "resident": resident, "step": phases[phase], "phase": phase,
            **{f"step_{k}": v for k, v in phases.items()}}  # fmt: skip


def table_full_ft(gpu_gib: float = 80.0) -> list[dict]:
    """7B full finetuning with the capture (2 layers) on 4 and 8 GPUs, batch 1/2/8 per GPU; time from FLOPs."""
    rows = []
    for name in SEVEN_B:
        for world in (4, 8):
            for batch in (1, 2, 8):
                s = seven_b(name, batch)
                if s.family == "qwen":  # the merger trains with the language model (`raysal.model.build.PROJECTORS`)
                    p = predict_full(s, world, vision=QWEN25_VIT, projector=QWEN25_MERGER)
                else:
                    p = predict_full(s, world, projector=1024 * s.hidden + s.hidden * s.hidden)
                tokens = batch * s.tokens
                # forward 2·P·tokens, backward 4·P·tokens (weights and activations), recompute 2·P·tokens;
                # linear layers only (attention adds ~10 % at NeXT's 2.5 k tokens)
                flops = 8 * s.params * tokens
                sec = flops / (H100_BF16_PEAK * ASSUMED_MFU)
                rows.append({"model": name, "gpus": world, "batch_per_gpu": batch, "peak_gib": p["peak"] / GIB,
                             "resident_gib": p["resident"] / GIB, "step_gib": p["step"] / GIB, "phase": p["phase"],
                             "fits": p["peak"] / GIB <= gpu_gib, "sec_per_step": sec,
                             "tokens_per_s_per_gpu": tokens / sec})  # fmt: skip
    return rows


def print_full_ft(rows: list[dict]) -> None:
    mfu = f"{ASSUMED_MFU:.0%} MFU"
    print(f"| model | GPUs | batch / GPU | peak / GPU | sharded state | step (phase) | s / step at {mfu} |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mark = "" if r["fits"] else " (> 80 GB)"
        print(f"| {r['model']} | {r['gpus']} | {r['batch_per_gpu']} | {r['peak_gib']:.1f} GiB{mark} | "
              f"{r['resident_gib']:.1f} GiB | {r['step_gib']:.1f} GiB ({r['phase']}) | "
              f"{r['sec_per_step']:.2f} |")  # fmt: skip


def _peak(phases: dict[str, float]) -> dict[str, float]:
    phase = max(phases, key=phases.__getitem__)
    return {"peak": phases[phase], "phase": phase, **phases}  # type: ignore[dict-item]


def lm_params(d: int, f: int, n: int, H: int, kv: int, V: int) -> float:
    d_kv = d // H * kv
    return 2 * V * d + n * (2 * d * d + 2 * d * d_kv + 3 * d * f + 2 * d) + d


def seven_b(name: str, batch: int) -> Shapes:
    """The 7B shapes of `scripts/bench_attention.py`'s presets: 24 prompt tokens, 160 caption tokens of which 60 %
    are grounded; LLaVA-1.5: 576 image tokens; LLaVA-NeXT: a 640×480 image → 2,340 (anyres + newlines);
    Qwen2.5-VL-7B: a 640×480 image at the model config's pixel limits → 34×46 patches → 391 image tokens, between
    <|vision_start|> and <|vision_end|>."""
    if name == "qwen2.5-vl-7b":
        d, f, n, H, kv, V, I = 3584, 18944, 28, 28, 4, 152064, 391
        params = lm_params(d, f, n, H, kv, V) + QWEN25_VIT + QWEN25_MERGER
        return Shapes(batch, 24 + 2 + I + 160, I, 96, d, f, n, H, kv, V, 2, 2, params, family="qwen",
                      vision_tokens=4 * I, vision_hidden=1280, vision_layers=32, vision_heads=16)  # fmt: skip
    if name == "llava-1.5-7b":
        d, f, H, kv, I = 4096, 11008, 32, 32, 576
    elif name == "llava-next-7b":
        d, f, H, kv, I = 4096, 14336, 32, 8, 2340
    else:
        raise ValueError(f"no 7B shapes for {name!r} (known: {', '.join(SEVEN_B)})")
    params = lm_params(d, f, 32, H, kv, 32064) + CLIP_L_336 + 1024 * d + d * d  # + the 2-layer projector
    return Shapes(batch, 24 + I + 160, I, 96, d, f, 32, H, kv, 32064, 2, 2, params)


def bench_shapes(preset, r: dict) -> Shapes:
    """The fp32 shapes of one `scripts/bench_attention.py` CPU run (``preset``: its Preset, ``r``: its result)."""
    t, v, b = preset.text, preset.vision, r["batch"]  # pope_image: one image's questions in one batch
    s = Shapes(b, r["tokens"] // b, r["image_tokens"], r["grounded_tokens"], t["hidden_size"], t["intermediate_size"],
               t["num_hidden_layers"], t["num_attention_heads"], t["num_key_value_heads"], t["vocab_size"],
               dtype_bytes=4)  # fmt: skip
    if preset.arch.startswith("qwen"):
        s = replace(s, family="qwen", vision_tokens=r["vision_tokens"], vision_hidden=v["hidden_size"],
                    vision_layers=v["depth"], vision_heads=v["num_heads"])  # fmt: skip
    return s


def pope_shapes(s: Shapes) -> Shapes:
    """One POPE image: its questions (one row at a time on the image's cached prefix), each the image and a short
    question with the answer turn."""
    return replace(s, batch=POPE_QUESTIONS, tokens=s.image_tokens + POPE_TEXT_TOKENS, grounded=0)


def table_7b(gpu_gib: float = 80.0) -> list[dict]:
    rows = []
    for name in SEVEN_B:
        for batch in (1, 2, 8):
            s = seven_b(name, batch)
            weights = s.params * s.dtype_bytes
            row = {"model": name, "batch": batch, "weights_gib": weights / GIB}
            for m in METHODS:
                p = predict(pope_shapes(s) if m == "pope_image" else s, m)
                row[m] = p["peak"] / GIB
                row[f"{m}_phase"] = p["phase"]
                row[f"{m}_fits_{int(gpu_gib)}gib"] = (weights + p["peak"]) / GIB <= gpu_gib
            rows.append(row)
    return rows


def print_7b(rows: list[dict]) -> None:
    print(
        "| model | batch | weights | plain LoRA step | capture (2 layers) | seed eager | evaluation | "
        f"POPE image ({POPE_QUESTIONS} questions) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = []
        for m in METHODS:
            mark = "" if r[f"{m}_fits_80gib"] else " (> 80 GB)"
            cells.append(f"{r[m]:.1f} GiB{mark}")
        print(f"| {r['model']} | {r['batch']} | {r['weights_gib']:.1f} GiB | " + " | ".join(cells) + " |")


def measure(preset: str, method: str) -> dict:
    """One bench_attention method in its own process (1 warm-up, 1 timed, then the profiled step)."""
    script = Path(__file__).with_name("bench_attention.py")
    cmd = [sys.executable, str(script), "--preset", preset, "--method", method, "--reps", "1", "--warmup", "1",
           "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


CPU_PRESETS = ("cpu-small", "cpu-small-next", "cpu-small-qwen")


def validate(presets: tuple[str, ...] = CPU_PRESETS) -> dict:
    """Every method of ``presets`` measured and predicted; with cpu-small, the FSDP full-finetuning steps too."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_attention import PRESETS

    rows = []
    for preset in presets:
        for method in METHODS:
            r = measure(preset, method)
            s = bench_shapes(PRESETS[preset], r)
            pred = predict(s, method)
            rows.append({"preset": preset, "method": method, "shapes": asdict(s), "measured": r["peak_tensor_bytes"],
                         "predicted": pred["peak"], "phase": pred["phase"],
                         "error": pred["peak"] / r["peak_tensor_bytes"] - 1})  # fmt: skip
            e = rows[-1]
            mib = e["measured"] / 2**20, e["predicted"] / 2**20
            print(f"{preset:<15} {method:<20} measured {mib[0]:8.1f} MiB  predicted {mib[1]:8.1f} MiB "
                  f"({e['phase']})  {100 * e['error']:+5.1f} %", flush=True)  # fmt: skip
    for world, method in ((1, "capture_kl_2layers"), (2, "capture_kl_2layers"), (1, "plain_sdpa")):
        if "cpu-small" not in presets:
            break
        r = measure_full("cpu-small", world, method)
        rows.append({"preset": "cpu-small", "method": f"full_ft_{method}_world{world}", "measured": r["step_bytes"],
                     "predicted": r["predicted"]["step"], "phase": r["predicted"]["phase"],
                     "error": r["step_error"]})  # fmt: skip
        print(f"cpu-small       full FT {method} × {world} rank(s): measured {r['step_bytes'] / 2**20:8.1f} MiB  "
              f"predicted {r['predicted']['step'] / 2**20:8.1f} MiB ({r['predicted']['phase']})  "
              f"{100 * r['step_error']:+5.1f} %", flush=True)  # fmt: skip
    return {"date": date.today().isoformat(), "rows": rows, "max_abs_error": max(abs(r["error"]) for r in rows)}


def measure_full(preset: str, world: int, method: str) -> dict:
    """`scripts/bench_full_ft.py` in its own process(es): FSDP full finetuning over ``world`` gloo ranks."""
    script = Path(__file__).with_name("bench_full_ft.py")
    cmd = [sys.executable, str(script), "--preset", preset, "--world", str(world), "--method", method, "--reps", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("{")))


def compare(path: Path) -> dict:
    """Predicted vs measured for a GPU run of a 7B preset of `scripts/bench_attention.py` (its JSON)."""
    run = json.loads(path.read_text())
    rows = []
    for method in METHODS:
        r = run["methods"].get(method, {})
        if r.get("status") != "ok":
            continue
        batch = r.get("batch", run["batch"])  # pope_image: one image's questions
        s = replace(seven_b(run["preset"], batch), grounded=r["grounded_tokens"], tokens=r["tokens"] // batch)
        pred = predict(s, method)
        rows.append({"method": method, "measured": r["peak_tensor_bytes"], "predicted": pred["peak"],
                     "phase": pred["phase"], "error": pred["peak"] / r["peak_tensor_bytes"] - 1})  # fmt: skip
        print(f"{run['preset']} batch {run['batch']} {method:<20} measured {r['peak_tensor_bytes'] / GIB:6.2f} GiB  "
              f"predicted {pred['peak'] / GIB:6.2f} GiB  {100 * rows[-1]['error']:+5.1f} %")  # fmt: skip
    return {"preset": run["preset"], "device": run["device"], "date": run["date"], "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--validate", action="store_true", help="measure the CPU presets and compare (~11 min)")
    ap.add_argument("--presets", nargs="+", choices=CPU_PRESETS, default=list(CPU_PRESETS),
                    help="with --validate: only these (cpu-small brings the full-finetuning rows)")  # fmt: skip
    ap.add_argument("--compare", type=Path, nargs="+", help="bench_attention.py JSON of a 7B preset run on a GPU")
    ap.add_argument("--json", type=Path, help="write the table (and the validation) here")
    args = ap.parse_args()
    if args.compare:
        out = {"compare": [compare(p) for p in args.compare]}
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
        return 0
    out = {"table_7b": table_7b(), "full_ft_7b": table_full_ft()}
    print_7b(out["table_7b"])
    print()
    print_full_ft(out["full_ft_7b"])
    if args.validate:
        out["validation"] = validate(tuple(args.presets))
        print(f"\nlargest error: {100 * out['validation']['max_abs_error']:.1f} %")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
