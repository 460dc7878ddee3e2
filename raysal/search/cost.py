"""What a trial and a search cost: wall seconds training and evaluating, and the GPU-hours (or worker-hours on CPU)
they held, from the ``cost/*`` metrics a run reports (`raysal.loop.fit`: cumulative over its resumes).

A run's hours are its rank 0's wall time × the devices it holds: every rank of a run waits for the others at each
step and evaluation, so rank 0's clock is the run's. Seconds a trial spent before its first report (start-up,
model load) and after its last are not counted: these are the training and evaluation the search paid for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

TRAIN_S, EVAL_S = "cost/train_s", "cost/eval_s"
GPU_HOURS, WORKER_HOURS = "cost/gpu_hours", "cost/worker_hours"


def hours(train_s: float, eval_s: float, workers: int, gpus_per_worker: float) -> dict[str, float]:
    """The run's ``cost/gpu_hours`` (0 on CPU workers) and ``cost/worker_hours`` so far."""
    wall_h = (train_s + eval_s) / 3600
    return {GPU_HOURS: wall_h * workers * gpus_per_worker, WORKER_HOURS: wall_h * workers}


def trial_cost(metrics: Mapping[str, Any]) -> dict[str, float] | None:
    """One trial's cost from its last reported metrics: {train_s, eval_s, eval_fraction, gpu_hours, worker_hours};
    None when it reported none (it never reached an evaluation)."""
    if TRAIN_S not in metrics or EVAL_S not in metrics:
        return None
    train_s, eval_s = float(metrics[TRAIN_S]), float(metrics[EVAL_S])
    total = train_s + eval_s
    return {
        "train_s": train_s,
        "eval_s": eval_s,
        "eval_fraction": eval_s / total if total > 0 else 0.0,
        "gpu_hours": float(metrics.get(GPU_HOURS, 0.0)),
        "worker_hours": float(metrics.get(WORKER_HOURS, 0.0)),
    }


def search_cost(costs: Iterable[dict[str, float] | None]) -> dict[str, float]:
    """The sum over a search's trials (failed ones too: they were paid for), with the trials counted."""
    known = [c for c in costs if c is not None]
    out = {k: sum(c[k] for c in known) for k in ("train_s", "eval_s", "gpu_hours", "worker_hours")}
    total = out["train_s"] + out["eval_s"]
    out["eval_fraction"] = out["eval_s"] / total if total > 0 else 0.0
    out["trials"] = len(known)
    return out


def cost_text(cost: dict[str, float], *, search: bool = False) -> str:
    """ "3.2 GPU-h (evaluation 18%)" — worker-hours when no GPU was held; ``search``: "the search cost …"."""
    gpu = cost["gpu_hours"] > 0
    amount = f"{cost['gpu_hours']:.3g} GPU-h" if gpu else f"{cost['worker_hours']:.3g} CPU worker-h"
    text = f"{amount} (evaluation {cost['eval_fraction']:.0%})"
    if search:
        return f"the search cost {text} over {cost['trials']:g} trial(s)"
    return text
