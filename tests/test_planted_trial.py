"""The hallucination guard biting on real answers (issue 30): on the demo's base and data, a search's end is given
three trials that left their evaluation records in their checkpoints — the LM-only control (LoRA, trained as the
demo trains it), an unchanged copy of it, and a planted trial whose LoRA also learned to answer "Yes" to every
"Is there a ... in the image?" — and judges them with the guards `search_spaces/criteria.yaml` gives the demo. The
copy passes; the planted trial, though its grounding is no worse, is excluded by the FPR guard with its interval. The
control's own answers are the ones the README's demo relies on: F1 ≥ 0.7, yes-ratio within 0.3-0.7, ≥ 60 questions
per setting on the selection images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf
from search_space_files import minimal, write

from raysal.batch import PixelNorm
from raysal.criteria.lm import LMCriterion
from raysal.data.decode import decode_row
from raysal.data.holdout import Holdout
from raysal.data.pope_set import select_pope
from raysal.data.shards import shard_paths, write_shards
from raysal.data.synthetic import THINGS, generate
from raysal.demo.base import make_demo_base
from raysal.loop.fit import FitConfig, fit
from raysal.loop.pope_eval import pope_scores
from raysal.metrics.pope import question_text
from raysal.model.build import apply_lora, load_model, load_processor
from raysal.preprocess.batches import batch_factory, encode_row
from raysal.preprocess.encode import encode_sample
from raysal.search.optuna_params import CONTROL_KEY
from raysal.search.space_file import load_search_space

ROOT = Path(__file__).resolve().parents[1]
SELECT = Holdout(confirm=0.5)  # the demo's selection half of val2017 (configs/data/synthetic.yaml)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's base (shipped: copied) and its data (192 coded images, seed 0), as `experiment=demo` makes them."""
    tmp = tmp_path_factory.mktemp("planted")
    made = OmegaConf.load(ROOT / "configs" / "model" / "tiny-captioned.yaml").captioned
    base = make_demo_base(tmp / "base", "llava", steps=made.steps, lr=made.lr, seed=made.seed, patch=made.patch,
                          images=made.images)  # fmt: skip
    generate(tmp / "root", images=192, seed=0, max_side=320, palette="coded")
    write_shards(tmp / "root", tmp / "shards")
    return base, tmp / "shards"


def _rows(shards: Path, split: str, keep=None) -> list[dict]:
    fs, files = shard_paths(str(shards), split)
    rows = [decode_row(r) for f in files for r in pq.read_table(f, filesystem=fs).to_pylist()]
    return [r for r in rows if keep is None or keep(r["image_id"])]


def _always_yes(rows: list[dict], processor) -> list[dict]:
    """Every shape asked about every image, answered "Yes": the planted hallucination."""
    out = []
    for r in rows:
        for name in THINGS.values():
            s = encode_sample(r["image"], r["segment_map"], "Yes", [], r["segment_ids"], processor,
                              question_text(name))  # fmt: skip
            s["image_id"] = np.asarray(r["image_id"], np.int64)
            out.append(s)
    return out


def _trial(base: Path, shards: Path, folder: Path, *, yes: bool, save: Path | None = None) -> dict[str, float]:
    """LoRA r=16 all-linear + the projector, 24 steps at lr 3e-3 on the demo's captions (the demo's control);
    ``yes``: the "Yes" answers mixed in. Evaluated as a trial is (records into its checkpoint under ``folder``);
    ``save``: the LoRA merged into the base, written there as a model folder transformers loads alone."""
    proc = load_processor(str(base))
    train_rows = _rows(shards, "train2017")
    train = [encode_row(r, proc) for r in train_rows] + (_always_yes(train_rows, proc) if yes else [])
    val = [encode_row(r, proc) for r in _rows(shards, "val2017", SELECT.keeps)]
    pope = select_pope(str(shards), "val2017", holdout=SELECT, images=64)
    pad, px = proc.tokenizer.pad_token_id, PixelNorm.from_processor(proc)

    def pope_eval(core, protocol, autocast, records) -> dict[str, float]:
        return pope_scores(core, proc, pope, device="cpu", records=records)

    torch.manual_seed(0)
    model = apply_lora(load_model(str(base), dtype="float32"), rank=16, alpha=32, targets="all-linear",
                       train_projector=True)  # fmt: skip
    cfg = FitConfig(max_steps=24, lr=3e-3, warmup_steps=4, eval_every=24, seed=0, bf16=False)
    metrics = fit(model, [LMCriterion()], batch_factory(train, 8, pad, px, seed=0),
                  lambda: batch_factory(val, 8, pad, px, shuffle=False)(0), cfg, checkpoint_dir=folder,
                  extra_eval=pope_eval)  # fmt: skip
    if save is not None:
        model.merge_and_unload().save_pretrained(save)
        proc.save_pretrained(save)
    return metrics


