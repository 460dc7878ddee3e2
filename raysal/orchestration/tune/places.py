"""Where a search's things live: the search folder on storage (local or a URI: Tune's state, the trials, the
study, summary, report, W&B files), the driver's local disk, and the Optuna study's store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna

from raysal import storage
from raysal.orchestration.train.errors import ConfigError
from raysal.orchestration.train.preflight import check_writable
from raysal.orchestration.train.spec import RunSpec
from raysal.orchestration.tune.study_store import StudyStore, redact, study_store
from raysal.search.space import SearchSpec


class SearchStateError(ConfigError):
    """The search folder cannot be resumed as it is (said in one line, exit 2)."""


@dataclass(frozen=True)
class SearchPlaces:
    """Where a search's things live."""

    search_dir: str  # <storage_path>/<name>: local path or URI, the whole search
    trials_dir: str  # <search>/trials: one Train run per trial
    local_dir: Path  # the driver's disk: W&B files before they are copied (the search folder itself when local)
    study: StudyStore


def search_places(spec: SearchSpec, run_spec: RunSpec) -> SearchPlaces:
    search_dir = storage.join(run_spec.storage_path, spec.name)
    local = storage.local_path(search_dir) or Path(run_spec.config["cache_dir"]).expanduser() / "searches" / spec.name
    study = study_store(search_dir, spec.name, spec.optuna_storage, str(run_spec.config["cache_dir"]))
    return SearchPlaces(search_dir, storage.join(search_dir, "trials"), local, study)


def check_study(places: SearchPlaces) -> None:
    """The study's place works: the driver's disk for a working copy, or the database answers."""
    if places.study.published_separately:
        check_writable(str(Path(places.study.working).parent), "cache_dir")
    if places.study.in_database:
        try:
            optuna.storages.RDBStorage(places.study.url)
        except Exception as e:
            reason = " ".join(str(e).split())[:300].replace(places.study.url, redact(places.study.url))
            where = f"optuna_storage={redact(places.study.url)}"
            raise ConfigError(f"{where}: cannot open the database ({reason})") from None


def restorable(search_dir: str) -> bool:
    """Tune wrote its experiment state there (a folder left by a search that failed to start is not)."""
    return any(n.startswith("experiment_state-") and n.endswith(".json") for n in storage.list_names(search_dir))
