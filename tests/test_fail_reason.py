"""A run's fail reason: written where the failure is known, read by the drivers, cleared on (re)start."""

from __future__ import annotations

import pytest

from raysal.orchestration.train.fail_reason import clear_reason, read_reason, write_reason


@pytest.mark.parametrize("uri", [False, True])
def test_write_read_clear(tmp_path, uri):
    run_dir = f"file://{tmp_path}/run" if uri else str(tmp_path / "run")
    assert read_reason(run_dir) is None
    write_reason(run_dir, "diverged: step 4: val/lm_loss 5.9 ≥ 5.8")
    assert read_reason(run_dir) == "diverged: step 4: val/lm_loss 5.9 ≥ 5.8"
    clear_reason(run_dir)
    assert read_reason(run_dir) is None
    clear_reason(run_dir)  # nothing to clear is fine
