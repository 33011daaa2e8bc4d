"""A tiny `trainer=ddp_cpu` run with gradient accumulation, uninterrupted and preempted inside an accumulation window
then resumed, for tests/test_run_ddp.py (start it with torchrun).

    torchrun --standalone --nproc-per-node 2 tests/ddp_resume_worker.py OUT_DIR

Writes OUT_DIR/full and OUT_DIR/resumed; OUT_DIR/stopped_at.json holds the resumed run's checkpoint position.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch
from conftest import smoke_config

from s2ft.lightning import FineTuneModule, run_experiment
from s2ft.lightning.callbacks import RunInterrupted

OVERRIDES = [
    # debug=smoke sets one device and strategy=auto after trainer=ddp_cpu; the command line's keys win over it.
    "trainer=ddp_cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=4",
    "trainer.checkpoint_every_n_steps=100",
    "trainer.accumulate_grad_batches=3", "trainer.val_check_interval=3", "data.batch_size=2",
]  # fmt: skip
original_batch_end = FineTuneModule.on_train_batch_end


def on_train_batch_end(self, outputs, batch, batch_idx):
    """Only rank 0 is signalled, inside step 2's window of 3 micro-batches (a SIGTERM to one task of a job)."""
    original_batch_end(self, outputs, batch, batch_idx)
    if batch_idx == 3 and self.global_rank == 0:
        os.kill(os.getpid(), signal.SIGTERM)


def main(out_dir: Path) -> None:
    run_experiment(smoke_config(*OVERRIDES, logger="csv"), out_dir / "full")
    FineTuneModule.on_train_batch_end = on_train_batch_end
    try:
        run_experiment(smoke_config(*OVERRIDES, logger="csv"), out_dir / "resumed")
        raise AssertionError("the run was not stopped")
    except RunInterrupted:
        pass
    finally:
        FineTuneModule.on_train_batch_end = original_batch_end
    if int(os.environ["RANK"]) == 0:
        ckpt = torch.load(out_dir / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
        position = {"global_step": ckpt["global_step"], **ckpt["SFTDataModule"]}
        (out_dir / "stopped_at.json").write_text(json.dumps(position))
    run_experiment(smoke_config(*OVERRIDES, "ckpt_path=last", logger="csv"), out_dir / "resumed")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
