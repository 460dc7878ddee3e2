#!/usr/bin/env bash
# The GPU check: one command the day a GPU is lent (no Ray, no registry: torch/transformers/peft/pyarrow only).
#   scripts/gpu_check.sh            everything (~30 min on an H100)
#   scripts/gpu_check.sh quick      the first window (expected ≤ 9 min on an H100/H200, not yet measured): the
#                                   capture = eager bf16 test, then scripts/gpu_quick.py — LLaVA-1.5-7B plain vs
#                                   capture (2 layers) time, memory, MFU; LoRA 7B throughput at micro-batch 1/2/4/8;
#                                   one Qwen forward: Qwen2.5-VL-7B's plain step and 2-layer capture step
#   scripts/gpu_check.sh tests      the `gpu` tests: capture = eager in bf16 under SDPA's flash / efficient / math
#                                   kernels (LLaVA and NeXT), NeXT-7B at batch 2 fits (step and evaluation)
#   scripts/gpu_check.sh bench15    the LLaVA-1.5-7B preset of scripts/bench_attention.py (plain, seed eager,
#                                   capture 2 layers / 8 heads / all layers, evaluation reduced / stored; MFU)
#   scripts/gpu_check.sh benchnext  the LLaVA-NeXT-7B preset
#   scripts/gpu_check.sh benchqwen  the Qwen2.5-VL-7B preset (640×480 → 391 image tokens, M-RoPE; no maskembed)
#   scripts/gpu_check.sh fsdp       full finetuning sharded with FSDP2 (bf16 mixed precision, capture KL on 2
#                                   layers): LLaVA-1.5-7B shapes cut to 8 decoder layers so that it fits one GPU
#                                   (all visible GPUs are ranks), memory per rank against the memory model
# After each preset, scripts/memory_model.py compares its measured peaks with the memory model's prediction.
# Parts fit the device tool's 10-minute calls. JSON goes to $OUT (default docs/); record the figures with device
# and date in docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-docs}"
mkdir -p "$OUT"
part="${1:-all}"
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_check_device.txt"
python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu_check_device.txt"
if [[ "$part" == quick ]]; then
  python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py -k capture_equals_eager 2>&1 | tee "$OUT/gpu_tests_quick.txt" || status=1
  python scripts/gpu_quick.py --out "$OUT" || status=1
  exit $status
fi
if [[ "$part" == all || "$part" == tests ]]; then
  python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_grounding_metrics.py 2>&1 | tee "$OUT/gpu_tests.txt" || status=1
fi
if [[ "$part" == all || "$part" == bench15 ]]; then
  python scripts/bench_attention.py --preset llava-1.5-7b --reps 5 --warmup 2 --json "$OUT/bench_attention_llava15_7b_gpu.json" || status=1
  python scripts/memory_model.py --compare "$OUT/bench_attention_llava15_7b_gpu.json" --json "$OUT/memory_model_llava15_7b_gpu.json" || status=1
fi
if [[ "$part" == all || "$part" == benchnext ]]; then
  python scripts/bench_attention.py --preset llava-next-7b --reps 5 --warmup 2 --json "$OUT/bench_attention_next_7b_gpu.json" || status=1
  python scripts/memory_model.py --compare "$OUT/bench_attention_next_7b_gpu.json" --json "$OUT/memory_model_next_7b_gpu.json" || status=1
fi
if [[ "$part" == all || "$part" == benchqwen ]]; then
  python scripts/bench_attention.py --preset qwen2.5-vl-7b --reps 5 --warmup 2 --json "$OUT/bench_attention_qwen25_7b_gpu.json" || status=1
  python scripts/memory_model.py --compare "$OUT/bench_attention_qwen25_7b_gpu.json" --json "$OUT/memory_model_qwen25_7b_gpu.json" || status=1
fi
if [[ "$part" == all || "$part" == fsdp ]]; then
  python scripts/bench_full_ft.py --preset llava-1.5-7b --layers 8 --device cuda --reps 3 --json "$OUT/bench_full_ft_llava15_8layers_gpu.json" || status=1
fi
exit $status
