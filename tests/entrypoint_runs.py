"""Running the entry points in tests: a subprocess with the test environment, offline W&B records, a small
search-space file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from wandb_records import read_run

ENV = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
# 24 images: 5 in val2017, too few to give half of them to the confirmation hold-out (the demo does, on 192)
SMALL = ["experiment=demo", "data.synthetic.images=24", "trainer.batch_size=4", "data.confirm_holdout=0"]
# POPE, the readout and the probes off: for a fault-injection test that checks none of them (each evaluation and
# the first report come sooner)
NO_EXTRAS = ["trainer.pope.images=0", "trainer.readout.images=0", "trainer.probes.images=0"]

FAKE_KEY = "f" * 8 + "0123456789abcdef" * 2  # 40 characters, like a W&B key; offline mode never checks it


def files_containing(folder: Path, needle: str) -> list[Path]:
    data = needle.encode()
    return [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and data in p.read_bytes()]


def run(
    cmd: list[str], cache: Path, timeout: int = 600, extra_env: dict | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    env = {**ENV, "RAYSAL_CACHE": str(cache), **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=cwd)  # fmt: skip


def wandb_runs(folder: Path) -> list[dict]:
    return [read_run(p) for p in sorted(folder.glob("wandb/offline-run-*/run-*.wandb"))]


HOLDOUT = re.compile(r"validation hold-out 0\.01 of train2017 = (\d+) images")


def space_file(
    tmp_path: Path, n: int, name: str, concurrency: str = "max_concurrent_trials: 1", space: str = "",
    control: str = "", cpus_per_worker: float = 1, top: str = "",
) -> Path:  # fmt: skip
    """A small space file: ASHA over kl/mse, the kl weight and lr; ``space``: more lines for its ``space:`` map;
    ``control``: a ``control:`` entry (a YAML flow mapping), else the default control; ``top``: more top-level
    lines (``finalists: {seeds: 2}``)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"""
{f"control: {control}" if control else ""}
{top}
name: {name}
objectives: [{{metric: val/amr, mode: max}}]
num_samples: {n}
{concurrency}
scheduler: {{type: asha, time_attr: train/step, max_t: 6, grace_period: 2, reduction_factor: 2}}
resources: {{num_workers: 1, use_gpu: false, cpus_per_worker: {cpus_per_worker:g}, gpus_per_worker: 0}}
base_overrides: [trainer.max_steps=6, trainer.eval_every=2]
space:
  criterion@criteria.align:
    choice:
      kl: {{criteria.align.weight: {{loguniform: [0.1, 1.0]}}}}
      mse: {{}}
  optim.lr: {{loguniform: [1.0e-3, 1.0e-2]}}
{space}"""
    )
    return path


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), to clean up what a SIGKILL leaves behind."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out
