"""Runs tiny `trainer=fsdp_cpu` jobs in one set of processes, for tests/test_run_fsdp.py (start it with torchrun).

    torchrun --standalone --nproc-per-node 2 tests/fsdp_worker.py OUT_DIR STEPS JOB...

A job is `METHOD` (STEPS steps into OUT_DIR/METHOD) or `METHOD:resume` (the same run, stopped by SIGTERM after step
STEPS // 2, which checkpoints it, then resumed with ckpt_path=last, in OUT_DIR/METHOD_resumed) or `METHOD:best`
(with trainer.select_best=val_loss and the validation of SELECT_BEST, in OUT_DIR/METHOD_best).
Launching once for all jobs spares each job the start-up of two Python processes.
"""

import os
import signal
import sys
from pathlib import Path

from fsdp_common import SELECT_BEST, job_config

from s2ft.lightning import FineTuneModule, run_experiment
from s2ft.lightning.callbacks import RunInterrupted

original_batch_end = FineTuneModule.on_train_batch_end


def preempt_at(step: int):
    """Every rank sends itself SIGTERM at the end of `step`, at the same point of its program, as a cluster
    preempting the job does (the run then checkpoints after the batch and raises RunInterrupted)."""

    def on_train_batch_end(self, outputs, batch, batch_idx):
        original_batch_end(self, outputs, batch, batch_idx)
        if self.trainer.global_step == step:
            os.kill(os.getpid(), signal.SIGTERM)

    return on_train_batch_end


def main(out_dir: Path, steps: int, jobs: list[str]) -> None:
    for job in jobs:
        method, _, variant = job.partition(":")
        if not variant:
            run_experiment(job_config(method, steps, sharded=True), out_dir / method)
            continue
        if variant == "best":
            run_experiment(job_config(method, steps, *SELECT_BEST, sharded=True), out_dir / f"{method}_best")
            continue
        run_dir = out_dir / f"{method}_resumed"
        FineTuneModule.on_train_batch_end = preempt_at(steps // 2)
        try:
            run_experiment(job_config(method, steps, sharded=True), run_dir)
            raise AssertionError("the run was not stopped")
        except RunInterrupted:
            pass
        finally:
            FineTuneModule.on_train_batch_end = original_batch_end
        run_experiment(job_config(method, steps, "ckpt_path=last", sharded=True), run_dir)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
