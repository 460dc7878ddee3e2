"""The first figures a short GPU window must bring back: ``python scripts/gpu_quick.py --out DIR`` (what
``scripts/gpu_check.sh quick`` runs after the `gpu` capture test).

On the LLaVA-1.5-7B preset of `scripts/bench_attention.py` (random init, bf16, gradient checkpointing, LoRA r16 on
q/v): the plain LoRA step and the step with the KL criterion capturing 2 layers (time, peak memory, MFU), then the
plain step at micro-batch 1, 2, 4 and 8 — tokens per second per GPU, the figure that says whether several trials
should share one GPU. Then one Qwen forward: the Qwen2.5-VL-7B preset's plain LoRA step and its 2-layer capture
step (1 warm-up, 1 timed step each; a 640×480 image → 391 image tokens, M-RoPE), in the same table. Each
measurement is its own process (an out-of-memory is a result, not a crash); the JSON goes to
``DIR/gpu_quick.json``, a markdown table to stdout. Needs torch, transformers and peft only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

BENCH = Path(__file__).resolve().parent / "bench_attention.py"
PRESET = "llava-1.5-7b"
QWEN_PRESET = "qwen2.5-vl-7b"
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s (NVIDIA datasheets)


def measure(method: str, batch: int | None, reps: int, warmup: int, preset: str = PRESET) -> dict:
    cmd = [sys.executable, str(BENCH), "--preset", preset, "--method", method, "--reps", str(reps),
           "--warmup", str(warmup), "--device", "cuda"]  # fmt: skip
    if batch:
        cmd += ["--batch", str(batch)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        oom = "out of memory" in proc.stderr.lower() or "outofmemory" in proc.stderr.lower()
        return {"status": "oom" if oom else "error", "stderr": proc.stderr[-1500:], "wall_s": wall}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall}


def mfu(r: dict, peak: float | None) -> float | None:
    """4·N·tokens per step (frozen base + LoRA: forward 2N, backward 2N for activation gradients)."""
    if r.get("status") != "ok" or not peak:
        return None
    return 4 * (r["lm_params"] + r["vision_params"]) * r["tokens"] / r["median_s"] / peak


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/gpu_quick.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args(argv)
    import torch

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    runs = {m: measure(m, None, args.reps, args.warmup) for m in ("plain_sdpa", "capture_kl_2layers")}
    runs.update({f"plain_sdpa_batch{b}": measure("plain_sdpa", b, args.reps, args.warmup) for b in (1, 2, 4, 8)})
    # one Qwen forward: its plain step and its capture step, one timed step each
    for m in ("plain_sdpa", "capture_kl_2layers"):
        runs[f"{QWEN_PRESET}/{m}"] = measure(m, None, 1, 1, QWEN_PRESET)
    print(f"\n{name}, {PRESET} (rows without a prefix), {QWEN_PRESET} (prefixed), bf16\n")
    print("| run | status | s/step | tokens/s | peak GiB | MFU |\n|---|---|---|---|---|---|")
    for k, r in runs.items():
        ok = r.get("status") == "ok"
        r["mfu"] = mfu(r, peak)
        r["tokens_per_s"] = r["tokens"] / r["median_s"] if ok else None
        cells = [f"{r['median_s']:.3f}", f"{r['tokens_per_s']:.0f}", f"{r['peak_mem_bytes'] / 2**30:.1f}",
                 "n/a" if r["mfu"] is None else f"{r['mfu']:.3f}"] if ok else ["", "", "", ""]  # fmt: skip
        print(f"| {k} | {r.get('status')} | {' | '.join(cells)} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_quick.json").write_text(json.dumps({"device": name, "date": date.today().isoformat(),
                                                          "preset": PRESET, "qwen_preset": QWEN_PRESET,
                                                          "runs": runs}, indent=2))  # fmt: skip
    return 0 if all(r.get("status") in ("ok", "oom") for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
