"""Callbacks: the atomic checkpoint writer and select_best=val_loss."""

import csv
import os

import pytest
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from s2ft.lightning import run_experiment
from s2ft.lightning.callbacks import AtomicCheckpointIO


def test_atomic_checkpoint_never_leaves_a_truncated_file(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.arange(3)}, path)
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises, the old checkpoint must survive
        io.save_checkpoint({"step": 2, "bad": lambda: None}, path)
    assert torch.load(path)["step"] == 1
    io.save_checkpoint({"step": 3}, path)
    assert torch.load(path)["step"] == 3
    assert sorted(p.name for p in path.parent.iterdir() if p.name != ".last.ckpt.tmp") == ["last.ckpt"]


def test_select_best_keeps_the_lowest_validation_loss(tmp_path):
    os.environ.setdefault("S2FT_ROOT", str(ROOT))
    overrides = ["debug=smoke", "eval=none", "trainer.max_steps=6", "trainer.val_check_interval=2"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "trainer.select_best=val_loss", "method.lr=0.05"])
    cfg = OmegaConf.merge(cfg, {"trainer": {"val_check_interval": 2}, "method": {"lr": 0.05}})
    summary = run_experiment(OmegaConf.to_container(cfg, resolve=True), tmp_path)
    with open(tmp_path / "metrics.csv") as f:
        val = [float(row["val/loss"]) for row in csv.DictReader(f) if row.get("val/loss")]
    assert len(val) == 3
    assert summary["train"]["best_val_loss"] == pytest.approx(min(val), rel=1e-6)
    curve = summary["train"]["val_curve"]
    assert [step for step, _ in curve] == [2, 4, 6]
    assert [loss for _, loss in curve] == pytest.approx(val, rel=1e-6)
    assert summary["train"]["val_loss"] == curve[-1][1]
