# The study scripts' jobs (sourced): one job per process, each with its run directory RUN and its output in RUN.log.
# A job whose RUN holds a summary.json is finished and skipped; an interrupted training resumes from its checkpoint
# (ckpt_path=auto), so a study script can be stopped and started again at any point.
set -euo pipefail
fail() { echo "$(date -u +%FT%TZ) FAILED $1: see $1.log (rerun this script to go on from there)" >&2; exit 1; }
train() {  # train EXPERIMENT RUN OVERRIDES...
  local experiment=$1 run=$2
  shift 2
  [ -f "$run/summary.json" ] && return
  echo "$(date -u +%FT%TZ) start $run"
  python run.py +experiment="$experiment" logger=csv hydra.run.dir="$run" ckpt_path=auto "$@" > "$run.log" 2>&1 \
    || fail "$run"
  echo "$(date -u +%FT%TZ) done $run"
}
