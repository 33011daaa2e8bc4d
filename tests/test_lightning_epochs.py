"""Epochs through Lightning: every epoch trains all its batches in a new order, and resume keeps both exactly."""

import contextlib
import csv
import os
import signal

import lightning as L
import pytest
import torch
from conftest import adapter_tensors, smoke_config

from s2ft.lightning import FineTuneModule, run_experiment, runner
from s2ft.lightning.callbacks import RunInterrupted

# 24 items, 8 of them for validation, one too long for max_length (dropped): 15 training items in batches of 4, so 3
# full batches (= optimizer steps) per epoch, each epoch leaving out its own 3 items (the tail of its shuffle).
EPOCHS = ["trainer.max_steps=-1", "trainer.max_epochs=3", "data.limit=24", "trainer.checkpoint_every_n_steps=100"]
STEPS_PER_EPOCH = 3


@contextlib.contextmanager
def recording(batches: list, stop_after: int | None = None, stop_after_batch: int | None = None):
    """Within the block, runs append (epoch, the batch's token rows) of every training batch to `batches`; with
    `stop_after`, a run sends itself SIGTERM after that optimizer step (a cluster preemption), with `stop_after_batch`
    after that many batches of the run."""
    training_step, batch_end = FineTuneModule.training_step, FineTuneModule.on_train_batch_end
    ended = []

    def record(self, batch, batch_idx):
        pairs = zip(batch["input_ids"], batch["attention_mask"], strict=True)
        rows = tuple(tuple(row[mask.bool()].tolist()) for row, mask in pairs)
        batches.append((self.trainer.current_epoch, rows))
        return training_step(self, batch, batch_idx)

    def stop(self, outputs, batch, batch_idx):
        batch_end(self, outputs, batch, batch_idx)
        ended.append(batch_idx)
        if self.trainer.global_step == stop_after or len(ended) == stop_after_batch:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FineTuneModule, "training_step", record)
        patch.setattr(FineTuneModule, "on_train_batch_end", stop)
        yield


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The summary, run directory and trained batches of one uninterrupted 3-epoch run."""
    run_dir, batches = tmp_path_factory.mktemp("epochs") / "full", []
    with recording(batches):
        summary = run_experiment(smoke_config(*EPOCHS, "trainer.log_every_n_steps=1", logger="csv"), run_dir)
    return summary, run_dir, batches


def test_three_epochs_train_every_batch_in_a_new_order(uninterrupted):
    summary, run_dir, batches = uninterrupted
    assert summary["train"]["steps"] == 3 * STEPS_PER_EPOCH
    assert [epoch for epoch, _ in batches] == [e for e in range(3) for _ in range(STEPS_PER_EPOCH)]
    with (run_dir / "metrics.csv").open(newline="") as handle:
        epochs = [int(row["epoch"]) for row in csv.DictReader(handle) if row.get("train/loss")]
    assert epochs == [e for e in range(3) for _ in range(STEPS_PER_EPOCH)]
    orders = [[row for e, rows in batches if e == epoch for row in rows] for epoch in range(3)]
    assert [len(set(order)) for order in orders] == [4 * STEPS_PER_EPOCH] * 3  # no item twice in an epoch
    assert len(set(orders[0]) | set(orders[1]) | set(orders[2])) <= 15
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]


@pytest.mark.parametrize(
    "stop", [pytest.param(STEPS_PER_EPOCH + 1, id="mid-epoch-1"), pytest.param(STEPS_PER_EPOCH, id="end-of-epoch-0")]
)
def test_resume_across_epochs_matches_the_uninterrupted_run(tmp_path, uninterrupted, stop):
    full, full_dir, expected_batches = uninterrupted
    batches = []
    # A signal is handled once the batch after it has finished, so it is sent one step before the checkpoint's.
    with recording(batches, stop_after=stop - 1), pytest.raises(RunInterrupted):
        run_experiment(smoke_config(*EPOCHS), tmp_path / "resumed")
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == stop
    with recording(batches):
        resumed = run_experiment(smoke_config(*EPOCHS, "ckpt_path=last"), tmp_path / "resumed")
    assert batches == expected_batches  # the same batches in the same epochs, none twice, none skipped
    assert resumed["train"]["steps"] == full["train"]["steps"] == 3 * STEPS_PER_EPOCH
    assert resumed["train"]["loss_curve"] == full["train"]["loss_curve"]
    expected, actual = adapter_tensors(full_dir), adapter_tensors(tmp_path / "resumed")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_a_checkpoint_with_the_old_dataloader_position_resumes_exactly(tmp_path, uninterrupted):
    """Checkpoints written before the data module held the position kept it as Lightning's dataloader state."""
    full, full_dir, expected_batches = uninterrupted
    batches = []
    with recording(batches, stop_after=STEPS_PER_EPOCH), pytest.raises(RunInterrupted):  # checkpoint at step + 1
        run_experiment(smoke_config(*EPOCHS), tmp_path / "resumed")
    path = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=False)
    position = ckpt.pop("SFTDataModule")
    assert position == {"epoch": 1, "consumed": 1}
    ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] = [position]
    torch.save(ckpt, path)
    with recording(batches):
        run_experiment(smoke_config(*EPOCHS, "ckpt_path=last"), tmp_path / "resumed")
    assert batches == expected_batches
    for key, tensor in adapter_tensors(full_dir).items():
        assert torch.equal(adapter_tensors(tmp_path / "resumed")[key], tensor), key


