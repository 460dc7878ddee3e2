"""The demo's base model: the tiny LLaVA / LLaVA-NeXT trained to caption the synthetic images and to answer yes/no
questions about them, once, on first use: ``python -m raysal.demo.base --out DIR --arch llava``.

A random-init model has no language for the LM-only control to keep and no attention worth redirecting, so the
demo search would compare noise with noise. This base is made from the tiny checkpoint (`raysal.model.tiny`, the
same seed) by full finetuning with the LM loss alone — no alignment criterion, so whatever grounding the demo's
aligned trials show is theirs — on synthetic data of its own seed (``DATA_SEED + seed``: never the images the demo
trains or evaluates on) in the demo's palette ("coded": one colour per shape category, which the tiny vision tower
can see): every caption, and per image one question "Is there a {shape} in the image?" for every shape category,
answered "Yes" or "No" from its segments (POPE's question, so the hallucination guard has answers to keep).
Deterministic: the same arguments write the same weights (seeded data, order and initialisation, CPU fp32). Plain
PyTorch/transformers; the stamp ``raysal_demo_base.json`` (written last) records how it was made, its final losses
and its POPE answers on its own validation images at each evaluation.
"""

from __future__ import annotations

import argparse
import hashlib
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
from raysal.data.pope_set import select_pope
from raysal.data.shards import shard_paths, write_shards
from raysal.data.synthetic import THINGS, generate
from raysal.loop.fit import FitConfig, fit
from raysal.loop.pope_eval import pope_scores
from raysal.metrics.pope import question_text
from raysal.model.build import load_model, load_processor
from raysal.model.tiny import write_tiny
from raysal.preprocess.batches import batch_factory, encode_row
from raysal.preprocess.encode import encode_sample

