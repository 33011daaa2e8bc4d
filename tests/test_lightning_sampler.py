"""ResumableBatchSampler: seeded order, disjoint rank shards, and exact mid-epoch resume from its state."""

import pytest
import torch

from s2ft.lightning.sampler import ResumableBatchSampler


def test_one_rank_sees_a_seeded_permutation_in_full_batches():
    sampler = ResumableBatchSampler(size=10, batch_size=3, seed=5)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 and all(len(b) == 3 for b in batches)
    flat = [i for b in batches for i in b]
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(5))[:9].tolist()
    assert flat == expected
    assert list(ResumableBatchSampler(size=10, batch_size=3, seed=5)) == batches


def test_epochs_reshuffle_and_ranks_split_the_data_disjointly():
    ranks = [ResumableBatchSampler(size=22, batch_size=2, seed=0, rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 1):
        for sampler in ranks:
            sampler.set_epoch(epoch)
        shards = [[i for b in sampler for i in b] for sampler in ranks]
        assert len(shards[0]) == len(shards[1]) == 10  # equal batch counts: no rank waits on another
        assert not set(shards[0]) & set(shards[1])
        if epoch == 0:
            first = shards
    assert first != shards


def test_state_resumes_mid_epoch_exactly():
    reference = ResumableBatchSampler(size=20, batch_size=2, seed=1)
    reference.set_epoch(3)
    expected = list(reference)
    sampler = ResumableBatchSampler(size=20, batch_size=2, seed=1)
    sampler.set_epoch(3)
    iterator = iter(sampler)
    seen = []
    for _ in range(4):
        seen.append(next(iterator))
        sampler.advance()  # the training loop consumed the batch
    next(iterator)  # prefetched but never trained on: must come again after the resume
    state = sampler.state_dict()
    assert state == {"epoch": 3, "consumed": 4}

    restored = ResumableBatchSampler(size=20, batch_size=2, seed=1)
    restored.load_state_dict(state)
    restored.set_epoch(3)  # the callback sets the same epoch again: the position is kept
    rest = []
    for batch in restored:
        rest.append(batch)
        restored.advance()
    assert seen + rest == expected
    assert restored.state_dict() == {"epoch": 3, "consumed": 10}
    restored.set_epoch(4)
    assert restored.state_dict() == {"epoch": 4, "consumed": 0}


def test_a_finished_epoch_continues_with_the_next_epochs_order():
    """A checkpoint after an epoch's last batch holds (epoch, all batches): the resumed pass is the next epoch's, even
    before anyone calls set_epoch (Lightning creates the first iterator before on_train_epoch_start)."""
    reference = ResumableBatchSampler(size=20, batch_size=2, seed=1)
    reference.set_epoch(1)
    sampler = ResumableBatchSampler(size=20, batch_size=2, seed=1)
    sampler.load_state_dict({"epoch": 0, "consumed": 10})
    assert list(sampler) == list(reference)
    assert sampler.state_dict() == {"epoch": 1, "consumed": 0}
    sampler.set_epoch(1)  # the epoch start that follows keeps it
    assert sampler.state_dict() == {"epoch": 1, "consumed": 0}


def test_too_little_data_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot fill one batch of 4 on 2 rank"):
        ResumableBatchSampler(size=7, batch_size=4, world_size=2)
