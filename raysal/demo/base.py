"""The demo's base model: the tiny LLaVA / LLaVA-NeXT trained to caption the synthetic images and to answer yes/no
questions about them, once, on first use: ``python -m raysal.demo.base --out DIR --arch llava``.

A random-init model has no language for the LM-only control to keep and no attention worth redirecting, so the
demo search would compare noise with noise. This base is made from the tiny checkpoint (`raysal.model.tiny`, the
same seed) by full finetuning with the LM loss alone — no alignment criterion, so whatever grounding the demo's
aligned trials show is theirs — on synthetic data of its own seed (``DATA_SEED + seed``: never the images the demo
trains or evaluates on): every caption, and per image one question "Is there a {shape} in the image?" for every
shape category, answered "Yes" or "No" from its segments (POPE's question, so the hallucination guard has answers
to keep). Deterministic: the same arguments write the same weights (seeded data, order and initialisation, CPU
fp32). Plain PyTorch/transformers; the stamp ``raysal_demo_base.json`` (written last) records how it was made and
its final losses.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from raysal.batch import PixelNorm
from raysal.criteria.lm import LMCriterion
from raysal.data.decode import decode_row
from raysal.data.shards import shard_paths, write_shards
from raysal.data.synthetic import THINGS, generate
from raysal.loop.fit import FitConfig, fit
from raysal.metrics.pope import question_text
from raysal.model.build import load_model, load_processor
from raysal.model.tiny import write_tiny
from raysal.preprocess.batches import batch_factory, encode_row
from raysal.preprocess.encode import encode_sample

STAMP = "raysal_demo_base.json"
FORMAT = 1  # of what `write_demo_base` writes: a cached base of another format is made again
DATA_SEED = 1000  # + seed: the base's own synthetic images, disjoint from the demo's (seed 0) by construction
IMAGES, MAX_SIDE, BATCH = 256, 160, 8
# the vision patch in px of the 336 px input: the hub's 14 (24 × 24 = 576 image tokens). A coarser grid makes every
# step cheaper (28: 144 tokens, the README demo 10.4 instead of 15 min) but the demo then finds no winner: its
# aligned trials gain less AMR (1.3-1.9× the control's) at more LM loss (+1.5-3 %) — measured 2026-12-04.
PATCH = 14


def question_samples(rows: list[dict], processor, seed: int) -> list[dict]:
    """One yes/no question per (image, shape category), in a seeded order per image; the answer from its segments."""
    rng = random.Random(seed)
    out = []
    for r in rows:
        present = {int(c) for c in r["category_ids"]}
        cats = sorted(THINGS)
        rng.shuffle(cats)
        for c in cats:
            answer = "Yes" if c in present else "No"
            s = encode_sample(r["image"], r["segment_map"], answer, [], r["segment_ids"], processor,
                              question_text(THINGS[c]))  # fmt: skip
            s["image_id"] = np.asarray(r["image_id"], np.int64)
            out.append(s)
    return out


def write_demo_base(
    out: Path | str, arch: str, *, steps: int = 400, lr: float = 3e-3, seed: int = 0, patch: int = PATCH
) -> Path:
    """Write the trained base to ``out`` (a new folder) and return it. ``patch``: the vision tower's patch side in
    pixels of its 336 px input (`PATCH`)."""

    out = Path(out)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="raysal-demo-base-") as tmp:
        tiny = write_tiny(Path(tmp) / "tiny", arch, seed=seed, patch_size=patch)
        generate(Path(tmp) / "root", images=IMAGES, seed=DATA_SEED + seed, max_side=MAX_SIDE)
        write_shards(Path(tmp) / "root", Path(tmp) / "shards")
        processor = load_processor(str(tiny))

        def rows(split: str) -> list[dict]:
            fs, files = shard_paths(str(Path(tmp) / "shards"), split)
            return [decode_row(r) for f in files for r in pq.read_table(f, filesystem=fs).to_pylist()]

        train_rows, val_rows = rows("train2017"), rows("val2017")
        train = [encode_row(r, processor) for r in train_rows] + question_samples(train_rows, processor, seed)
        val = [encode_row(r, processor) for r in val_rows]
        pad, pixels = processor.tokenizer.pad_token_id, PixelNorm.from_processor(processor)
        torch.manual_seed(seed)
        model = load_model(str(tiny), dtype="float32")
        cfg = FitConfig(max_steps=steps, lr=lr, warmup_steps=10, eval_every=steps, seed=seed, bf16=False)
        last = fit(model, [LMCriterion()], batch_factory(train, BATCH, pad, pixels, seed=seed),
                   lambda: batch_factory(val, BATCH, pad, pixels, shuffle=False)(0), cfg)  # fmt: skip
        model.set_attn_implementation({"text_config": "sdpa"})  # as `from_pretrained` would choose
        if out.exists():
            shutil.rmtree(out)
        model.save_pretrained(out)
        processor.save_pretrained(out)
    stamp = {"arch": arch, "seed": seed, "steps": steps, "lr": lr, "patch": patch, "format": FORMAT,
             "data_seed": DATA_SEED + seed, "images": IMAGES, "train_samples": len(train),
             "train_loss": last.get("train/loss"), "val_lm_loss": last.get("val/lm_loss"),
             "val_amr": last.get("val/amr"), "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    (out / STAMP).write_text(json.dumps(stamp, indent=2))
    return out


def is_current(out: Path | str, arch: str, *, steps: int, lr: float, seed: int, patch: int = PATCH) -> bool:
    """A whole base (its stamp is written last) made with these arguments, in this version's format."""
    try:
        s = json.loads((Path(out) / STAMP).read_text())
    except (OSError, ValueError):
        return False
    made_patch = s.get("patch", 14)  # stamps from before the patch was a setting: the hub's 14
    return (s.get("format"), s.get("arch"), s.get("steps"), s.get("lr"), s.get("seed"), made_patch) == (
        FORMAT, arch, steps, lr, seed, patch,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raysal.demo.base", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", choices=["llava", "llava_next"], default="llava")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--patch", type=int, default=PATCH, help="vision patch side in px of the 336 px input")
    args = ap.parse_args(argv)
    path = write_demo_base(args.out, args.arch, steps=args.steps, lr=args.lr, seed=args.seed, patch=args.patch)
    stamp = json.loads((path / STAMP).read_text())
    print(f"wrote the demo base ({args.arch}, {args.steps} steps) to {path}: val/lm_loss {stamp['val_lm_loss']:.3f}, "
          f"{stamp['seconds']:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
