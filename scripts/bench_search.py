"""How good is raysal's search at finding the best trial? ``python scripts/bench_search.py [--trials 48] [--seeds 3]``.

Runs raysal's own searcher (`ReasonedOptunaSearch` over the define-by-run space of ``search_spaces/criteria.yaml``,
the tuner's sampler) and scheduler (its ASHA on ``train/step``) in Ray Tune, 8 trials at once, on a cheap synthetic
objective of known optimum instead of training: a function of the sampled overrides with the space's conditional
structure (each criterion its own best weight, ``top_k`` only under ``localization``), a learning curve over
``train/step`` and noise, reported by a dummy trainable at every ``eval_every`` as a trial does. The same with
Optuna's random sampler, at equal trial counts and seeds. Regret = the optimum − the true (noise-free) value of
the best trial *the search would pick* (the highest reported value among trials that ran to ``max_t``), after
each number of trials. Writes JSON (``--json``) and prints a markdown table: mean regret over the seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import zlib
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "search_spaces" / "criteria.yaml"
CONCURRENT = 8

# the synthetic objective: per criterion, its quality and its best weight (log10)
CRITERIA = {"kl": (1.0, math.log10(0.3)), "mse": (0.75, math.log10(10.0)), "mass": (0.85, math.log10(0.1)),
            "bce_dice": (0.8, math.log10(0.05))}  # fmt: skip
LAYERS = {"early": 0.80, "middle": 1.0, "late": 0.9, "all": 0.92}
TOP_K = {4: 0.97, 8: 1.0, 16: 0.95}


def true_value(o: dict) -> float:
    """The noise-free objective at the end of training, for one trial's overrides; the optimum is 4.0."""
    quality, best_w = CRITERIA[o["criterion@criteria.align"]]
    w = 1.0 - 0.25 * (math.log10(o["criteria.align.weight"]) - best_w) ** 2
    lr = 1.0 - 0.6 * (math.log10(o["optim.lr"]) - math.log10(2e-4)) ** 2
    heads = 0.9 if o["criteria.align.heads"] == "all" else TOP_K[o["criteria.align.top_k"]]
    base = 1.0 if o["criterion@criteria.base"] == "lm" else {3.0: 0.95, 5.0: 1.02, 10.0: 0.97}[
        o["criteria.base.clamp_hi"]
    ]  # fmt: skip
    rank = {8: 0.97, 16: 1.0, 64: 0.99, 128: 0.98}[o["lora.rank"]]
    smooth = 1.0 if o.get("criteria.align.smoothing", 0.0) in (0.0, 0.05) else 0.97
    offset = 1.0 if o["criteria.align.query_offset"] == -1 else 0.98
    targets = {"qv": 0.97, "qkvo": 1.0, "all-linear": 0.99}[o["lora.targets"]]
    value = quality * max(w, 0.0) * max(lr, 0.0) * LAYERS[o["criteria.align.layers"]] * heads * base * rank
    return 1.0 + 3.0 * value * smooth * offset * targets / 1.02  # 1.0: the control's AMR (chance)


OPTIMUM = true_value({"criterion@criteria.align": "kl", "criteria.align.weight": 0.3, "optim.lr": 2e-4,
                      "criteria.align.heads": "localization", "criteria.align.top_k": 8,
                      "criterion@criteria.base": "cal", "criteria.base.clamp_hi": 5.0, "lora.rank": 16,
                      "criteria.align.smoothing": 0.0, "criteria.align.query_offset": -1, "lora.targets": "qkvo",
                      "criteria.align.layers": "middle"})  # fmt: skip


def trainable(config: dict) -> None:
    """A trial without training: the objective's learning curve at every evaluation, with noise."""
    import ray.tune

    from raysal.search.optuna_params import params_to_overrides

    o = params_to_overrides(config)
    final = true_value(o)
    rng = np.random.default_rng(zlib.crc32(json.dumps(o, sort_keys=True, default=str).encode()))
    for step in range(200, 2001, 200):
        curve = 1.0 + (final - 1.0) * (1.0 - math.exp(-step / 600)) / (1.0 - math.exp(-2000 / 600))
        ray.tune.report({"train/step": step, "val/amr": curve + rng.normal(0, 0.03), "true": final})


def one_search(sampler_name: str, seed: int, trials: int, folder: str) -> list[dict]:
    """→ [{"true", "reported", "full"}] per trial in start order."""
    import optuna
    from ray import tune

    from raysal.orchestration.tune.optuna_search import ReasonedOptunaSearch
    from raysal.orchestration.tune.tuner import make_sampler, make_scheduler
    from raysal.search.sampling import define_by_run
    from raysal.search.space_file import load_search_space

    spec = load_search_space(SPACE)
    sampler = make_sampler(seed) if sampler_name == "raysal" else optuna.samplers.RandomSampler(seed=seed)
    searcher = ReasonedOptunaSearch(space=define_by_run(spec), metric="val/amr", mode="max", sampler=sampler,
                                    trials_dir=folder)  # fmt: skip
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": 2 / CONCURRENT}),
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=make_scheduler(spec), num_samples=trials, max_concurrent_trials=CONCURRENT
        ),
        run_config=tune.RunConfig(name=f"{sampler_name}-{seed}", storage_path=folder, verbose=0),
    )
    grid = tuner.fit()
    rows = []
    for r in sorted(grid, key=lambda r: r.metrics.get("trial_id", "")):
        df = r.metrics_dataframe
        full = int(r.metrics["train/step"]) == 2000  # ASHA did not stop it
        rows.append({"start": float(df["timestamp"].min()), "true": float(r.metrics["true"]),
                     "reported": float(r.metrics["val/amr"]), "full": full})  # fmt: skip
    rows.sort(key=lambda x: x["start"])
    return rows


def regret_curve(rows: list[dict]) -> list[float]:
    """After k trials: optimum − the true value of the highest-reported trial that ran to the end."""
    out, best = [], None
    for r in rows:
        if r["full"] and (best is None or r["reported"] > best["reported"]):
            best = r
        out.append(OPTIMUM - (best["true"] if best else 1.0))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench_search.py", description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=48)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import ray

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    t0 = time.perf_counter()
    curves: dict[str, list[list[float]]] = {"raysal": [], "random": []}
    try:
        with tempfile.TemporaryDirectory(prefix="raysal-bench-search-") as folder:
            for seed in range(args.seeds):
                for name in curves:
                    curves[name].append(regret_curve(one_search(name, seed, args.trials, folder)))
                    print(f"{name} seed {seed}: final regret {curves[name][-1][-1]:.3f}", flush=True)
    finally:
        ray.shutdown()
    marks = [k for k in (8, 16, 24, 32, 48, 64) if k <= args.trials]
    mean = {n: np.mean(np.array(c), 0) for n, c in curves.items()}
    print(f"\n| sampler | {' | '.join(f'regret after {k} trials' for k in marks)} |")
    print(f"|---|{'---|' * len(marks)}")
    for n in curves:
        print(f"| {n} | {' | '.join(f'{mean[n][k - 1]:.3f}' for k in marks)} |")
    out = {"date": date.today().isoformat(), "cpus": os.cpu_count(), "trials": args.trials, "seeds": args.seeds,
           "concurrent": CONCURRENT, "optimum": OPTIMUM, "curves": curves,
           "mean_at": {n: {k: float(mean[n][k - 1]) for k in marks} for n in curves},
           "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    print(f"({out['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
