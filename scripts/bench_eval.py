"""What an evaluation costs, part by part, in training steps: the main metrics (LM loss + the grounding metrics over
all layers × heads), POPE, the localisation readout, the probe heatmaps and the per-item records, at the default
``trainer.*`` / ``data.*`` sizes, measured on a preset and estimated for the 7B models from FLOPs.

    python scripts/bench_eval.py --preset cpu-small --json docs/bench_eval_cpu.json             # ~2 min
    python scripts/bench_eval.py --preset cpu-small-next --json docs/bench_eval_cpu_next.json   # ~4 min

One unit throughout: a **step-equivalent** is the wall time of one default training step (LoRA r=16 on q,v, the
``kl`` criterion on 2 layers as a search's trials train, ``trainer.batch_size`` 8 samples). Measured per sample on
the preset (its own micro-batch), then scaled to the defaults: the main evaluation reads ``data.val_max_images``
samples, POPE ``trainer.pope.images`` images (one shared prefix + 12 questions each, `raysal.loop.pope_eval`), the
readout ``trainer.readout.images`` and the probes ``trainer.probes.images`` images (one captured forward each), and
the records are serialised once (``eval_records.json``). A trial evaluates every ``trainer.eval_every`` steps, so
its evaluations cost (per evaluation) / eval_every of its training. The 7B column is a FLOP model, not a
measurement: a training step's 6·N·tokens (forward, recompute under gradient checkpointing, backward to the
activations; a frozen base) + the vision tower's forward, an evaluation's 2·N·tokens + the vision tower, at equal
hardware efficiency. Needs torch/transformers/peft only (no Ray).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_attention import (  # scripts/ is on sys.path: this file runs as a script
    POPE_QUESTIONS,
    POPE_TEMPLATE_TOKENS,
    POPE_TEXT_TOKENS,
    PRESETS,
    _pope_shared,
    build,
    make_batch,
    methods,
)

from raysal.attention.capture import CapturePlan, enable_capture
from raysal.batch import model_inputs
from raysal.loop.evaluate import evaluate
from raysal.loop.step import plan_step, train_step
from raysal.metrics.records import ItemRecords
from raysal.model.build import apply_lora, model_info

# the shipped defaults (configs/trainer/default.yaml, configs/data/coconut.yaml)
DEFAULTS = {"batch_size": 8, "eval_every": 200, "max_steps": 2000, "val_max_images": 500, "pope_images": 64,
            "readout_images": 32, "probe_images": 4}  # fmt: skip
# the 7B models' parameter counts (LM without embeddings; CLIP ViT-L/14-336) and tokens per sample
N_LM, N_VISION, PATCHES = 6.5e9, 0.30e9, 577
SEVEN_B = {"llava-1.5-7b": {"image_tokens": 576, "crops": 1}, "llava-next-7b": {"image_tokens": 2340, "crops": 5}}
PROMPT, CAPTION = 24, 160


def _median(fn, warmup: int, reps: int) -> float:
    times = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(preset_name: str, warmup: int, reps: int) -> dict:
    preset = PRESETS[preset_name]
    device, dtype = torch.device("cpu"), torch.float32
    torch.manual_seed(0)
    base = build(preset, device, dtype)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as the 7B configs
    model = apply_lora(base, rank=16, alpha=32, targets="qv")
    enable_capture(model)
    info = model_info(model)
    criteria = methods(preset.text["num_hidden_layers"])["capture_kl_2layers"]
    plan = plan_step(criteria, info)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch, n_image = make_batch(preset, device, dtype)
    one, _ = make_batch(replace(preset, batch=1), device, dtype)
    pope, _ = make_batch(replace(preset, batch=POPE_QUESTIONS, prompt_tokens=POPE_TEMPLATE_TOKENS,
                                 caption_tokens=POPE_TEXT_TOKENS), device, dtype)  # fmt: skip
    protocol = CapturePlan(tuple(range(info.n_layers)), tuple(range(info.n_heads)), 0)  # all × all, as `trainer.eval`
    B = preset.batch

    def step() -> None:
        train_step(model, batch, criteria, plan, step=0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    t_step = _median(step, warmup, reps)
    model.eval()
    records = ItemRecords()
    t_eval = _median(lambda: evaluate(model, [batch], protocol, device=device, records=records), warmup, reps)
    t_one = _median(lambda: evaluate(model, [one], protocol, device=device), warmup, reps)
    with torch.no_grad():
        t_pope = _median(lambda: _pope_shared(model, model_inputs(pope)), warmup, reps)
    # the records of one default evaluation: its images, POPE's questions, the readout's phrases (~2 per image)
    big = ItemRecords()
    big.add("images", ({"image_id": i, "lm_sum": 1.0, "lm_n": 160, "tokens": 96, "amr": 0.5, "ap": 0.5, "nss": 1.0,
                        "pointing": 0.5} for i in range(DEFAULTS["val_max_images"])))  # fmt: skip
    big.add("pope", ({"image_id": i // 12, "setting": "random", "label": True, "p_yes": 0.5, "mass": 0.9}
                     for i in range(DEFAULTS["pope_images"] * POPE_QUESTIONS)))  # fmt: skip
    big.add("readout", ({"image_id": i // 2, "iou": 0.5} for i in range(2 * DEFAULTS["readout_images"])))
    t_records = _median(lambda: Path("/dev/null").write_text(big.to_json()), 1, 5)
    per_sample_step = t_step / B
    default_step = per_sample_step * DEFAULTS["batch_size"]
    parts_s = {
        "main": t_eval / B * DEFAULTS["val_max_images"],
        "pope": t_pope * DEFAULTS["pope_images"],
        "readout": t_one * DEFAULTS["readout_images"],
        "probes": t_one * DEFAULTS["probe_images"],
        "records": t_records,
    }
    steps = {k: v / default_step for k, v in parts_s.items()}
    total = sum(steps.values())
    return {
        "preset": preset_name, "image_tokens": n_image, "micro_batch": B,
        "measured_s": {"train_step": t_step, "eval_batch": t_eval, "eval_one_sample": t_one, "pope_image": t_pope,
                       "records_json": t_records},
        "default_step_s": default_step, "step_equivalents": steps, "total_step_equivalents": total,
        "fraction_of_training": total / DEFAULTS["eval_every"],
    }  # fmt: skip


def seven_b() -> dict:
    """The FLOP model at 7B: each part's FLOPs over a default training step's."""
    out = {}
    for name, m in SEVEN_B.items():
        tokens = PROMPT + m["image_tokens"] + CAPTION
        vision = 2 * N_VISION * PATCHES * m["crops"]  # the frozen tower's forward, in training and evaluation alike
        train = DEFAULTS["batch_size"] * (6 * N_LM * tokens + vision)
        sample = 2 * N_LM * tokens + vision
        pope = 2 * N_LM * (POPE_TEMPLATE_TOKENS + m["image_tokens"] + POPE_QUESTIONS * POPE_TEXT_TOKENS) + vision
        steps = {
            "main": DEFAULTS["val_max_images"] * sample / train,
            "pope": DEFAULTS["pope_images"] * pope / train,
            "readout": DEFAULTS["readout_images"] * sample / train,
            "probes": DEFAULTS["probe_images"] * sample / train,
            "records": 0.0,
        }
        total = sum(steps.values())
        out[name] = {"step_equivalents": steps, "total_step_equivalents": total,
                     "fraction_of_training": total / DEFAULTS["eval_every"]}  # fmt: skip
    return out


def table(results: list[dict], model: dict) -> str:
    cols = [r["preset"] for r in results] + list(model)
    rows = [f"| part (defaults) | {' | '.join(cols)} |", "|---|" + "---|" * len(cols)]
    what = {"main": f"main metrics ({DEFAULTS['val_max_images']} images)",
            "pope": f"POPE ({DEFAULTS['pope_images']} images × ≤ {POPE_QUESTIONS} questions)",
            "readout": f"readout ({DEFAULTS['readout_images']} images)",
            "probes": f"probes ({DEFAULTS['probe_images']} images)", "records": "per-item records (JSON)"}  # fmt: skip
    every = [*results, *model.values()]
    for k, label in what.items():
        rows.append(f"| {label} | " + " | ".join(f"{e['step_equivalents'][k]:.2f}" for e in every) + " |")
    rows.append("| **one evaluation** | " + " | ".join(f"**{e['total_step_equivalents']:.1f}**" for e in every) + " |")
    rows.append(f"| **÷ {DEFAULTS['eval_every']} training steps** | "
                + " | ".join(f"**{e['fraction_of_training']:.1%}**" for e in every) + " |")  # fmt: skip
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=[p for p in PRESETS if not PRESETS[p].gpu_only], action="append")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = [measure(p, args.warmup, args.reps) for p in args.preset or ["cpu-small"]]
    model = seven_b()
    text = table(results, model)
    print(text)
    if args.json:
        out = {"date": str(date.today()), "device": "cpu", "threads": torch.get_num_threads(), "defaults": DEFAULTS,
               "measured": results, "flop_model_7b": model, "table": text}  # fmt: skip
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
