"""The Ray-free half of a search: space files and their validation, sampling (Optuna define-by-run), the
control and the honest best, guards, the verdict and the report. The Ray Tune side is `raysal.orchestration.tune`."""
