"""A storage outage is ridden out, not a failed run: a Train run whose storage went away is run again, from its
last checkpoint, once the storage answers.

Why here: Ray Train retries a worker that fails while it uploads a checkpoint (``FailureConfig``), but the
*controller* writes its own state (the checkpoint manager's snapshot) to the run folder at every report, without
retrying: an outage then ends ``fit()`` with an error, and the run (or the search's trial) would fail although
nothing but the network was wrong. A Train run with the same name and storage resumes from its latest checkpoint,
so `fit_through_outages` waits (bounded) until the run folder answers again and calls ``fit()`` anew, saying so on
stderr; a failure while the storage answers and names no storage error is raised as before.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from raysal import storage
from raysal.orchestration.train.errors import first_line
from raysal.orchestration.train.stale_checkpoints import remove_stale_checkpoints

ATTEMPTS = 3  # fit() calls in all: two outages ridden out
WAIT_S = 600.0  # how long one outage may last before the run fails with it
POLL_S = 5.0
# how pyarrow's filesystems (S3, GCS) word a failed storage call; not Ray's own "Connection refused" (a lost node
# after Ray Train's retries is a real failure, not an outage to ride out)
MARKERS = ("AWS Error", "curlCode", "When reading", "When writing", "When completing", "When uploading",
           "When listing", "When getting information")  # fmt: skip


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def storage_answers(location: str) -> bool:
    try:
        storage.exists(location)
    except OSError:
        return False
    return True


def is_storage_outage(error: BaseException, location: str) -> bool:
    """The failure came from the storage: it does not answer now, or the error (or what it wraps) says so."""
    if not storage_answers(location):
        return True
    return any(m in str(e) for e in _chain(error) for m in MARKERS)


def wait_for_storage(location: str, wait_s: float = WAIT_S, poll_s: float = POLL_S) -> bool:
    """Poll until ``location``'s storage answers → True; False after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while not storage_answers(location):
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def fit_through_outages(fit: Callable[[], Any], run_dir: str, *, attempts: int = ATTEMPTS, wait_s: float = WAIT_S,
                        poll_s: float = POLL_S) -> Any:  # fmt: skip
    """``fit()`` (a new `TorchTrainer`'s, same name and storage) → its result; after a storage outage, once the
    storage answers, ``fit()`` again from the run's last checkpoint, up to ``attempts`` calls in all."""
    for attempt in range(1, attempts + 1):
        try:
            return fit()
        except Exception as e:
            if attempt == attempts or not is_storage_outage(e, run_dir):
                raise
            said = next((x for x in _chain(e) if any(m in str(x) for m in MARKERS)), e)  # the storage's own words
            print(f"raysal: the storage of {run_dir} failed during the run ({first_line(str(said))[:300]}); waiting up "
                  f"to {wait_s:.0f} s for it, then resuming from the last checkpoint (attempt {attempt + 1} of "
                  f"{attempts})", file=sys.stderr, flush=True)  # fmt: skip
            if not wait_for_storage(run_dir, wait_s, poll_s):
                raise
            remove_stale_checkpoints(run_dir)  # an upload the outage cut short is no checkpoint
    raise AssertionError("unreachable")
