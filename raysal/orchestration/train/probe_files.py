"""The probe heatmaps of a run, on its storage (local path or URI), and as W&B media.

Layout under the run folder::

    probes/probes.json                 the probe set: image ids, captions, phrases with their spans and segments
    probes/step_0000200/<key>.png      one picture per phrase (key = probe<i>_<j>: stable across trials and steps)
    probes/step_0000200/scores.json    per-phrase AMR / AP / NSS / pointing, with the phrase and image id

Rank 0 writes them at every evaluation, before it reports: a single run logs them to its W&B run itself; a search
trial's W&B run is written by the driver (`wandb_callback`), which reads them from here when the report arrives.
"""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.fs
from PIL import Image

from raysal.probes.render import png_bytes, render
from raysal.storage import filesystem

if TYPE_CHECKING:  # annotations only: the search's W&B actor reads probe files without torch
    from raysal.probes.phrase_maps import PhraseMap
    from raysal.probes.probe_set import Probe

FOLDER = "probes"
SCORES = "scores.json"
KEY_PREFIX = "probes/"  # W&B keys: probes/probe0_1 (images), probes/scores (table)
COLUMNS = ["key", "image_id", "phrase", "amr", "ap", "nss", "pointing"]


def _write(fs: pyarrow.fs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def step_folder(step: int) -> str:
    return f"{FOLDER}/step_{step:07d}"


def write_probe_set(run_dir: str, probes: list[Probe]) -> None:
    fs, root = filesystem(run_dir)
    fs.create_dir(f"{root}/{FOLDER}", recursive=True)
    _write(fs, f"{root}/{FOLDER}/probes.json", json.dumps([p.describe() for p in probes], indent=2).encode())


def write_step(run_dir: str, step: int, maps: list[PhraseMap]) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """PNGs + scores.json of one evaluation; returns what `read_step` reads back."""
    fs, root = filesystem(run_dir)
    folder = f"{root}/{step_folder(step)}"
    fs.create_dir(folder, recursive=True)
    rows, pictures = [], {}
    for m in maps:
        pictures[m.key] = png_bytes(render(m))
        _write(fs, f"{folder}/{m.key}.png", pictures[m.key])
        rows.append({"key": m.key, "image_id": m.image_id, "phrase": m.text, **m.scores})
    _write(fs, f"{folder}/{SCORES}", json.dumps(rows, indent=2).encode())  # last: its presence means complete
    return rows, pictures


def read_step(run_dir: str, step: int) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """(score rows, {key: PNG bytes}) of one evaluation; nothing if it wrote none."""
    fs, root = filesystem(run_dir)
    folder = f"{root}/{step_folder(step)}"
    if fs.get_file_info(f"{folder}/{SCORES}").type != pyarrow.fs.FileType.File:
        return [], {}
    with fs.open_input_stream(f"{folder}/{SCORES}") as f:
        rows = json.loads(f.read().decode())
    pictures = {}
    for row in rows:
        with fs.open_input_stream(f"{folder}/{row['key']}.png") as f:
            pictures[row["key"]] = f.read()
    return rows, pictures


def wandb_media(rows: list[dict[str, Any]], pictures: dict[str, bytes]) -> dict[str, Any]:
    """{"probes/<key>": wandb.Image, "probes/scores": wandb.Table} for one evaluation."""
    import wandb  # heavy, and only in the process that logs (rank 0, the search's W&B callback)

    out: dict[str, Any] = {}
    for row in rows:
        image = np.asarray(Image.open(io.BytesIO(pictures[row["key"]])).convert("RGB"))
        out[KEY_PREFIX + row["key"]] = wandb.Image(image, caption=f"{row['phrase']} (image {row['image_id']})")
    out[KEY_PREFIX + "scores"] = wandb.Table(columns=COLUMNS, data=[[row.get(c) for c in COLUMNS] for row in rows])
    return out
