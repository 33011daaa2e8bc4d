#!/bin/bash
# Issue 7's GPU measurements in one go, sized for one 10-minute call on a lent H200 (no hub, no pretrained weights:
# random-initialised models of the paper's shapes; needs torch, transformers and peft, not hydra, W&B or matplotlib).
#   OUT=/some/dir bash experiments/gpu_benchmarks.sh      # default OUT: results/
# Then, here: copy the two folders into results/ and `python experiments/bench_report.py results/training_gpu
# results/switch_gpu` draws the charts if the GPU machine had no matplotlib.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-results}
model=${MODEL:-llama2_7b_shape}
switch_model=${SWITCH_MODEL:-smollm2_135m_shape}
device=${DEVICE:-cuda}  # DEVICE=cpu MODEL=tiny_llama SWITCH_MODEL=tiny_llama: a (slow) dry run of the plumbing here
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# One interleaved round: a dedicated GPU does not drift the way a shared 2-core CPU does, and 6 methods x 4 shapes
# fresh processes already take most of the call.
timeout 420 python experiments/benchmark_training.py --model "$model" --dtype bfloat16 --device "$device" \
  --batch-sizes 1 2 --seq-lens 512 1024 --rounds 1 --warmup 2 --steps 5 --out "$out/training_gpu" \
  --note "device tool, $model random-initialised"
timeout 150 python experiments/benchmark_switch.py --dtype bfloat16 --device "$device" --model "$switch_model" \
  --out "$out/switch_gpu" --note "device tool, $switch_model random-initialised"
