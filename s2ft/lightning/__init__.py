"""The Lightning side of the experiment suite (the only part of `s2ft` that imports Lightning)."""

from s2ft.lightning.datamodule import SFTDataModule
from s2ft.lightning.module import S2FTLitModule
from s2ft.lightning.runner import run_experiment

__all__ = ["S2FTLitModule", "SFTDataModule", "run_experiment"]
