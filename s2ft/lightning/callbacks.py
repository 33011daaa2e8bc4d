"""Callbacks: periodic last-checkpoint, checkpoint-and-stop on SIGTERM / Ctrl-C, the stop on a non-finite training
state, and the atomic, rotating, safely loading checkpoint writer."""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from s2ft.errors import UserError
from s2ft.lightning.checkpoint import CHECKPOINT, CheckpointError, read_checkpoint, resume_command
from s2ft.lightning.sampler import ResumableBatchSampler
from s2ft.lightning.sharding import gather_trained, load_whole


class RunInterrupted(UserError):
    """Training stopped on SIGTERM or Ctrl-C; the message is the command that resumes it, or, when a second signal
    stopped it before any checkpoint was saved (in a validation, inside an accumulation), the one that starts again."""

    def __init__(self, cause: str, run_dir: Path):
        if (run_dir / CHECKPOINT).is_file():
            super().__init__(f"stopped by {cause}; the checkpoint is saved, resume with: {resume_command(run_dir)}")
        else:
            super().__init__(
                f"stopped by {cause} before its first checkpoint; start it again with: "
                f"{resume_command(run_dir, 'auto')}"
            )


class TrainingDiverged(UserError):
    """The training loss or the trained values became NaN or infinite."""


def _sync_directory(folder: Path) -> None:
    """Makes the renames in ``folder`` durable: until its entry is synced, a power loss may undo an ``os.replace``."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform whose directories cannot be opened (Windows): the rename is as durable as it gets
        return
    try:
        os.fsync(handle)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(handle)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes checkpoints atomically, keeps the one before, and loads them with ``weights_only=True``.

    A checkpoint is written to a temporary file, flushed to disk and renamed over ``last.ckpt``, so a crash never
    leaves a truncated file; the checkpoint it replaces is kept as ``previous.ckpt`` (a hard link, so ``last.ckpt``
    exists at every moment), so one file torn by the disk or the user never costs the run. Only a checkpoint known to
    be good (written or loaded by this process) is kept that way: a damaged ``last.ckpt`` never replaces a good
    ``previous.ckpt``.

    Args:
        preloaded: Checkpoints already read and checked by the runner, by path: loaded from memory, not read again.
    """

    def __init__(self, preloaded: dict[Path, dict] | None = None):
        super().__init__()
        self.preloaded = {Path(path).resolve(): ckpt for path, ckpt in (preloaded or {}).items()}
        self.trusted: set[Path] = set(self.preloaded)

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException as err:
            tmp.unlink(missing_ok=True)  # a partial copy of a model-sized file would keep the disk full
            if not isinstance(err, OSError):
                raise
            kept = "the one before it is intact" if path.is_file() else "none was saved before it"
            raise CheckpointError(
                f"could not write checkpoint {path} ({err.strerror or err}); {kept}. Free space on that disk, then "
                f"continue with: {resume_command(path.parent.parent, 'auto')}"
            ) from err
        if path.resolve() in self.trusted and path.is_file():
            kept = path.with_name("previous.ckpt")
            link = kept.with_name(f".{kept.name}.tmp")
            link.unlink(missing_ok=True)
            try:
                os.link(path, link)
            except OSError:  # a filesystem without hard links: a copy (last.ckpt still exists throughout)
                shutil.copyfile(path, link)
            os.replace(link, kept)
        os.replace(tmp, path)
        _sync_directory(path.parent)
        self.trusted.add(path.resolve())

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        path = Path(path)
        checkpoint = self.preloaded.pop(path.resolve(), None)
        if checkpoint is None:
            checkpoint = read_checkpoint(path)
        self.trusted.add(path.resolve())
        return checkpoint


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


