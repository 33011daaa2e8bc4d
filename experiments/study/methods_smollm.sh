#!/usr/bin/env bash
# A method-comparison study (commonsense_smollm: paper Table 1; arith_smollm: Table 2) at three seeds, one job per
# process: S2FT, LoRA, full FT and the untrained model first (the comparisons the claims rest on), then DoRA and
# SpFT. A finished job is skipped and an interrupted one resumes from its checkpoint (ckpt_path=auto), so the script
# can be stopped and started again at any point; each job's output goes to $OUT/seedS_METHOD.log.
#   bash experiments/study/methods_smollm.sh commonsense_smollm    # ~25 min a job on a quiet 2-core machine
#   bash experiments/study/methods_smollm.sh arith_smollm          # ~35 min a job
#   ROWS="s2ft lora" SEEDS="0" bash experiments/study/methods_smollm.sh commonsense_smollm
# At the end the finished runs' records go to $RESULTS/runs (beside the records already there) and the report to
# $RESULTS (default results/$STUDY); run from a worktree, point RESULTS at the checkout the results are committed from
# (exporting into the worktree's own tracked results would mark its later runs' commit dirty):
#   RESULTS=/work/main/results/commonsense_smollm/rerun bash experiments/study/methods_smollm.sh commonsense_smollm
source "$(dirname "$0")/jobs.sh"
STUDY=${1:?give the study: commonsense_smollm or arith_smollm}
OUT=${OUT:-outputs/$STUDY}
RESULTS=${RESULTS:-results/$STUDY}
mkdir -p "$OUT"
job() {  # job SEED METHOD
  if [ "$2" = none ]; then train "$STUDY" "$OUT/seed$1_$2" method=none mode=eval seed="$1"
  else train "$STUDY" "$OUT/seed$1_$2" method=smollm/"$2" seed="$1"; fi
}
for rows in "${ROWS:-s2ft lora full none}" "${LATER_ROWS-dora spft}"; do
  for seed in ${SEEDS:-0 1 2}; do
    for m in $rows; do job "$seed" "$m"; done
  done
done
records=()
[ -d "$RESULTS/runs" ] && records=("$RESULTS/runs")
python -m experiments.report "${records[@]}" "$OUT" --export-records "$RESULTS/runs" --out "$RESULTS"
