"""What the suite prints besides its own results: Lightning's logging, a step progress bar, and quiet W&B settings."""

from __future__ import annotations

import logging
import warnings

from lightning.pytorch.callbacks import RichProgressBar

# Lightning 2.6's own pytree helper still builds torch's deprecated LeafSpec (torch >= 2.10 warns on every run); it
# is Lightning's to change, nothing a user can act on, so this one warning is not shown.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


class DropAdverts(logging.Filter):
    """Drops Lightning's product tips (e.g. "💡 Tip: ... try installing litlogger"), which no switch turns off.

    Installed on Lightning's rank-zero logger by conf/hydra/default.yaml (`hydra.job_logging`).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar; a run bounded by `trainer.max_steps` shows optimizer steps out of `max_steps`.

    Lightning's bar counts the batches of an epoch and titles it "Epoch 0/-2" when only `max_steps` is set.
    """

    @property
    def _by_steps(self) -> bool:
        return self.trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._by_steps else super().total_train_batches

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._by_steps and self.train_progress_bar_id is not None:
            return  # one bar across epochs
        super().on_train_epoch_start(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._by_steps:
            self._update(self.train_progress_bar_id, trainer.global_step)

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._by_steps:
            return super()._get_train_description(current_epoch)
        return f"{'Step':{len(self.validation_description)}}"
