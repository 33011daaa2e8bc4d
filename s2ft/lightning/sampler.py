"""A seeded, rank-sharded batch sampler that resumes mid-epoch exactly.

Lightning saves the `state_dict` of a dataloader that has one and restores it on `ckpt_path=...`. The sampler cannot
count what it yields (Lightning prefetches a batch ahead), so the training module calls `advance()` when a batch
actually starts; a checkpoint taken at the end of that batch then records it as consumed.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler

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
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator)[: len(self) * self.batch_size * self.world_size]
        mine = order[self.rank :: self.world_size].tolist()
        for start in range(self.consumed * self.batch_size, len(mine), self.batch_size):
            yield mine[start : start + self.batch_size]
        # An epoch that ran to its end starts the next pass from the beginning, even without set_epoch.
        self.consumed = 0

    def advance(self) -> None:
        """Record that one more batch of this epoch was trained on."""
        self.consumed += 1

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = state["epoch"], state["consumed"]


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position is saved in and restored from Lightning checkpoints (through its batch sampler)."""

    def state_dict(self) -> dict[str, int]:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.load_state_dict(state)
