#!/usr/bin/env bash
# The fusion study (paper Table 5 at CPU scale) at seeds 0-2, one job per process (~90 min a seed on a quiet 2-core
# machine): per seed the GSM8K adapter, the commonsense adapter on the same units (both select with
# method.options.seed=${seed}), the commonsense adapter disjoint from the GSM8K one, both fusions and the untrained
# model. A finished job is skipped, an interrupted training resumes (ckpt_path=auto) and a fusion stopped before its
# summary is deleted and run again (fuse refuses an --out holding outputs); each job's output goes to $OUT/NAME.log.
#   bash experiments/study/fusion_smollm.sh
#   SEEDS="1" bash experiments/study/fusion_smollm.sh
source "$(dirname "$0")/jobs.sh"
OUT=${OUT:-outputs/fusion_smollm}
mkdir -p "$OUT"
fuse() {  # fuse RUN_A RUN_B OUT
  [ -f "$3/summary.json" ] && return
  rm -rf "$3"
  echo "$(date -u +%FT%TZ) start $3"
  python -m experiments.study.fuse "$1" "$2" --out "$3" > "$3.log" 2>&1 || fail "$3"
  echo "$(date -u +%FT%TZ) done $3"
}
for seed in ${SEEDS:-0 1 2}; do
  S=$OUT/seed$seed
  train fusion_smollm "${S}_gsm8k" 'data.train=[gsm8k]' seed="$seed"
  train fusion_smollm "${S}_commonsense" 'data.train=[commonsense_mix]' seed="$seed"
  train fusion_smollm "${S}_commonsense_disjoint" 'data.train=[commonsense_mix]' seed="$seed" \
    method.options.exclude="${S}_gsm8k/adapter"
  fuse "${S}_gsm8k" "${S}_commonsense" "${S}_fused_overlap"
  fuse "${S}_gsm8k" "${S}_commonsense_disjoint" "${S}_fused_disjoint"
  train fusion_smollm "${S}_none" method=none mode=eval seed="$seed"
done
python -m experiments.report "$OUT" --export-records results/fusion_smollm/runs --reference "fused shared_units=1728" \
  --out results/fusion_smollm
