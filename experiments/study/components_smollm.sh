#!/usr/bin/env bash
# The component study (paper Figure 4 at CPU scale), one job per process, seed-major: Q, O, Down, V, K, Up, Gate at
# seeds 0, 1, 2. A finished job is skipped and an interrupted one resumes from its checkpoint (ckpt_path=auto), so
# the script can be stopped and started again at any point; each job's output goes to $OUT/seedS_C.log.
#   bash experiments/study/components_smollm.sh            # all 21 jobs (~14 min each on a quiet 2-core machine)
#   SEEDS="0" bash experiments/study/components_smollm.sh  # one seed block
source "$(dirname "$0")/jobs.sh"
OUT=${OUT:-outputs/components_smollm}
mkdir -p "$OUT"
for seed in ${SEEDS:-0 1 2}; do
  for c in ${COMPONENTS:-q o down v k up gate}; do
    train components_smollm "$OUT/seed${seed}_$c" "method.options.target_split={$c:1.0}" seed="$seed"
  done
done
python -m experiments.report "$OUT" --export-records results/components_smollm/runs --reference "" \
  --out results/components_smollm
