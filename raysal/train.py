"""One run: ``python -m raysal.train [hydra overrides]`` — a Ray Train `TorchTrainer` around the core loop.

python -m raysal.train experiment=demo                    # tiny model + synthetic data on CPU, W&B offline
python -m raysal.train model=llava-v1.6-mistral-7b scaling.num_workers=4 criterion@criteria.align=mse
python -m raysal.train name=my-run                        # re-running the same name resumes from its checkpoint
"""

from __future__ import annotations

import logging
import os
import sys
import time

import hydra
from omegaconf import DictConfig

from raysal.orchestration.assets import ensure_data, ensure_model
from raysal.orchestration.compose import CONFIG_DIR

log = logging.getLogger("raysal.train")


def run(cfg: DictConfig) -> dict:
    import ray

    from raysal.orchestration.spec import spec_from_cfg
    from raysal.orchestration.trainer import build_trainer, export_adapter
    from raysal.orchestration.wandb_run import resolve_mode, sync_hint
    from raysal.orchestration.worker import wandb_dir

    spec = spec_from_cfg(cfg)  # validation happens here, before Ray starts anything
    ensure_model(spec.model)
    ensure_data(spec.data)
    t0 = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    result = build_trainer(spec).fit()
    metric, mode = spec.objective["metric"], spec.objective["mode"]
    best = result.get_best_checkpoint(metric, mode) if result.best_checkpoints else None
    run_dir = f"{spec.storage_path}/{spec.name}"
    summary = {"name": spec.name, "run_dir": run_dir, "metrics": result.metrics, "best_adapter": None}
    if best is not None:
        best_metrics = next(m for c, m in result.best_checkpoints if c.path == best.path)
        summary["best_adapter"] = export_adapter(best, f"{run_dir}/best_adapter", best_metrics)
        summary["best"] = {metric: best_metrics.get(metric), "step": best_metrics.get("train/step")}
    w = (
        sync_hint(wandb_dir(spec))
        if resolve_mode(spec.wandb["mode"]) == "offline"
        else f"W&B project {spec.wandb['project']}"
    )
    best_txt = (
        f"best {metric}={summary['best'][metric]:.4g} at step {summary['best']['step']:.0f}"
        if best
        else "no checkpoint"
    )
    print(
        f"raysal: run {spec.name} finished in {time.perf_counter() - t0:.0f}s — {best_txt}; "
        f"adapter: {summary['best_adapter']}; run folder: {run_dir}; {w}"
    )
    return summary


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