def test_a_signal_within_gradient_accumulation_saves_after_the_optimizer_step(tmp_path):
    """With 2 micro-batches per step, an epoch of 3 batches makes 2 steps (its last batch steps alone). A signal seen
    during the first micro-batch of a step is handled once that step is done: a checkpoint between micro-batches would
    lose the gradient accumulated so far, and the resumed run would train other weights."""
    accumulating = [*EPOCHS, "trainer.accumulate_grad_batches=2"]
    expected_batches, batches = [], []
    with recording(expected_batches):
        full = run_experiment(smoke_config(*accumulating), tmp_path / "full")
    assert full["train"]["steps"] == 6 and len(expected_batches) == 9
    # SIGTERM after epoch 0's last batch (step 2): it is seen during batch 4, the first micro-batch of step 3.
    with recording(batches, stop_after_batch=STEPS_PER_EPOCH), pytest.raises(RunInterrupted):
        run_experiment(smoke_config(*accumulating), tmp_path / "resumed")
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert (ckpt["global_step"], ckpt["SFTDataModule"]) == (3, {"epoch": 1, "consumed": 2})
    with recording(batches):
        resumed = run_experiment(smoke_config(*accumulating, "ckpt_path=last"), tmp_path / "resumed")
    assert batches == expected_batches
    assert resumed["train"]["loss_curve"] == full["train"]["loss_curve"]
    expected, actual = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "resumed")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_every_optimizer_step_takes_the_mean_gradient_of_its_batches_also_in_an_epochs_last_short_window(tmp_path):
    """3 batches per epoch in windows of 2: the third batch steps alone. Lightning divided its loss by 2 as well, so
    the last step of every epoch took half the gradient of the batch it trained on (clipping saw half the norm)."""
    windows, grads = [[]], []
    training_step = FineTuneModule.training_step

    def record(self, batch, batch_idx):
        params = [p for p in self.parameters() if p.requires_grad]
        windows[-1].append(torch.autograd.grad(self.model(**batch).loss, params))  # this batch's own mean gradient
        return training_step(self, batch, batch_idx)

    class Grads(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.append([p.grad.clone() for p in pl_module.parameters() if p.requires_grad])
            windows.append([])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FineTuneModule, "training_step", record)
        patch.setattr(runner, "_trainer", with_callback(runner._trainer, Grads()))
        cfg = smoke_config(*EPOCHS, "trainer.accumulate_grad_batches=2", "trainer.gradient_clip_val=null")
        assert run_experiment(cfg, tmp_path / "run")["train"]["steps"] == 6
    assert [len(window) for window in windows[:-1]] == [2, 1] * 3
    for window, step in zip(windows[:-1], grads, strict=True):
        for i, grad in enumerate(step):
            assert torch.allclose(grad, sum(batch[i] for batch in window) / len(window), rtol=1e-4, atol=1e-7)


def with_callback(make_trainer, callback):
    """`runner._trainer` that adds `callback` to the Trainer it builds."""

    def build(*args, **kwargs):
        trainer = make_trainer(*args, **kwargs)
        trainer.callbacks.append(callback)
        return trainer

    return build
