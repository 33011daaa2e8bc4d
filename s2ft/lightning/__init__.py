"""The Lightning side of the experiment suite (the only part of `s2ft` that imports Lightning)."""

from s2ft.lightning.datamodule import SFTDataModule
from s2ft.lightning.module import FineTuneModule
from s2ft.lightning.runner import run_experiment

__all__ = ["FineTuneModule", "SFTDataModule", "run_experiment"]