class ResumeRandomState(L.Callback):
    """Carries the random number generators' state (torch's CPU and CUDA ones, Python's) through a checkpoint, so a
    resumed run draws the dropout masks (LoRA's lora_dropout) an uninterrupted run draws after that step.

    The state is the one at the checkpoint, taken after the batch that stepped; it is set again when the resumed
    session's first batch starts, after the session rebuilt the model and its dataloaders (which draw numbers of their
    own). An uninterrupted run starting the next epoch draws one number first, for the new epoch's dataloader iterator
    (`torch.utils.data.DataLoader` draws its base seed when an iterator is created): a checkpoint taken at the end of
    an epoch draws it again after restoring. Under DDP each rank's state is kept and each rank resumes its own.
    """

    def __init__(self):
        self._resumed: dict | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        sampler = _resumable_sampler(trainer)
        version, state, gauss = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "python": [version, list(state), gauss],
            "epoch_end": sampler is not None and sampler.consumed >= len(sampler),
        }
        if trainer.world_size > 1:
            # Rank 0 writes the checkpoint, but each rank's generators drew for its own batches (their dropout masks
            # have other shapes): every rank's state is kept. Every rank saves (`LastCheckpoint`), so all gather.
            ranks = [None] * trainer.world_size
            torch.distributed.all_gather_object(ranks, state)
            state = {**state, "ranks": ranks}
        checkpoint["random_state"] = state

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        state = checkpoint.get("random_state")  # None in checkpoints written before it was stored
        ranks = (state or {}).get("ranks")
        # A checkpoint written before every rank's state was kept, or by another number of ranks (the runner refuses
        # it: `check_same_world`), resumes with rank 0's.
        self._resumed = ranks[trainer.global_rank] if ranks and trainer.global_rank < len(ranks) else state

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        state, self._resumed = self._resumed, None
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        if state["cuda"]:
            torch.cuda.set_rng_state_all(state["cuda"])
        version, values, gauss = state["python"]
        random.setstate((version, tuple(values), gauss))
        if state["epoch_end"]:
            torch.empty((), dtype=torch.int64).random_()  # the new epoch's iterator's base seed


class StopOnNonFinite(L.Callback):
    """Stops training with `TrainingDiverged` at the first non-finite loss or trained value, before any checkpoint.

    Placed before `LastCheckpoint`, it checks the loss of every batch and the trained tensors after every optimizer
    step, so a NaN state is never saved: the last checkpoint stays the last good one, and no adapter or summary is
    written for the run.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss, accumulating = pl_module.last_loss, trainer.fit_loop.epoch_loop._should_accumulate()
        step = trainer.global_step + accumulating  # the optimizer step this batch belongs to (done unless accumulating)
        if loss is not None and not math.isfinite(loss):
            raise diverged(trainer, pl_module, step, f"the training loss is {loss}")
        if accumulating:
            return
        params = [p for p in pl_module.parameters() if p.requires_grad]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            bad = next(n for n, p in pl_module.named_parameters() if p.requires_grad and not torch.isfinite(p).all())
            raise diverged(trainer, pl_module, step, f"the trained tensor {bad} holds NaN/inf after the update")


def diverged(trainer: L.Trainer, pl_module, step: int, what: str) -> TrainingDiverged:
    """The error for a run whose training state became non-finite at the current step."""
    lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else pl_module.lr
    dtype = str(getattr(pl_module.model, "dtype", "unknown")).removeprefix("torch.")
    return TrainingDiverged(
        f"training diverged at step {step}: {what} (lr {lr:.3g}, method.lr {pl_module.lr:g}, "
        f"model.dtype {dtype}, trainer.precision {trainer.precision}). Nothing of this state was saved: the last "
        "checkpoint keeps the last good one and no adapter or summary.json was written. Lower method.lr, set "
        "trainer.gradient_clip_val or train in float32, then start again in a new directory or with overwrite=true"
    )


class RecordBatch(L.Callback):
    """Lets the module record each finished batch (`FineTuneModule.record_batch`) before any checkpoint is saved."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        pl_module.record_batch(batch)


