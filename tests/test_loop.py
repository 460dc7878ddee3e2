"""fit(): reports, checkpoints, exact resume, schedule, errors."""

import pytest
import torch
from peft import PeftModel

from raysal.batch import PixelNorm
from raysal.criteria.kl import KLCriterion
from raysal.criteria.lm import LMCriterion
from raysal.loop.checkpoint import ADAPTER, STATE, load_history
from raysal.loop.fit import FitConfig, fit
from raysal.loop.schedule import warmup_cosine
from raysal.loop.step import NonFiniteLossError
from raysal.model.build import apply_lora, load_model, load_processor
from raysal.preprocess.batches import batch_factory, load_encoded


@pytest.fixture(scope="module")
def data(tiny_llava, small_shards):
    return _data(tiny_llava, small_shards)


def _data(tiny_llava, small_shards):
    proc = load_processor(str(tiny_llava))
    train = load_encoded(small_shards, "train2017", proc, limit=12)
    val = load_encoded(small_shards, "val2017", proc, limit=4)
    pad, px = proc.tokenizer.pad_token_id, PixelNorm.from_processor(proc)
    val_batches = lambda: batch_factory(val, 4, pad, px, shuffle=False)(0)  # noqa: E731
    return tiny_llava, batch_factory(train, 4, pad, px, seed=1), val_batches


def fresh(ckpt):
    torch.manual_seed(0)
    return apply_lora(load_model(str(ckpt), dtype="float32"), rank=4, targets="qv", train_projector=True)


CRITERIA = [LMCriterion(), KLCriterion(weight=0.5, layers="late")]


def cfg(**kw):
    base = {"max_steps": 6, "lr": 1e-3, "warmup_steps": 2, "eval_every": 3, "grad_accum": 2, "seed": 3}
    return FitConfig(**{**base, **kw})


def test_reports_namespaced_metrics_and_loadable_checkpoints(data, tmp_path):
    ckpt, train, val = data
    reports = []
    model = fresh(ckpt)
    fit(model, CRITERIA, train, val, cfg(), report=lambda m, p: reports.append((m, p)), checkpoint_dir=tmp_path)
    assert [m["train/step"] for m, _ in reports] == [3.0, 6.0]
    m, path = reports[-1]
    for key in ("train/loss", "train/loss/lm", "train/loss/kl", "train/lr", "train/grad_norm",
                "val/lm_loss", "val/amr", "val/ap", "val/nss", "val/pointing", "cost/train_s",
                "cost/eval_s"):  # fmt: skip
        assert key in m and m[key] == m[key], key  # present and not NaN
    # what the run has cost: cumulative wall seconds, training and evaluating, both growing
    (first, _), (last, _) = reports
    assert 0 < first["cost/train_s"] < last["cost/train_s"] and 0 < first["cost/eval_s"] < last["cost/eval_s"]
    assert (path / STATE).exists() and (path / ADAPTER / "adapter_config.json").exists()
    base = load_model(str(ckpt), dtype="float32")
    loaded = PeftModel.from_pretrained(base, path / ADAPTER)
    trained = {n: p for n, p in model.named_parameters() if "lora_A" in n}
    for n, p in loaded.named_parameters():
        if n in trained:
            assert torch.equal(p, trained[n]), n


