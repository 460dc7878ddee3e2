"""One plain console line per trial event."""

from __future__ import annotations

from types import SimpleNamespace

from raysal.orchestration.train.fail_reason import write_reason
from raysal.orchestration.tune.progress import ProgressLines


def _trial(tid: str, config: dict, last: dict | None = None):
    return SimpleNamespace(trial_id=tid, config=config, last_result=last or {}, get_error=lambda: "boom\nmore")


def test_lines_for_start_eval_asha_stop_finish_and_failure(tmp_path, capsys):
    p = ProgressLines("val/amr", "train/step", 24, str(tmp_path))
    p.on_trial_start(0, [], _trial("a1", {"raysal_control": True}))
    p.on_trial_start(0, [], _trial("b2", {"optim.lr": 0.003}))
    p.on_trial_result(0, [], _trial("b2", {}), {"train/step": 8.0, "train/loss": 6.4})  # no evaluation: silent
    p.on_trial_result(0, [], _trial("b2", {}), {"train/step": 8.0, "val/amr": 1.0101, "val/lm_loss": 5.69,
                                                  "train/loss": 6.47, "train/sec_per_step": 11.94})  # fmt: skip
    p.on_trial_complete(0, [], _trial("b2", {}, {"train/step": 8.0, "val/amr": 1.01}))
    p.on_trial_complete(0, [], _trial("a1", {}, {"train/step": 24.0, "val/amr": 1.02}))
    write_reason(str(tmp_path / "c3"), "diverged: val/lm_loss 10.4 >= 0.98 x ln(V) at step 16")
    p.on_trial_error(0, [], _trial("c3", {}))
    p.on_trial_error(0, [], _trial("d4", {}))
    assert capsys.readouterr().out.splitlines() == [
        "raysal: trial a1 started: the LM-only control",
        "raysal: trial b2 started: optim.lr=0.003",
        "raysal: trial b2 step 8: val/amr 1.01  val/lm_loss 5.69  train/loss 6.47  (11.9 s/step)",
        "raysal: trial b2 stopped early by ASHA at train/step 8 (max_t 24)",
        "raysal: trial a1 finished at step 24: val/amr 1.02",
        "raysal: trial c3 failed: diverged: val/lm_loss 10.4 >= 0.98 x ln(V) at step 16",
        "raysal: trial d4 failed: boom",
    ]
