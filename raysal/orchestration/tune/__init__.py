"""The Ray Tune search behind ``python -m raysal.tune``: the driver, one trial, cluster capacity, the Optuna
searcher and study, the scheduler, the callbacks (console lines, placement-group janitor, W&B) and the summary.
Builds on `raysal.orchestration.train` (a trial is one Train run) and on the Ray-free `raysal.search`."""
