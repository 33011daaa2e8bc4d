"""The training data: the configured mixture, a validation split, tokenized once, served by a resumable sampler."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from s2ft.data.tokenize import Collator, tokenize_examples
from s2ft.lightning.sampler import ResumableBatchSampler


class SFTDataModule(L.LightningDataModule):
    """Instruction-tuning data for `FineTuneModule`; its checkpoint state is the training sampler's position.

    The position travels as the data module's state, not the dataloader's: Lightning restores a data module before
    `configure_optimizers`, whose `estimated_stepping_batches` builds the training dataloader in an epoch-based run,
    and it never restores a dataloader built that early (so an epoch-based run resumed from the start of its epoch).

    Args:
        train_examples: Training `Example`s (already mixed and limited, see `s2ft.data.load_train`).
        val_examples: Validation `Example`s (may be empty: no validation loop).
        tokenizer: The model's tokenizer.
        max_length: Truncation length in tokens.
        batch_size: Micro-batch size per rank.
        seed: Shuffle seed (epoch e uses seed + e).
        cache_dir: Where `datasets` caches the tokenized sets (None: in memory).
        template: The prompt template, "alpaca" or "chat" (`s2ft.data.prompt`).
    """

    def __init__(
        self,
        train_examples,
        val_examples,
        tokenizer,
        max_length: int,
        batch_size: int,
        seed: int = 0,
        cache_dir=None,
        template: str = "alpaca",
    ):
        super().__init__()
        self.train_set = tokenize_examples(train_examples, tokenizer, max_length, cache_dir, template)
        self.val_set = (
            tokenize_examples(val_examples, tokenizer, max_length, cache_dir, template) if val_examples else None
        )
        self.collate = Collator(tokenizer)
        self.batch_size, self.seed = batch_size, seed
        self.sampler: ResumableBatchSampler | None = None
        self._position: dict[str, int] | None = None  # restored from a checkpoint before the sampler exists

    def train_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self.sampler = ResumableBatchSampler(len(self.train_set), self.batch_size, self.seed, rank, world)
        if self._position is not None:
            self.sampler.load_state_dict(self._position)
        return DataLoader(self.train_set, batch_sampler=self.sampler, collate_fn=self.collate)

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict() if self.sampler is not None else {}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._position = dict(state_dict) or None
        if self.sampler is not None and self._position:
            self.sampler.load_state_dict(self._position)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate)
