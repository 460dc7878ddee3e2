"""Hyperparameter search: search-space files, their Optuna sampler, and the Ray Tune driver."""