STAMP, WEIGHTS = "raysal_demo_base.json", "model.safetensors"
# Bases made once with this module's command and shipped with raysal (1.2 MB each): the demo's recipe takes ~45 min
# on 2 CPUs (12,000 steps at 576 image tokens), too long for a first use. `make_demo_base` copies one whose stamp
# matches the arguments and whose weights match the stamp's sha256; any other recipe is trained here.
SHIPPED = Path(__file__).with_name("bases")
FORMAT = 2  # of what `write_demo_base` writes (2: the coded palette): a cached base of another format is made again
DATA_SEED = 1000  # + seed: the base's own synthetic images, disjoint from the demo's (seed 0) by construction
# 256 images are memorised: the question → colour lookup generalises only from ~1,600 training images (2026-12-04)
IMAGES, MAX_SIDE, BATCH, PALETTE = 2000, 160, 8, "coded"
POPE_IMAGES, EVALS = 64, 6  # POPE on the base's own validation images, at EVALS evaluations: the stamp's history
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
    out: Path | str,
    arch: str,
    *,
    steps: int = 400,
    lr: float = 3e-3,
    seed: int = 0,
    patch: int = PATCH,
    images: int = IMAGES,
) -> Path:
    """Write the trained base to ``out`` (a new folder) and return it. ``patch``: the vision tower's patch side in
    pixels of its 336 px input (`PATCH`); ``images``: how many synthetic images it learns from (80 % train)."""

    out = Path(out)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="raysal-demo-base-") as tmp:
        tiny = write_tiny(Path(tmp) / "tiny", arch, seed=seed, patch_size=patch)
        generate(Path(tmp) / "root", images=images, seed=DATA_SEED + seed, max_side=MAX_SIDE, palette=PALETTE)
        write_shards(Path(tmp) / "root", Path(tmp) / "shards")
        processor = load_processor(str(tiny))

        def rows(split: str) -> list[dict]:
            fs, files = shard_paths(str(Path(tmp) / "shards"), split)
            return [decode_row(r) for f in files for r in pq.read_table(f, filesystem=fs).to_pylist()]

        train_rows, val_rows = rows("train2017"), rows("val2017")
        train = [encode_row(r, processor) for r in train_rows] + question_samples(train_rows, processor, seed)
        val = [encode_row(r, processor) for r in val_rows]
        pad, pixels = processor.tokenizer.pad_token_id, PixelNorm.from_processor(processor)
        # POPE (adversarial) on the base's own validation images at each evaluation (evaluating changes no training)
        pope = select_pope(str(Path(tmp) / "shards"), "val2017", images=POPE_IMAGES, seed=seed)

        def pope_eval(core, protocol, autocast, records) -> dict[str, float]:
            scores = pope_scores(core, processor, pope, device="cpu", records=records)  # fit prefixes val/
            return {k: scores[f"pope/adversarial/{k}"] for k in ("f1", "yes_ratio", "auroc")}

        history: list[dict] = []

        def report(metrics: dict[str, float], _checkpoint) -> None:
            kept = ("train/step", "val/lm_loss", "val/f1", "val/yes_ratio", "val/auroc")
            history.append({k.split("/")[-1]: round(float(metrics[k]), 4) for k in kept})
            print(f"demo base: {history[-1]}", file=sys.stderr, flush=True)

        torch.manual_seed(seed)
        model = load_model(str(tiny), dtype="float32")
        cfg = FitConfig(max_steps=steps, lr=lr, warmup_steps=10, eval_every=max(1, steps // EVALS), seed=seed,
                        bf16=False)  # fmt: skip
        last = fit(model, [LMCriterion()], batch_factory(train, BATCH, pad, pixels, seed=seed),
                   lambda: batch_factory(val, BATCH, pad, pixels, shuffle=False)(0), cfg, report=report,
                   extra_eval=pope_eval)  # fmt: skip
        model.set_attn_implementation({"text_config": "sdpa"})  # as `from_pretrained` would choose
        if out.exists():
            shutil.rmtree(out)
        model.save_pretrained(out)
        processor.save_pretrained(out)
    digest = hashlib.sha256((out / WEIGHTS).read_bytes()).hexdigest()
    stamp = {"arch": arch, "sha256": digest, "seed": seed, "steps": steps, "lr": lr, "patch": patch, "format": FORMAT,
             "data_seed": DATA_SEED + seed, "images": images, "palette": PALETTE, "train_samples": len(train),
             "train_loss": last.get("train/loss"), "val_lm_loss": last.get("val/lm_loss"),
             "val_amr": last.get("val/amr"), "pope_images": len(pope.images), "history": history,
             "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    (out / STAMP).write_text(json.dumps(stamp, indent=2))
    return out


def shipped(arch: str, *, steps: int, lr: float, seed: int, patch: int = PATCH, images: int = IMAGES) -> Path | None:
    """The shipped base made with these arguments, its weights intact (the stamp's sha256), or None."""
    for folder in sorted(SHIPPED.glob("*")):
        if is_current(folder, arch, steps=steps, lr=lr, seed=seed, patch=patch, images=images):
            digest = hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
            if digest != json.loads((folder / STAMP).read_text()).get("sha256"):
                raise ValueError(f"{folder / WEIGHTS}: its sha256 is not the one its stamp records (a damaged copy)")
            return folder
    return None


def make_demo_base(out: Path | str, arch: str, **recipe) -> Path:
    """The base of this recipe (`write_demo_base`'s keywords) at ``out``: copied when raysal ships it, else trained."""
    src = shipped(arch, **recipe)
    if src is None:
        return write_demo_base(out, arch, **recipe)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out)
    return out


def is_current(
    out: Path | str, arch: str, *, steps: int, lr: float, seed: int, patch: int = PATCH, images: int = IMAGES
) -> bool:
    """A whole base (its stamp is written last) made with these arguments, in this version's format."""
    try:
        s = json.loads((Path(out) / STAMP).read_text())
    except (OSError, ValueError):
        return False
    made = (s.get("format"), s.get("arch"), s.get("steps"), s.get("lr"), s.get("seed"), s.get("patch"), s.get("images"))
    return made == (FORMAT, arch, steps, lr, seed, patch, images)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raysal.demo.base", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", choices=["llava", "llava_next"], default="llava")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--patch", type=int, default=PATCH, help="vision patch side in px of the 336 px input")
    ap.add_argument("--images", type=int, default=IMAGES, help="synthetic images to learn from (80 %% train)")
    args = ap.parse_args(argv)
    path = write_demo_base(args.out, args.arch, steps=args.steps, lr=args.lr, seed=args.seed, patch=args.patch,
                           images=args.images)  # fmt: skip
    stamp = json.loads((path / STAMP).read_text())
    print(f"wrote the demo base ({args.arch}, {args.steps} steps) to {path}: val/lm_loss {stamp['val_lm_loss']:.3f}, "
          f"{stamp['seconds']:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
