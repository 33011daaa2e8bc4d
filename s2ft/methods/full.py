"""Full fine-tuning: every parameter trains; the result is saved as a complete safetensors checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import nn

from s2ft.methods.method import Method

DEFAULTS: dict[str, Any] = {}


def prepare(model: nn.Module, options: dict[str, Any], calibration, name: str = "full") -> nn.Module:
    model.requires_grad_(True)
    return model


def save(model: nn.Module, out_dir: Path) -> None:
    # save_pretrained writes safetensors and handles tied embeddings; the folder also loads with from_pretrained.
    model.save_pretrained(out_dir)


def load(model: nn.Module, path: Path) -> nn.Module:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no .safetensors weights: pass a folder written by save_trained")
    state = {key: value for file in files for key, value in load_file(file).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [key for key in missing if key not in tied]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.requires_grad_(False)


def merge(model: nn.Module) -> nn.Module:
    return model


METHOD = Method("full", DEFAULTS, prepare, save, load, merge, fp32_trainables=False)
