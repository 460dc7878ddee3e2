"""The training core is plain PyTorch/transformers/peft: importing it loads neither Ray, Hydra nor W&B (those live
in the entry points and `raysal.orchestration`)."""

import subprocess
import sys

CORE = [
    "raysal.batch", "raysal.preprocess.encode", "raysal.preprocess.collate", "raysal.preprocess.batches",
    "raysal.model.build", "raysal.model.shard", "raysal.model.align_connector", "raysal.attention.capture",
    "raysal.attention.head_scores", "raysal.criteria.kl", "raysal.criteria.cal", "raysal.metrics.grounding",
    "raysal.loop.step", "raysal.loop.evaluate", "raysal.loop.fit", "raysal.loop.checkpoint",
    "raysal.distributed", "raysal.probes.phrase_maps", "raysal.metrics.pope", "raysal.metrics.localization",
    "raysal.loop.pope_eval", "raysal.loop.readout_eval", "raysal.data.pope_set",
]  # fmt: skip


def test_training_core_imports_no_ray_hydra_wandb():
    code = "import sys\n" + "".join(f"import {m}\n" for m in CORE)
    code += "print(sorted({'ray', 'hydra', 'wandb'} & {m.split('.')[0] for m in sys.modules}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
