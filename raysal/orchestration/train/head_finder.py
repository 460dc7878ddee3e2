"""The head finder's work (``python -m raysal.heads``, and the search's Ray task when a space may pick
``heads: localization``): score every (layer, head) of the base model (no adapters, no training) on validation
samples and write a ranked table and a picture under ``finder.out`` (a local folder or a URI).
"""

from __future__ import annotations

import tempfile
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from raysal import storage
from raysal.attention.capture import enable_capture
from raysal.attention.head_scores import HEADS_FIGURE, heads_file, heads_folder, score_heads
from raysal.batch import PixelNorm
from raysal.data.decode import decode_row
from raysal.data.holdout import holdout_for
from raysal.data.shards import shard_paths
from raysal.model.build import load_model, load_processor, model_info, pixel_limits
from raysal.orchestration.train import preflight as checks  # checks.preflight: one name tests replace
from raysal.orchestration.train.errors import ConfigError
from raysal.orchestration.train.spec import RunSpec
from raysal.preprocess.batches import batch_factory, encode_row


def validation_samples(data: dict[str, Any], processor: Any, n: int) -> list[dict]:
    """The first ``n`` selection samples, encoded: the validation split, or the hold-out of the training split
    (never the confirmation hold-out)."""
    keep = holdout_for(data, "select")
    out: list[dict] = []
    fs, files = shard_paths(data["shards"], data["val_split"])  # a local folder or a URI
    for f in files:
        for row in pq.read_table(f, filesystem=fs).to_pylist():
            if not keep.keeps(int(row["image_id"])):
                continue
            out.append(encode_row(decode_row(row), processor, data["prompt"]))
            if len(out) == n:
                return out
    return out


def write_figure(rows: list[dict], n_layers: int, n_heads: int, dest: Path, title: str) -> None:
    import matplotlib  # here only: the figure needs it, the scoring does not

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    amr = np.full((n_layers, n_heads), np.nan)
    for r in rows:
        amr[r["layer"], r["head"]] = r["amr"]
    fig, ax = plt.subplots(figsize=(max(4, n_heads * 0.3 + 2), max(3, n_layers * 0.25 + 1.5)))
    im = ax.imshow(amr, aspect="auto", cmap="viridis", origin="lower")
    for r in rows[:5]:  # the five best, outlined
        ax.add_patch(plt.Rectangle((r["head"] - 0.5, r["layer"] - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="AMR (1 = chance)")
    fig.tight_layout()
    fig.savefig(dest, dpi=120)
    plt.close(fig)


def find_heads(spec: RunSpec) -> str:
    """Score the heads of ``spec``'s base model (``finder.*`` of its config); returns the heads.json written."""
    finder = spec.config["finder"]
    for key in ("samples", "batch_size"):
        value = finder[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"finder.{key}={value!r}: must be an integer >= 1")
    checks.preflight(spec)  # the model folder and the shards exist (the demo's are made on first use)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = spec.model["name_or_path"]
    processor = load_processor(name, **pixel_limits(spec.model))
    samples = validation_samples(spec.data, processor, int(finder["samples"]))
    model = load_model(name, dtype=spec.model["dtype"], device=device)
    enable_capture(model)
    info = model_info(model)
    batches = batch_factory(samples, int(finder["batch_size"]), processor.tokenizer.pad_token_id,
                            PixelNorm.from_processor(processor), shuffle=False,
                            padding_side=spec.model.get("padding_side", "right"), device=device)(0)  # fmt: skip
    ev = spec.config["trainer"]["eval"]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    with autocast or torch.autocast("cpu", enabled=False):
        table = score_heads(model, batches, info.n_layers, info.n_heads, query_offset=ev["query_offset"],
                            theta=ev["theta"])  # fmt: skip
    rows = table.ranked()
    out = str(spec.config["finder"]["out"])  # absolute or a URI (the search's storage on a cluster)
    folder, dest = heads_folder(out, name), heads_file(out, name)
    d = spec.data
    holdout = d.get("val_holdout") if d["val_split"] == d["train_split"] else None
    result = {
        "model": name, "date": date.today().isoformat(), "images": table.images, "tokens": table.tokens,
        "n_layers": info.n_layers, "n_heads": info.n_heads, "query_offset": ev["query_offset"], "theta": ev["theta"],
        "data": {"shards": d["shards"], "split": d["val_split"], "holdout": holdout},
        "heads": rows,
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:  # the figure is drawn to a local file, then copied to storage
        picture = Path(tmp) / HEADS_FIGURE
        write_figure(rows, info.n_layers, info.n_heads, picture,
                     f"{storage.name(folder)}: AMR per head, {table.images} images, {table.tokens} tokens")  # fmt: skip
        storage.upload(picture, storage.join(folder, HEADS_FIGURE))
    storage.write_json(dest, result)  # last: a table that exists is whole, with its picture beside it
    print(f"raysal: scored {info.n_layers} x {info.n_heads} heads on {table.images} validation images "
          f"({table.tokens} grounded tokens); best by AMR:")  # fmt: skip
    for r in rows[:10]:
        print(f"  #{r['rank']:<3} layer {r['layer']:>2} head {r['head']:>2}: AMR {r['amr']:.3f}  pointing "
              f"{r['pointing']:.3f}  image mass {r['mass']:.3f}  entropy {r['entropy']:.3f}")  # fmt: skip
    print(f"raysal: {dest}, {storage.join(folder, HEADS_FIGURE)}")
    return dest
