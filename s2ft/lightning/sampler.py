"""A seeded, rank-sharded batch sampler that resumes mid-epoch exactly.

`SFTDataModule` saves the sampler's `state_dict` in checkpoints and restores it on `ckpt_path=...`. The sampler cannot
count what it yields (Lightning prefetches a batch ahead, so its iterator runs out before the last batch trains), so
the `AdvanceSampler` callback calls `advance()` when a batch actually starts and `set_epoch(trainer.current_epoch)`
when an epoch starts (Lightning's own `set_epoch` call reaches only a `sampler`, not a `batch_sampler`). The position
is (epoch, consumed batches); a finished epoch and the start of the next one are the same position, so a checkpoint
taken after an epoch's last batch resumes with the next epoch.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

from s2ft.data import DataError


class ResumableBatchSampler(Sampler[list[int]]):
    """Shuffles `size` items with `seed + epoch`, gives rank `rank` every `world_size`-th item, and batches them.

    Every rank gets the same number of full batches (the tail that does not fill a batch on every rank is dropped), so
    DDP ranks never wait on each other.
    """

    def __init__(self, size: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or size < batch_size * world_size:
            raise DataError(
                f"{size} training items cannot fill one batch of {batch_size} on {world_size} rank(s); "
                "lower data.batch_size or raise data.limit"
            )
        self.size, self.batch_size, self.seed, self.rank, self.world_size = size, batch_size, seed, rank, world_size
        self.epoch = 0
        self.consumed = 0  # batches of this epoch already trained on

    def __len__(self) -> int:
        return self.size // (self.batch_size * self.world_size)

    def __iter__(self):
        if self.consumed >= len(self):
            # Every batch of this epoch was trained on: the pass is the next epoch's (a resume after an epoch's last
            # batch gets here before Lightning starts the next epoch).
            self.epoch, self.consumed = self.epoch + 1, 0
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator)[: len(self) * self.batch_size * self.world_size]
        mine = order[self.rank :: self.world_size].tolist()
        for start in range(self.consumed * self.batch_size, len(mine), self.batch_size):
            yield mine[start : start + self.batch_size]

    def advance(self) -> None:
        """Record that one more batch of this epoch was trained on."""
        self.consumed += 1

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its first batch; the epoch in progress keeps its position (a mid-epoch resume)."""
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = state["epoch"], state["consumed"]
