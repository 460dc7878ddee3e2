"""The finalists' stage (`raysal.search.finalists`): which runs confirm a finalist, and its matched controls — the
finalist's config with the alignment criteria removed and nothing else changed."""

from __future__ import annotations

from omegaconf import OmegaConf

from raysal.orchestration.train.compose import compose_cfg
from raysal.search.finalists import FINALIST, MATCHED_CONTROL, Arm, arms, matched_overrides
from raysal.search.optuna_params import param_name

# a trial's Tune config as Optuna names it: a conditional weight under its criterion, the rest flat
PARAMS = {
    "criterion@criteria.align": "mse",
    param_name((("criterion@criteria.align", "mse"),), "criteria.align.weight"): 19.5,
    "criteria.align.heads": "all",
    "criteria.align.query_offset": -1,
    "criterion@criteria.base": "cal",
    "lora.rank": 64,
    "lora.targets": "qkvo",
    "optim.lr": 0.0028,
}
CONTROL = ("~criterion@criteria.align",)


def test_the_matched_control_drops_what_the_control_removes_and_keeps_the_rest():
    got = matched_overrides(PARAMS, CONTROL)
    assert got == ["criterion@criteria.base=cal", "lora.rank=64", "lora.targets=qkvo", "optim.lr=0.0028",
                   "~criterion@criteria.align"]  # fmt: skip
    # a control that also resets the base criterion drops its sampled value too
    assert "criterion@criteria.base=cal" not in matched_overrides(PARAMS, (*CONTROL, "criterion@criteria.base=lm"))


def test_the_stage_reuses_the_search_run_and_pairs_every_seed():
    got = arms([("t1", PARAMS)], CONTROL, seeds=3, first_seed=0)
    assert [(a.role, a.seed, a.reuse) for a in got] == [
        (FINALIST, 0, "t1"), (MATCHED_CONTROL, 0, None), (FINALIST, 1, None), (MATCHED_CONTROL, 1, None),
        (FINALIST, 2, None), (MATCHED_CONTROL, 2, None),
    ]  # fmt: skip
    assert all(a.overrides[-1] == f"seed={a.seed}" for a in got)
    assert got[2].overrides[:-1] == got[0].overrides[:-1]  # the finalist's own config at another seed
    assert Arm.from_config(got[3].as_config()) == got[3] and got[3].key == "t1/matched-control/seed1"


def test_composed_the_matched_control_differs_from_the_finalist_only_in_its_alignment_criterion():
    base = ["experiment=demo", "trainer.max_steps=24"]
    finalist, control = (arms([("t1", PARAMS)], CONTROL, seeds=2, first_seed=5)[i] for i in (2, 3))
    a = OmegaConf.to_container(compose_cfg([*base, *finalist.overrides]), resolve=True)
    b = OmegaConf.to_container(compose_cfg([*base, *control.overrides]), resolve=True)
    assert a["criteria"].pop("align")["_target_"] == "raysal.criteria.mse.MSECriterion"
    assert "_target_" not in b["criteria"].pop("align")
    for c in (a, b):
        c.pop("name")  # a timestamp
    assert a == b and a["seed"] == 6 and a["optim"]["lr"] == 0.0028 and a["lora"]["rank"] == 64
