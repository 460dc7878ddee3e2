"""One run: ``python -m raysal.train [hydra overrides]`` — a Ray Train `TorchTrainer` around the core loop.

python -m raysal.train experiment=demo                    # tiny model + synthetic data on CPU, W&B offline
python -m raysal.train model=llava-v1.6-mistral-7b scaling.num_workers=4 criterion@criteria.align=mse
python -m raysal.train name=my-run                        # re-running the same name resumes from its checkpoint
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

import hydra
import ray
from omegaconf import DictConfig

from raysal.orchestration.ray_fixes import ray_address
from raysal.orchestration.train import preflight as checks  # checks.preflight: one name tests replace
from raysal.orchestration.train.compose import CONFIG_DIR, compose_cfg
from raysal.orchestration.train.confirm import confirm
from raysal.orchestration.train.errors import print_user_error
from raysal.orchestration.train.fail_reason import clear_reason, read_reason
from raysal.orchestration.train.outage import fit_through_outages
from raysal.orchestration.train.placement_groups import JOB_RUNTIME_ENV
from raysal.orchestration.train.preflight import DataSizes
from raysal.orchestration.train.spec import RunSpec, spec_from_cfg
from raysal.orchestration.train.stale_checkpoints import remove_stale_checkpoints
from raysal.orchestration.train.trainer import build_trainer, export_best
from raysal.orchestration.train.wandb_run import resolve_mode, sync_hint

log = logging.getLogger("raysal.train")


def prepare(cfg: DictConfig) -> tuple[RunSpec, DataSizes]:
    """Every check, before Ray starts: config values, storage, model, shards, validation size → (spec, sizes)."""
    spec = spec_from_cfg(cfg)
    return spec, checks.preflight(spec)


def run(spec: RunSpec, sizes: DataSizes) -> dict:
    """The checked run under Ray Train; its best checkpoint exported to the run folder → the run's summary."""
    print(f"raysal: {sizes.describe()}", flush=True)
    t0 = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=ray_address(), log_to_driver=True, runtime_env=JOB_RUNTIME_ENV)
    run_dir = spec.run_dir
    remove_stale_checkpoints(run_dir)  # a kill between a checkpoint and Ray's snapshot leaves orphans
    clear_reason(run_dir)  # a resumed run is judged on what it does now
    result = fit_through_outages(lambda: build_trainer(spec).fit(), run_dir)  # a storage outage: run on
    reason = read_reason(run_dir)
    if reason:
        print(f"raysal: run {spec.name} stopped — {reason}; nothing exported ({run_dir})", file=sys.stderr)
        return {"name": spec.name, "fail_reason": reason}
    metric, mode = spec.objective["metric"], spec.objective["mode"]
    best = result.get_best_checkpoint(metric, mode) if result.best_checkpoints else None
    summary = {"name": spec.name, "run_dir": run_dir, "metrics": result.metrics, "best_adapter": None}
    exported = None
    if best is not None:
        best_metrics = next(m for c, m in result.best_checkpoints if c.path == best.path)
        key, exported = export_best(best, run_dir, best_metrics)  # best_adapter (LoRA) or best_model (full)
        summary[key] = exported
        summary["best"] = {metric: best_metrics.get(metric), "step": best_metrics.get("train/step")}
        confirmation = confirm(spec, best)  # on images the best checkpoint was not chosen on
        if confirmation is not None:
            summary["confirmation"] = {k: confirmation[k] for k in ("checkpoint", "step", "images", "metrics")}
            got = confirmation["metrics"].get(metric, float("nan"))
            print(
                f"raysal: confirmation hold-out ({confirmation['images']} images the run never trained or chose "
                f"on): {metric}={got:.4g} (selection {best_metrics.get(metric, float('nan')):.4g})",
                flush=True,
            )
    w = (
        sync_hint(run_dir)  # rank 0 copies its W&B files into the run folder
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
        f"exported: {exported}; run folder: {run_dir}; {w}"
    )
    return summary


def _run_checked(compose: Callable[[], DictConfig]) -> int:
    """Compose and check (bad input → one ``error:`` line, exit 2), then run; later failures keep their traceback."""
    try:
        spec, sizes = prepare(compose())
    except Exception as e:
        return print_user_error(e)
    return 1 if run(spec, sizes).get("fail_reason") else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m raysal.train [overrides]``. Hydra's own flags (``--cfg job``, ``--help``, ``--multirun``, ...)
    go through ``@hydra.main``; plain overrides are composed here so that a typo is one line, not Hydra's block."""
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if any(a.startswith("-") for a in args):
        return _hydra_main(args)
    return _run_checked(lambda: compose_cfg(args))


def _hydra_main(args: list[str]) -> int:
    code = 0

    @hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
    def entry(cfg: DictConfig) -> None:
        nonlocal code
        code = _run_checked(lambda: cfg)

    sys.argv = [sys.argv[0], *args]
    entry()
    return code


if __name__ == "__main__":
    sys.exit(main())
