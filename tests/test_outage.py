"""A storage outage during a run is ridden out (`raysal.orchestration.train.outage`): the run is fitted again once
the storage answers; any other failure is raised at once. The whole path — storage cut while a run reports on a
multi-node cluster — is in tests/test_cluster.py."""

from __future__ import annotations

import threading
import time

import pytest

from raysal import storage
from raysal.orchestration.train.outage import fit_through_outages, is_storage_outage


def _fits(*outcomes):
    """A fake ``fit``: raises or returns each outcome in turn; ``calls`` counts them."""
    it = iter(outcomes)

    def fit():
        fit.calls += 1
        out = next(it)
        if isinstance(out, BaseException):
            raise out
        return out

    fit.calls = 0
    return fit


def test_a_storage_error_is_retried_and_any_other_error_is_not(tmp_path, capsys):
    aws = OSError(
        "When completing multiple part upload for key 'r/checkpoint_manager_snapshot.json': AWS Error "
        "NETWORK_CONNECTION during CompleteMultipartUpload operation: curlCode: 7"
    )
    wrapped = RuntimeError("Training failed")
    wrapped.__cause__ = aws
    fit = _fits(wrapped, "result")
    assert fit_through_outages(fit, str(tmp_path), poll_s=0.01) == "result" and fit.calls == 2
    err = capsys.readouterr().err
    assert "failed during the run (When completing multiple part upload" in err and "(attempt 2 of 3)" in err

    fit = _fits(ValueError("a real bug"), "never")
    with pytest.raises(ValueError, match="a real bug"):
        fit_through_outages(fit, str(tmp_path), poll_s=0.01)
    assert fit.calls == 1

    fit = _fits(aws, aws, aws, "never")  # bounded: the third outage fails the run with its error
    with pytest.raises(OSError, match="AWS Error"):
        fit_through_outages(fit, str(tmp_path), attempts=3, poll_s=0.01)
    assert fit.calls == 3


def test_the_run_waits_until_the_storage_answers_again(s3_server):
    """Storage unreachable (moto's server behind a cut proxy): the failure counts as an outage even when its text
    names none, and the next fit starts only once the bucket answers."""
    run_dir = s3_server.new_prefix()
    storage.write_text(storage.join(run_dir, "x.txt"), "x")
    cut, reopening = threading.Event(), []

    def outage() -> None:
        with s3_server.outage():
            cut.set()
            time.sleep(10)
            reopening.append(time.monotonic())

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    cut.wait(30)
    started: list[float] = []

    def fit():
        started.append(time.monotonic())
        if len(started) == 1:
            raise RuntimeError("the controller died")
        return "done"

    assert fit_through_outages(fit, run_dir, poll_s=0.2, wait_s=120) == "done"
    thread.join(30)
    assert len(started) == 2 and started[1] >= reopening[0]
    assert not is_storage_outage(RuntimeError("the controller died"), run_dir)  # storage answers, no storage words
    lost_node = RuntimeError("ActorUnavailableError: Failed to connect to remote host: Connection refused")
    assert not is_storage_outage(lost_node, run_dir)  # Ray's own connection errors are no storage outage
