"""The base model as it is: nothing trains (evaluation only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from s2ft.methods.method import Method

DEFAULTS: dict[str, Any] = {}


def prepare(model: nn.Module, options: dict[str, Any], calibration, name: str = "none") -> nn.Module:
    model.requires_grad_(False)
    return model


def save(model: nn.Module, out_dir: Path) -> None:
    """Nothing was trained; record that so a later evaluation of this folder knows to use the base model."""
    (out_dir / "NONE").write_text("method none: the base model, nothing trained\n")


def load(model: nn.Module, path: Path) -> nn.Module:
    return model.requires_grad_(False)


def merge(model: nn.Module) -> nn.Module:
    return model


METHOD = Method("none", DEFAULTS, prepare, save, load, merge, trains=False)
