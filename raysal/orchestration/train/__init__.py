"""One Ray Train run: the Hydra config read into a `RunSpec`, its checks, assets, data pipeline, worker function,
trainer, checkpoints and W&B. Ray and Hydra live here and above; the core below imports neither."""
