"""Thin rooms around the plain-PyTorch core: `train/` is one Ray Train run (Hydra → `RunSpec`, preflight, assets,
the Train worker, checkpoints, W&B of a run), `tune/` the Ray Tune search (the driver, one trial, capacity, the
study, the search's callbacks and summary). Imports run tune → train → core, never back."""
