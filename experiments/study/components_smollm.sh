#!/usr/bin/env bash
# The component study (paper Figure 4 at CPU scale), one job per process, seed-major: Q, O, Down, V, K, Up, Gate at
# seeds 0, 1, 2. A finished job is skipped and an interrupted one resumes from its checkpoint (ckpt_path=auto), so
# the script can be stopped and started again at any point; each job's output goes to $OUT/seedS_C.log.
#   bash experiments/study/components_smollm.sh            # all 21 jobs (~17 min each on a quiet 2-core machine)
#   SEEDS="0" bash experiments/study/components_smollm.sh  # one seed block
set -euo pipefail
OUT=${OUT:-outputs/components_smollm}
mkdir -p "$OUT"
fail() { echo "$(date -u +%FT%TZ) FAILED $1: see $1.log (rerun this script to go on from there)" >&2; exit 1; }
for seed in ${SEEDS:-0 1 2}; do
  for c in ${COMPONENTS:-q o down v k up gate}; do
    run=$OUT/seed${seed}_$c
    [ -f "$run/summary.json" ] && continue
    echo "$(date -u +%FT%TZ) start $run"
    python run.py +experiment=components_smollm "method.options.target_split={$c:1.0}" seed="$seed" logger=csv \
      hydra.run.dir="$run" ckpt_path=auto > "$run.log" 2>&1 || fail "$run"
    echo "$(date -u +%FT%TZ) done $run"
  done
done
python -m experiments.report "$OUT" --export-records results/components_smollm/runs --reference "" \
  --out results/components_smollm
