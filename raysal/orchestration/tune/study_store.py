"""Where a search's Optuna study lives, so that it outlives the head node.

- A team database (``optuna_storage: postgresql://…`` in the space file, or on the command line): the study lives
  there; at the end of the search a SQLite snapshot is written to the search folder, so the folder alone is the
  search (``python -m raysal.report`` reads it on any machine).
- Otherwise a SQLite file. Optuna needs a real file with working locks, so on a local folder the study is
  ``<search>/optuna.db`` itself; on a URI (``s3://…``) Optuna works on a copy on the driver's disk
  (``cache_dir/searches/<name>/optuna.db``) and the searcher publishes it to ``<search>/optuna.db`` after every trial
  event (a consistent snapshot through SQLite's backup API, one atomic write). A driver started on a new head,
  whose disk has no copy, takes the published one.
"""

from __future__ import annotations

import logging
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

import optuna

from raysal import storage

log = logging.getLogger(__name__)
STUDY_FILE = "optuna.db"


@dataclass(frozen=True)
class StudyStore:
    search_dir: str  # the search folder on storage (local path or URI)
    name: str  # the study name: the search's name
    url: str  # what Optuna opens
    working: str | None  # the SQLite file Optuna writes; None when the study is in a team database

    @property
    def home(self) -> str:
        """The study's copy in the search folder: what a restart on a new head and the report read."""
        return storage.join(self.search_dir, STUDY_FILE)

    @property
    def in_database(self) -> bool:
        return self.working is None

    @property
    def published_separately(self) -> bool:
        """The SQLite working copy is not the search folder's file itself (a URI search folder)."""
        return self.working is not None and not storage.same_place(self.working, self.home)

    def describe(self) -> str:
        """Where the study is, for the console (a database URL without its password)."""
        if self.in_database:
            return redact(self.url)
        return self.home

    def fetch(self) -> bool:
        """Before a restored search opens the study: a driver whose disk has no working copy (a new or wiped head)
        takes the one published in the search folder. True if it copied one."""
        if not self.published_separately or Path(self.working).exists():
            return False
        if not storage.is_file(self.home):
            return False
        storage.download(self.home, self.working)
        log.info("the Optuna study was restored from %s", self.home)
        return True

    def discard_working_copy(self) -> None:
        """A search that starts over must not inherit a working copy left by an earlier search of that name."""
        if self.published_separately and Path(self.working).exists():
            Path(self.working).unlink()

    def publish(self, *, final: bool = False) -> None:
        """Write the study to ``<search>/optuna.db``: the SQLite working copy after every trial event; a database's
        study as a SQLite snapshot at the end of the search (``final``)."""
        if self.in_database:
            if final:
                self._snapshot_database()
            return
        if not self.published_separately or not Path(self.working).exists():
            return
        with tempfile.TemporaryDirectory(prefix="raysal-study-") as tmp:
            snap = Path(tmp) / STUDY_FILE
            src, dst = sqlite3.connect(self.working), sqlite3.connect(snap)
            try:
                src.backup(dst)  # consistent even while Optuna holds connections to the working copy
            finally:
                src.close()
                dst.close()
            storage.write_bytes(self.home, snap.read_bytes())

    def _snapshot_database(self) -> None:

        with tempfile.TemporaryDirectory(prefix="raysal-study-") as tmp:
            snap = Path(tmp) / STUDY_FILE
            optuna.copy_study(from_study_name=self.name, from_storage=self.url, to_storage=f"sqlite:///{snap}")
            storage.write_bytes(self.home, snap.read_bytes())


def redact(url: str) -> str:
    """``postgresql://user:secret@host/db`` → ``postgresql://user:***@host/db``."""
    head, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    cred, _, host = rest.rpartition("@")
    user = cred.split(":", 1)[0]
    return f"{head}://{user}:***@{host}" if ":" in cred else url


def study_store(search_dir: str, name: str, database: str | None, cache_dir: str) -> StudyStore:
    """The study of the search in ``search_dir``: in ``database`` if given, else a SQLite file (see the module)."""
    if database:
        return StudyStore(search_dir, name, database, None)
    local = storage.local_path(search_dir)
    working = local / STUDY_FILE if local is not None else Path(cache_dir).expanduser() / "searches" / name / STUDY_FILE
    working.parent.mkdir(parents=True, exist_ok=True)
    return StudyStore(search_dir, name, f"sqlite:///{working}", str(working))


# The study of the search this driver runs, set before `Tuner.restore`: a restored searcher re-opens its study
# here (its pickled storage may name another head's disk). See `ReasonedOptunaSearch.restore`.
active: StudyStore | None = None
