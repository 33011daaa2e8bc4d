"""Callbacks: periodic last-checkpoint, checkpoint-and-stop on SIGTERM / Ctrl-C, and the atomic checkpoint writer."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from s2ft.lightning.sampler import ResumableBatchSampler


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file and renames it, so a crash never leaves a truncated `last.ckpt`."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)


class AdvanceSampler(L.Callback):
    """Keeps the sampler's position: the epoch when one starts, a batch consumed when it starts (so a checkpoint at its
    end resumes after it). Lightning's own `set_epoch` call reaches a dataloader's `sampler`, never its
    `batch_sampler`, and the next epoch's iterator is created after `on_train_epoch_start`."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        sampler = _resumable_sampler(trainer)
        if sampler is not None:
            sampler.set_epoch(trainer.current_epoch)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        sampler = _resumable_sampler(trainer)
        if sampler is not None:
            sampler.advance()


def _resumable_sampler(trainer: L.Trainer) -> ResumableBatchSampler | None:
    sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
    return sampler if isinstance(sampler, ResumableBatchSampler) else None


class LastCheckpoint(L.Callback):
    """Saves `path` every `every_n_steps` optimizer steps, at the end of training, and before stopping on a signal.

    SIGTERM is caught by Lightning, which finishes the current batch and raises `SIGTERMException`; the checkpoint is
    written then. Ctrl-C is turned into the same graceful stop at the end of the current batch (a second Ctrl-C
    interrupts at once). Either way the checkpoint lies on a batch boundary, so `ckpt_path=last` resumes exactly.
    """

    def __init__(self, path: str | Path, every_n_steps: int = 50):
        self.path, self.every_n_steps = Path(path), every_n_steps
        self.interrupted = False
        self._previous_sigint = None

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        self.interrupted = True
        signal.signal(signal.SIGINT, self._previous_sigint)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.interrupted:
            trainer.save_checkpoint(self.path, weights_only=False)
            raise KeyboardInterrupt
        stepped = not trainer.fit_loop.epoch_loop._should_accumulate()
        if stepped and trainer.global_step % self.every_n_steps == 0:
            trainer.save_checkpoint(self.path, weights_only=False)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
        self._restore_sigint()

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        # Lightning raises SIGTERMException once the batch in flight (and any validation after it) has finished.
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path, weights_only=False)
        self._restore_sigint()

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None


class KeepBest(L.Callback):
    """With `trainer.select_best=val_loss`: keep a copy of the trained tensors at the best validation loss and load it
    back when training ends, so the saved adapter is the best one rather than the last.

    Args:
        monitor: The logged metric to minimise.
        after: Fraction of the run's optimizer steps before which validations are not candidates (the official
            scripts' `eval_delay 0.5`: only the second half of training is selected from).
    """

    def __init__(self, monitor: str = "val/loss", after: float = 0.0):
        self.monitor, self.after = monitor, after
        self.best: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def first_candidate_step(self, trainer: L.Trainer) -> int:
        """The first optimizer step whose validation may be selected."""
        return int(self.after * trainer.estimated_stepping_batches)

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None or (self.best is not None and float(value) >= self.best):
            return
        if trainer.global_step < self.first_candidate_step(trainer):
            return
        self.best = float(value)
        state = pl_module.state_dict()
        self.best_state = {k: state[k].detach().clone() for k in pl_module.trained_keys()}

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.best_state is not None:
            pl_module.load_state_dict(self.best_state, strict=False)

    def state_dict(self) -> dict:
        return {"best": self.best, "best_state": self.best_state}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best, self.best_state = state_dict["best"], state_dict["best_state"]
