#!/bin/bash
# Issues 7 and 19: the GPU measurements, sized for two 10-minute calls on a lent H200 (no hub, no pretrained weights:
# random-initialised models of the paper's shapes; needs torch, transformers and peft, not hydra, W&B or matplotlib).
#   OUT=/some/dir bash experiments/bench/gpu.sh      # default OUT: results/; training and switching
#   ONLY=serving bash experiments/bench/gpu.sh       # the second call: the serving benchmark
# Then, here: copy the three folders into results/ and `python -m experiments.bench.redraw results/training_gpu
# results/switch_gpu results/serving_gpu` draws the charts if the GPU machine had no matplotlib.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-results}
model=${MODEL:-llama2_7b_shape}
switch_model=${SWITCH_MODEL:-smollm2_135m_shape}
only=${ONLY:-training_switch}
device=${DEVICE:-cuda}  # DEVICE=cpu MODEL=tiny_llama SWITCH_MODEL=tiny_llama: a (slow) dry run of the plumbing here
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if [ "$only" = serving ]; then
  timeout 540 python -m experiments.bench.serving --device "$device" --model "$switch_model" \
    --out "$out/serving_gpu" --note "device tool, $switch_model random-initialised"
  exit
fi
# One interleaved round: a dedicated GPU does not drift the way a shared 2-core CPU does, and 6 methods x 4 shapes
# fresh processes already take most of the call.
timeout 420 python -m experiments.bench.training --model "$model" --dtype bfloat16 --device "$device" \
  --batch-sizes 1 2 --seq-lens 512 1024 --rounds 1 --warmup 2 --steps 5 --out "$out/training_gpu" \
  --note "device tool, $model random-initialised"
timeout 150 python -m experiments.bench.switch --dtype bfloat16 --device "$device" --model "$switch_model" \
  --out "$out/switch_gpu" --note "device tool, $switch_model random-initialised"
