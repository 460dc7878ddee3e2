"""The memory model (`scripts/memory_model.py`) against the exact live-tensor peak of a step of a small fp32 model:
if the step's memory changes (a new copy in the capture, a criterion that keeps more), the model is stale."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))

from bench_attention import PRESETS, SMALL_VISION, Preset, run_one
from memory_model import Shapes, predict

MICRO = Preset("llava", {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096},
               SMALL_VISION, batch=2, caption_tokens=64)  # fmt: skip


@pytest.mark.parametrize("method", ["plain_sdpa", "capture_kl_2layers", "seed_eager", "evaluation"])
def test_memory_model_predicts_the_measured_peak(method, monkeypatch):
    monkeypatch.setitem(PRESETS, "micro", MICRO)
    r = run_one("micro", method, reps=1, warmup=1, device_name="cpu", checkpointing=True)
    t = MICRO.text
    s = Shapes(MICRO.batch, r["tokens"] // MICRO.batch, r["image_tokens"], r["grounded_tokens"], t["hidden_size"],
               t["intermediate_size"], t["num_hidden_layers"], t["num_attention_heads"], t["num_key_value_heads"],
               t["vocab_size"], dtype_bytes=4)  # fmt: skip
    predicted = predict(s, method)["peak"]
    assert abs(predicted / r["peak_tensor_bytes"] - 1) <= 0.15, (predicted, r["peak_tensor_bytes"])
