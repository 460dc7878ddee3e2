"""A search: ``python -m raysal.tune SPACE.yaml [hydra overrides] [resume=auto|true|false] [optuna_storage=URL] [-v]``.

Each trial is a Tune function that composes the run config from the file's base overrides + the CLI overrides +
the sampled parameters, and runs a Ray Train `TorchTrainer` (Train V2: ``Tuner(TorchTrainer)`` is not allowed)
whose reports reach Tune with their checkpoints (`raysal.orchestration.tune.trial_reports`). Optuna (TPE,
define-by-run for conditional spaces) samples into a persistent SQLite study; ASHA stops weak trials on the
worker-reported step. At the end: a table of the top trials with replay commands, the best trial's best checkpoint
exported as a peft adapter + ``best.json``, and ``report.html``.
The driver is `raysal.orchestration.tune.driver`; this is its command line.

The console shows one line per trial event (started, evaluated, stopped early, failed, finished); ``-v`` adds Ray's
own output (worker logs, status tables).

Everything a search writes is in its folder, ``<storage_path>/<name>`` (a local folder or a URI such as
``s3://bucket/raysal``): Tune's experiment state, the trials, the Optuna study (``optuna.db``, or the database named
by ``optuna_storage=postgresql://…``), summary.json, the report and the W&B files. Running the same command again,
on this head or a new one, continues an interrupted search from that folder (``Tuner.restore``): finished trials
are kept, unfinished ones resume from their Train checkpoints, the study and its LM-only control continue; a
finished search trains nothing and writes its summary and report again.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from raysal.orchestration.train.errors import print_user_error
from raysal.orchestration.tune.driver import run_search as _search  # a name tests can replace
from raysal.orchestration.tune.prepare import prepare_search
from raysal.search.space import SearchSpaceError


def _parse_cli(argv: list[str]) -> tuple[Path, list[str], str, str | None, bool]:
    verbose = any(a in ("-v", "--verbose") for a in argv)
    argv = [a for a in argv if a not in ("-v", "--verbose")]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    resume, database = "auto", None
    overrides = []
    for a in argv[1:]:
        if a.startswith("optuna_storage="):
            database = a.split("=", 1)[1]
            if "://" not in database:
                raise SearchSpaceError(argv[0], "optuna_storage", "must be a database URL such as "
                                       f"postgresql://user:password@host:5432/db, got {database!r}")  # fmt: skip
        elif a.startswith("resume="):
            resume = a.split("=", 1)[1].lower()
            if resume not in ("auto", "true", "false"):
                raise SearchSpaceError(argv[0], "resume", f"must be auto, true or false, got {resume!r}")
        else:
            overrides.append(a)
    return Path(argv[0]), overrides, resume, database, verbose


def main(argv: list[str] | None = None) -> int:

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not {"-v", "--verbose"} & set(sys.argv[1:] if argv is None else argv):
        # Tune's "operation took 2.8 s, which may be a performance bottleneck": read when ray.tune is imported
        os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "60")
    try:  # every check before Ray starts: bad input is one `error:` line and exit 2
        path, cli, resume, database, verbose = _parse_cli(list(sys.argv[1:] if argv is None else argv))
        spec, base, run_spec, sizes = prepare_search(path, cli, database)
    except Exception as e:
        return print_user_error(e)
    print(f"raysal: {sizes.describe()}", flush=True)
    return _search(spec, base, run_spec, resume, verbose)


if __name__ == "__main__":
    sys.exit(main())