def test_a_planted_yes_trial_is_excluded_by_the_guard_and_a_copy_of_the_control_passes(demo, tmp_path, monkeypatch):
    import ray.train

    from raysal.orchestration.tune.summary import summarise

    base, shards = demo
    control = _trial(base, shards, tmp_path / "trials" / "c", yes=False)
    print({k: round(v, 3) for k, v in control.items() if "adversarial" in k or k in ("val/amr", "val/lm_loss")})
    assert control["val/pope/adversarial/n"] >= 60, control
    assert control["val/pope/adversarial/f1"] >= 0.7, control
    assert 0.3 <= control["val/pope/adversarial/yes_ratio"] <= 0.7, control
    shutil.copytree(tmp_path / "trials" / "c", tmp_path / "trials" / "same")  # an unchanged copy of the control
    planted = _trial(base, shards, tmp_path / "trials" / "yes", yes=True)
    print({k: round(v, 3) for k, v in planted.items() if "adversarial" in k or k in ("val/amr", "val/lm_loss")})

    guards = load_search_space(ROOT / "search_spaces" / "criteria.yaml", profile="demo").control
    margins = {g.metric: g.max_loss for g in guards.guards}
    spec = load_search_space(write(tmp_path, minimal(control={"lm_tolerance": 1.0, "guards": margins})))
    grid = []
    for trial, metrics in (("c", control), ("same", control), ("yes", planted)):
        metrics = {**metrics, "trial_id": trial}
        config = {CONTROL_KEY: True} if trial == "c" else {"x": 1}
        grid.append(SimpleNamespace(metrics=metrics, config=config, error=None, path=str(tmp_path / "trials" / trial)))

    def train_run(path):  # each trial's Train run: its checkpoint (records inside), nothing exported
        folder = next(Path(path).glob("step_*"))
        return SimpleNamespace(get_best_checkpoint=lambda *a: None, checkpoint=SimpleNamespace(path=str(folder)))

    monkeypatch.setattr(ray.train.Result, "from_path", staticmethod(train_run))
    summary = summarise(grid, spec, [], str(tmp_path))
    assert summary["rule"] == "paired", summary
    assert set(summary["failed_guards"]) == {"yes"}, summary["failed_guards"]
    fpr = summary["paired"]["yes"]["val/pope/adversarial/fpr"]
    assert fpr["lo"] > margins["val/pope/adversarial/fpr"], fpr  # worse beyond the margin, interval and all
    same = summary["paired"]["same"]["val/pope/adversarial/fpr"]
    assert same["estimate"] == same["lo"] == same["hi"] == 0, same  # the control's own answers
    yes = next(line for line in summary["table"].splitlines() if "| yes |" in line)
    assert "(guard: val/pope/adversarial/fpr)" in yes and f"[+{fpr['lo']:.3f}, +{fpr['hi']:.3f}]" in yes, yes


@pytest.mark.slow  # ~3 min: a real search of two trials, after the default suite (.ci/run)
@pytest.mark.integration
def test_a_search_excludes_a_planted_yes_trial_by_its_guard(demo, tmp_path):
    """The same exclusion in a real search (`python -m raysal.tune` on a local Ray, experiment=demo): the LM-only
    control on the demo base, and one sampled trial that aligns attention on a base that learned to say "Yes"
    (the planted LoRA merged: a trial over a different base model, as a search over bases would run it). The search
    evaluates both on the same POPE questions, pairs them, and its verdict excludes the planted trial by the FPR
    guard with its interval; the console, summary.json and the report's hallucination plane say so."""
    from entrypoint_runs import run

    base, shards = demo
    planted = tmp_path / "yes_base"
    _trial(base, shards, tmp_path / "yes_trial", yes=True, save=planted)
    margins = {g.metric: g.max_loss for g in
               load_search_space(ROOT / "search_spaces" / "criteria.yaml", profile="demo").control.guards}  # fmt: skip
    space = tmp_path / "planted.yaml"
    space.write_text(
        "name: planted\nobjectives: [{metric: val/amr, mode: max}]\nnum_samples: 1\nmax_concurrent_trials: 1\n"
        f"control: {{lm_tolerance: 1.0, guards: {json.dumps(margins)}}}\n"  # only the guards may exclude
        "scheduler: {type: asha, time_attr: train/step, max_t: 8, grace_period: 8, reduction_factor: 2}\n"
        "resources: {num_workers: 1, use_gpu: false, cpus_per_worker: 1, gpus_per_worker: 0}\n"
        "base_overrides: [model=tiny-captioned, trainer.max_steps=8, trainer.eval_every=8]\n"
        "space:\n  criterion@criteria.align: {choice: [kl]}\n"
        f"  model.name_or_path: {{choice: ['{planted}']}}\n  model.tiny: {{choice: [null]}}\n"
    )
    res = run(["raysal.tune", str(space), "experiment=demo", f"storage_path={tmp_path / 'runs'}"], tmp_path / "cache",
              timeout=1200)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "planted" / "summary.json").read_text())
    (trial,) = [r["trial_id"] for r in summary["rows"] if not r["control"]]
    assert summary["rule"] == "paired" and set(summary["failed_guards"]) == {trial}, summary["failed_guards"]
    assert "val/pope/adversarial/fpr" in summary["failed_guards"][trial], summary["failed_guards"]
    fpr = summary["paired"][trial]["val/pope/adversarial/fpr"]
    assert fpr["lo"] > margins["val/pope/adversarial/fpr"], fpr  # worse beyond the margin, interval and all
    assert summary["best"]["trial_id"] == summary["control"], summary["best"]
    control = next(r for r in summary["rows"] if r["control"])["metrics"]
    assert control["val/pope/adversarial/n"] >= 60 and control["val/pope/adversarial/f1"] >= 0.7, control
    line = (f"guard val/pope/adversarial/fpr (non-inferiority: higher than the control by at most "
            f"{margins['val/pope/adversarial/fpr']:g}, on the paired 95 % interval's bound): control "
            f"{control['val/pope/adversarial/fpr']:.4g}; failed by {trial}")  # fmt: skip
    assert line in res.stdout, res.stdout[-3000:]
    assert (tmp_path / "runs" / "planted" / "report" / "hallucination.png").stat().st_size > 10_000
