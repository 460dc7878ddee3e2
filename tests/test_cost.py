"""What a trial and a search cost (`raysal.search.cost`): hours from the seconds a run reports, the search's sum,
the words the verdict and the table use."""

import pytest

from raysal.search.cost import cost_text, hours, search_cost, trial_cost
from raysal.search.verdict import summary_values, trials_table, verdict


def test_hours_count_every_device_a_run_holds():
    assert hours(3000.0, 600.0, workers=4, gpus_per_worker=1.0) == {"cost/gpu_hours": 4.0, "cost/worker_hours": 4.0}
    assert hours(1800.0, 0.0, workers=2, gpus_per_worker=0.0) == {"cost/gpu_hours": 0.0, "cost/worker_hours": 1.0}


def test_a_trial_cost_and_the_search_sum_failed_trials_included():
    a = trial_cost({"cost/train_s": 300.0, "cost/eval_s": 100.0, "cost/gpu_hours": 0.5, "cost/worker_hours": 0.5})
    assert a == {"train_s": 300.0, "eval_s": 100.0, "eval_fraction": 0.25, "gpu_hours": 0.5, "worker_hours": 0.5}
    assert trial_cost({"val/amr": 1.0}) is None  # never reached an evaluation
    b = trial_cost({"cost/train_s": 100.0, "cost/eval_s": 0.0, "cost/gpu_hours": 0.25})
    total = search_cost([a, None, b])
    assert total["trials"] == 2 and total["gpu_hours"] == 0.75 and total["eval_fraction"] == pytest.approx(0.2)
    assert cost_text(total, search=True) == "the search cost 0.75 GPU-h (evaluation 20%) over 2 trial(s)"
    cpu = search_cost([trial_cost({"cost/train_s": 90.0, "cost/eval_s": 10.0, "cost/worker_hours": 0.03})])
    assert cost_text(cpu) == "0.03 CPU worker-h (evaluation 10%)"


def _summary() -> dict:
    cost = {"train_s": 300.0, "eval_s": 100.0, "eval_fraction": 0.25, "gpu_hours": 0.5, "worker_hours": 0.5}
    rows = [
        {"trial_id": "t_best", "control": False, "metrics": {"val/amr": 2.0, "val/lm_loss": 1.0}, "cost": cost},
        {"trial_id": "t_ctl", "control": True, "metrics": {"val/amr": 1.0, "val/lm_loss": 1.0}, "cost": cost},
    ]
    return {"metric": "val/amr", "rows": rows, "control": "t_ctl", "best": {"trial_id": "t_best"},
            "cost": search_cost([cost, cost])}  # fmt: skip


def test_the_verdict_the_wandb_values_and_table_carry_the_cost():
    summary = _summary()
    assert verdict(summary).endswith("; the search cost 1 GPU-h (evaluation 25%) over 2 trial(s)")
    values = summary_values(summary)
    assert values["search/cost/gpu_hours"] == 1.0 and values["search/cost/eval_fraction"] == 0.25
    columns, data = trials_table(summary)
    assert data[0][columns.index("cost/gpu_hours")] == 0.5 and data[1][columns.index("cost/eval_s")] == 100.0
