"""Callbacks: the atomic checkpoint writer and select_best=val_loss."""

import csv
import os

import pytest
import torch
from conftest import compose_run

from s2ft.lightning import run_experiment
from s2ft.lightning.callbacks import AtomicCheckpointIO


def state(step: int, **extra) -> dict:
    """The fields a checkpoint of this runner has, at `step`."""
    return {"state_dict": {}, "global_step": step, "loops": {}, "optimizer_states": [], **extra}


def test_atomic_checkpoint_never_leaves_a_truncated_file_and_keeps_the_one_before(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    previous = path.with_name("previous.ckpt")
    io = AtomicCheckpointIO()
    io.save_checkpoint(state(1, w=torch.arange(3)), path)
    assert not previous.exists()
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises, the old checkpoint must survive
        io.save_checkpoint(state(2, bad=lambda: None), path)
    assert torch.load(path)["global_step"] == 1 and not previous.exists()
    io.save_checkpoint(state(3), path)
    assert torch.load(path)["global_step"] == 3 and torch.load(previous)["global_step"] == 1
    io.save_checkpoint(state(4), path)
    assert torch.load(path)["global_step"] == 4 and torch.load(previous)["global_step"] == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt", "previous.ckpt"]  # the failed one's removed
    assert io.load_checkpoint(path)["global_step"] == 4


def test_a_checkpoint_is_synced_and_then_its_rename_is_synced_in_the_directory(tmp_path, monkeypatch):
    """The rename was not made durable: after a power loss the directory could still point at the old file."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    AtomicCheckpointIO().save_checkpoint(state(1), tmp_path / "last.ckpt")
    assert events == [("fsync", False), ("replace", "last.ckpt"), ("fsync", True)]


def test_a_damaged_last_checkpoint_never_replaces_a_good_previous_one(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    previous = path.with_name("previous.ckpt")
    AtomicCheckpointIO().save_checkpoint(state(2), path)
    path.rename(previous)
    path.write_bytes(b"torn")
    io = AtomicCheckpointIO()  # a session resuming from previous.ckpt: last.ckpt is not known to be good
    assert io.load_checkpoint(previous)["global_step"] == 2
    io.save_checkpoint(state(3), path)
    assert torch.load(path)["global_step"] == 3 and torch.load(previous)["global_step"] == 2


def test_checkpoints_honour_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        AtomicCheckpointIO().save_checkpoint(state(1), tmp_path / "last.ckpt")
    finally:
        os.umask(old)
    assert (tmp_path / "last.ckpt").stat().st_mode & 0o777 == 0o640


def test_select_best_keeps_the_lowest_validation_loss(tmp_path):
    overrides = ["debug=smoke", "eval=none", "trainer.max_steps=6", "trainer.val_check_interval=2"]
    cfg = compose_run(*overrides, "trainer.select_best=val_loss", "method.lr=0.05")
    summary = run_experiment(cfg, tmp_path)
    with open(tmp_path / "metrics.csv") as f:
        val = [float(row["val/loss"]) for row in csv.DictReader(f) if row.get("val/loss")]
    assert len(val) == 3
    assert summary["train"]["best_val_loss"] == pytest.approx(min(val), rel=1e-6)
    curve = summary["train"]["val_curve"]
    assert [step for step, _ in curve] == [2, 4, 6]
    assert [loss for _, loss in curve] == pytest.approx(val, rel=1e-6)
    assert summary["train"]["val_loss"] == curve[-1][1]
