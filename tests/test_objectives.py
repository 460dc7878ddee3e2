"""What an objective may name: the metrics a run reports, POPE's and the readout's included while they are on —
for a run (`trainer.objective.metric`) and for a search's objectives, multi-objective included."""

from __future__ import annotations

from pathlib import Path

import pytest

from raysal.orchestration.train.compose import compose_cfg
from raysal.orchestration.train.errors import ConfigError
from raysal.orchestration.train.spec import objective_metrics, spec_from_cfg

DEMO = ["experiment=demo"]


@pytest.mark.parametrize("metric", ["val/pope/adversarial/f1", "val/pope/random/fpr", "val/rec_miou", "val/amr"])
def test_a_run_may_rank_its_checkpoints_by_pope_and_the_readout(metric):
    spec = spec_from_cfg(compose_cfg([*DEMO, f"trainer.objective.metric={metric}"]))
    assert spec.objective["metric"] == metric


UNREPORTED = [
    ("val/pope/adversarial/f1", "trainer.pope.images=0"),
    ("val/rec_acc50", "trainer.readout.images=0"),
    ("val/pope/adversarial/n", None),  # a count, not an objective
    ("val/pope/sideways/f1", None),
]


@pytest.mark.parametrize(("metric", "off"), UNREPORTED)
def test_an_objective_the_run_does_not_report_is_refused(metric, off):
    overrides = [*DEMO, f"trainer.objective.metric={metric}", *([off] if off else [])]
    with pytest.raises(ConfigError, match=r"trainer\.objective\.metric=.*not a reported metric"):
        spec_from_cfg(compose_cfg(overrides))


def test_the_reported_set_follows_the_switches():
    on = {"pope": {"images": 4}, "readout": {"images": 2}}
    off = {"pope": {"images": 0}, "readout": {"images": 0}}
    assert {"val/pope/popular/auroc", "val/rec_acc50"} <= objective_metrics([], on)
    assert not any(m.startswith(("val/pope", "val/rec")) for m in objective_metrics([], off))


def test_a_search_may_trade_grounding_against_hallucination(tmp_path, monkeypatch):
    """Two objectives, val/amr up and POPE's false-positive rate down: every check of the search passes (up to the
    storage/model/data checks, stopped here)."""
    import raysal.orchestration.train.preflight as preflight
    from raysal.orchestration.tune.prepare import prepare_search

    class Checked(Exception):
        pass

    def stop(*_a, **_k):
        raise Checked

    monkeypatch.setattr(preflight, "preflight", stop)
    space = tmp_path / "space.yaml"
    space.write_text(
        "name: two\nobjectives:\n  - {metric: val/amr, mode: max}\n  - {metric: val/pope/adversarial/fpr, mode: min}\n"
        "num_samples: 2\nscheduler: {type: fifo}\n"
        "resources: {num_workers: 1, use_gpu: false, cpus_per_worker: 1, gpus_per_worker: 0}\n"
        "space:\n  optim.lr: {loguniform: [1.0e-3, 1.0e-2]}\n"
    )
    with pytest.raises(Checked):
        prepare_search(Path(space), [*DEMO, f"storage_path={tmp_path}/runs"])
    with pytest.raises(Exception, match="is not reported"):
        prepare_search(Path(space), [*DEMO, f"storage_path={tmp_path}/runs", "trainer.pope.images=0"])