@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl", "qwen3_vl"])
def test_resume_continues_exactly(arch, tiny_of, small_shards, tmp_path):
    ckpt, train, _ = _data(tiny_of(arch), small_shards)
    straight = fresh(ckpt)
    ref = fit(straight, CRITERIA, train, None, cfg(eval_every=3), checkpoint_dir=tmp_path / "a")

    first = fresh(ckpt)
    fit(first, CRITERIA, train, None, cfg(max_steps=6, eval_every=3), checkpoint_dir=tmp_path / "b",
        report=lambda m, p: None)  # fmt: skip
    # a new process: fresh model, resume from the step-3 checkpoint, run to the end
    resumed = fresh(ckpt)
    torch.manual_seed(12345)  # whatever the caller's RNG, the checkpoint's RNG state wins
    out = fit(resumed, CRITERIA, train, None, cfg(eval_every=3), resume_from=tmp_path / "b" / "step_0000003",
              checkpoint_dir=tmp_path / "c")  # fmt: skip
    assert out["train/loss"] == pytest.approx(ref["train/loss"], rel=1e-6)
    # each checkpoint carries every row reported up to it, the rows of the run it resumed included
    assert [r["train/step"] for r in load_history(tmp_path / "b" / "step_0000003")] == [3.0]
    history = load_history(tmp_path / "c" / "step_0000006")
    assert [r["train/step"] for r in history] == [3.0, 6.0] and history[1]["train/loss"] == out["train/loss"]
    # the cost continues from the checkpoint's: the resumed run's seconds add to the first part's
    assert out["cost/train_s"] > history[0]["cost/train_s"] > 0
    for (n, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        if p.requires_grad:
            assert torch.allclose(p, q, atol=1e-7), n


def test_non_finite_stops_the_run(data):
    ckpt, train, _ = data

    class Broken(LMCriterion):
        def __call__(self, x):
            return super().__call__(x) * float("nan")

    with pytest.raises(NonFiniteLossError, match="step 0: loss term 'lm'"):
        fit(fresh(ckpt), [Broken()], train, None, cfg())


def test_schedule_warmup_then_cosine():
    assert [round(warmup_cosine(s, 2, 6), 6) for s in range(6)] == [0.5, 1.0, 1.0, 0.853553, 0.5, 0.146447]
    assert warmup_cosine(6, 2, 6) == 0.0 and warmup_cosine(6, 2, 6, min_ratio=0.1) == pytest.approx(0.1)


def test_bad_config_fails_early():
    with pytest.raises(ValueError, match="max_steps"):
        FitConfig(max_steps=0)


def test_evaluation_with_nothing_to_measure_is_an_error(data):
    """No validation image, or no grounded token in them: an error, never val/lm_loss 0.0 or a NaN objective."""
    from raysal.attention.capture import CapturePlan, enable_capture
    from raysal.loop.evaluate import EvaluationError, evaluate
    from raysal.model.build import model_info

    ckpt, _, val = data
    model = fresh(ckpt)
    enable_capture(model)
    info = model_info(model)
    protocol = CapturePlan(tuple(range(info.n_layers)), tuple(range(info.n_heads)))
    assert evaluate(model, val(), protocol)["tokens"] > 0
    with pytest.raises(EvaluationError, match="0 image"):
        evaluate(model, iter([]), protocol)
    untag = {"token_segments": -1, "grounded_pos": -1}  # no tag anywhere
    blind = [{**b, **{k: torch.full_like(b[k], v) for k, v in untag.items()}} for b in val()]
    with pytest.raises(EvaluationError, match="0 grounded token"):
        evaluate(model, blind, protocol)


class _FakeRun:
    """A W&B run as `relog` sees it: ``step`` is the next step the run accepts (after its last row on resume)."""

    def __init__(self, step: int) -> None:
        self.step, self.logged = step, []

    def log(self, row: dict, step: int) -> None:
        self.logged.append(step)


def test_relog_fills_only_the_steps_the_wandb_run_lacks():
    from raysal.orchestration.train.wandb_run import relog

    rows = [{"train/step": float(s), "train/loss": 1.0} for s in (2, 4, 6, 8)] + [{"fail_reason": "x"}]
    online = _FakeRun(step=5)  # W&B has steps up to 4; rows 6 and 8 were lost with the killed process
    assert relog(online, rows) == 2 and online.logged == [6, 8]
    offline = _FakeRun(step=0)  # a new offline file: everything (`wandb sync` keeps the steps the run has)
    assert relog(offline, rows) == 4 and offline.logged == [2, 4, 6, 8]