class LastCheckpoint(L.Callback):
    """Saves `path` every `every_n_steps` optimizer steps, at the end of training, and when stopped by a signal.

    A save falls at the end of a batch that stepped the optimizer, or, when a validation is due after that batch, at
    the end of that validation, so a resume neither repeats nor skips it. SIGTERM and Ctrl-C stop training the same
    way: the optimizer step in flight (the batch in flight, and with gradient accumulation the rest of its
    micro-batches; a validation after it) finishes, the checkpoint is written and `RunInterrupted` names the resume
    command; a second signal acts at once (Lightning's `SIGTERMException`, which the runner turns into
    `RunInterrupted`), saving the checkpoint only if it stopped at the end of an optimizer step, outside validation
    (under DDP a second SIGTERM ends the process, keeping the last checkpoint: one rank cannot save alone).
    Under DDP every rank takes the signals so, and the ranks agree at the end of each optimizer step whether any of
    them was signalled (Lightning's own handling stopped each rank at the end of any batch, inside an accumulation
    or a validation, saved that state, and could leave the ranks waiting on each other). Every checkpoint stores the
    run's config, its training files' and items' digests and its base model's, so a resume under another config, on
    changed data or on another base model is refused before it starts. They store the code each session trained
    under (``code_history``), which a resumed run's summary lists.
    """

    SIGNALS = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}

    def __init__(
        self,
        path: str | Path,
        every_n_steps: int = 50,
        run_config: dict | None = None,
        sources: list | None = None,
        code_history: list | None = None,
        digests: dict[str, str] | None = None,
    ):
        self.path, self.every_n_steps, self.run_config, self.sources = Path(path), every_n_steps, run_config, sources
        self.code_history, self.digests = code_history, dict(digests or {})
        self.interrupted: str | None = None  # the signal that asked to stop
        self._previous: dict[int, object] = {}
        self._pending = False  # a save waiting for the validation in progress
        self._stop = False  # saved after a signal: stop when the next batch starts
        self._agreed = False  # whether the ranks agreed at the end of the last optimizer step to stop
        self._distributed = False
        self._launcher = None

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._distributed = trainer.world_size > 1
        self._launcher = trainer.strategy.launcher  # the ranks Lightning started from this process, if any
        if threading.current_thread() is threading.main_thread():
            signums = [signal.SIGINT, signal.SIGTERM]
            self._previous = {signum: signal.signal(signum, self._on_signal) for signum in signums}

    def _on_signal(self, signum, frame) -> None:
        self.interrupted = self.SIGNALS[signum]
        # Under DDP Lightning's SIGTERM handler broadcasts from inside the handler, a collective the other ranks never
        # match (every rank failed at the timeout): a second SIGTERM ends the process at once instead.
        second = self._end_now if self._distributed and signum == signal.SIGTERM else self._previous_handler(signum)
        signal.signal(signum, second)

    def _end_now(self, signum, frame) -> None:
        """A second SIGTERM under DDP: this rank cannot save alone, so it ends at once (the last checkpoint stays),
        with the ranks Lightning started from it (which would otherwise wait on it)."""
        if self._launcher is not None:
            self._launcher.kill(signal.SIGKILL)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def _previous_handler(self, signum: int):
        previous = self._previous.get(signum)
        return signal.SIG_DFL if previous is None else previous

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["run_config"] = self.run_config
        if self.sources is not None:
            checkpoint["training_sources"] = self.sources  # `training_record`'s: name, file, SHA-256, count, items
        if self.code_history is not None:
            checkpoint["code_history"] = self.code_history  # `s2ft.lightning.checkpoint.code_history`
        # What the run was started on, checked on resume: `base_sample`, the training items' `items_digest`.
        checkpoint.update(self.digests)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loop = trainer.fit_loop.epoch_loop
        # Only after an optimizer step: a checkpoint within an accumulation would lose the gradients gathered so far.
        if loop._should_accumulate():
            return
        self._agreed = self._any_signalled(trainer)
        if not (self._agreed or trainer.global_step % self.every_n_steps == 0):
            return
        if loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            self._pending = True
            return
        self._save_or_stop(trainer)

    def _any_signalled(self, trainer: L.Trainer) -> bool:
        """Whether this rank, or under DDP any rank, was signalled; every rank must call it at the same point."""
        if trainer.world_size == 1:
            return self.interrupted is not None
        stop = trainer.strategy.reduce_boolean_decision(self.interrupted is not None, all=False)
        self.interrupted = self.interrupted or ("a signal to another rank" if stop else None)
        return stop

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if self._pending and not trainer.sanity_checking:
            self._pending = False
            self._save_or_stop(trainer)

    def _save_or_stop(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
        # Stopping waits for the next batch: Lightning hands the loggers this step's rows after the batch-end hooks.
        # Under DDP only the ranks' agreement counts: a signal that came to one rank since (in the validation or this
        # save) waits for the next step's, or that rank alone would stop and leave the others waiting on it.
        self._stop = self._agreed if trainer.world_size > 1 else self.interrupted is not None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if self._stop:
            raise RunInterrupted(self.interrupted, self.path.parent.parent)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
        self._restore_signals()
        # A signal during the last step or the validation after it (to any rank): stop before the final evaluation.
        if self._any_signalled(trainer):
            raise RunInterrupted(self.interrupted, self.path.parent.parent)

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        # A second SIGTERM stops at the end of any batch: only the end of an optimizer step (outside a validation) is
        # a state to resume exactly; otherwise the checkpoint before it stays the last one.
        at_step = not trainer.validating and not trainer.fit_loop.epoch_loop._should_accumulate()
        if isinstance(exception, SIGTERMException) and at_step:
            trainer.save_checkpoint(self.path, weights_only=False)
        self._restore_signals()

    def _restore_signals(self) -> None:
        if self._previous and threading.current_thread() is threading.main_thread():
            for signum in self._previous:
                signal.signal(signum, self._previous_handler(signum))
            self._previous = {}


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
        # Whole tensors on every rank (gathered under FSDP), so the checkpoint rank 0 writes holds all of them.
        self.best_state = gather_trained(pl_module, pl_module.trained_keys(), everywhere=True)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.best_state is not None:
            load_whole(pl_module, self.best_state)

    def state_dict(self) -> dict:
        return {"best": self.best, "best_state": self.best_state}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best, self.best_state = state_dict["best"], state_dict["best_state"]
