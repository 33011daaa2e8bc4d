"""Fine-tuning methods behind one interface: S2FT, LoRA, DoRA, full, SpFT and none (evaluation only).

Every method module defines a ``Method`` (``s2ft.methods.method``): its options with their defaults and its
``prepare``, ``save``, ``load`` and ``merge`` steps; they are registered in ``METHODS`` by name. This module
dispatches on the method name, rejects unknown options early, and reports trainable counts the same way for every
method so budgets compare.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from s2ft.adapter_format import CONFIG_NAME, FORMAT, AdapterError
from s2ft.methods import full, none, peft_lora, spft
from s2ft.methods import s2ft as s2ft_method
from s2ft.methods.method import Method
from s2ft.methods.spft import ADAPTER_FILE as SPFT_FILE
from s2ft.registry import Registry

METHODS: Registry[Method] = Registry("method")
for _method in (s2ft_method.METHOD, peft_lora.LORA, peft_lora.DORA, full.METHOD, spft.METHOD, none.METHOD):
    METHODS.register(_method.name)(_method)


def get_method(name: str) -> Method:
    """The registered method ``name``.

    Raises:
        ValueError: For an unknown name, listing the registered ones.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)} (config key method.name)")
    return METHODS[name]


def method_options(name: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """Return the method's defaults updated with ``options``; raise on keys the method does not know.

    Args:
        name: A method in ``METHODS``.
        options: The ``method.options`` mapping of the config (``None`` means all defaults).
    """
    defaults = get_method(name).defaults
    options = _plain(options or {})
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        nearest = {key: difflib.get_close_matches(key, list(defaults), n=1) for key in unknown}
        hints = ", ".join(f"{key} -> {close[0]}" for key, close in nearest.items() if close)
        hint = f"did you mean {hints}? " if hints else ""
        raise ValueError(
            f"method {name!r} does not take option(s) {unknown}; its options are {sorted(defaults)} "
            f"({hint}fix method.options in the config)"
        )
    return {**defaults, **options}


def _plain(value):
    """Nested mappings/sequences (e.g. OmegaConf containers) as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(item) for item in value]
    return value


def prepare_model(model: nn.Module, name: str, options: dict[str, Any] | None = None, calibration=None) -> nn.Module:
    """Make exactly the parameters of method ``name`` trainable (injecting modules where the method needs them).

    Args:
        model: A causal LM (``transformers`` decoder).
        name: A method in ``METHODS``.
        options: The method's options (``method.options`` in the config); unknown keys are an error.
        calibration: Batches for data-dependent S2FT selection strategies (ignored by the other methods).

    Returns:
        The prepared model (for LoRA/DoRA a PEFT wrapper around ``model``, otherwise ``model`` itself). Every
        trainable tensor of an adapter method (S2FT, LoRA, DoRA, SpFT) is fp32 whatever the model's dtype, so bf16
        rounding loses no update; frozen weights keep the model's dtype. Full fine-tuning keeps the model's dtype (a
        7B model's weights in fp32 would not fit one GPU beside their optimizer state); its optimizer holds fp32
        master copies instead (``s2ft.lightning.optimizer.MasterWeightAdamW``).
    """
    method = get_method(name)
    model = method.prepare(model, method_options(name, options), calibration, name)
    if method.fp32_trainables:
        upcast_trainable(model)
    return model


def upcast_trainable(model: nn.Module) -> nn.Module:
    """Casts every trainable half-precision (bf16, fp16) parameter of ``model`` to fp32 in place; frozen ones and
    wider ones (fp64) are untouched."""
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and torch.finfo(param.dtype).bits < 32:
            param.data = param.data.float()
    return model


def save_trained(model: nn.Module, name: str, out_dir: str | Path) -> None:
    """Save what method ``name`` trained into ``out_dir``: an adapter, sparse values, or the full weights."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    get_method(name).save(model, out_dir)


def load_trained(model: nn.Module, name: str, path: str | Path) -> nn.Module:
    """Apply what ``save_trained`` wrote at ``path`` to the base ``model`` and return the model to evaluate.

    Raises:
        AdapterError: ``path`` holds what another method saved (the message names that method).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no saved {name} weights at {path}: pass the folder save_trained wrote")
    saved = saved_method(path)
    if saved is not None and saved != name:
        raise AdapterError(f"{path} holds a {saved} adapter, not {name}: load it with method {saved} (method={saved})")
    return get_method(name).load(model, path)


def saved_method(path: str | Path) -> str | None:
    """The method whose ``save_trained`` wrote the folder ``path``, from its files; None when it is none of them."""
    path = Path(path)
    config_file = path / CONFIG_NAME
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(config, dict):
            return None
        if config.get("format") == FORMAT:
            return "s2ft"
        if config.get("peft_type") == "LORA":
            return "dora" if config.get("use_dora") else "lora"
        return None
    if (path / SPFT_FILE).is_file():
        return "spft"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "full"
    return None


def merge_trained(model: nn.Module, name: str) -> nn.Module:
    """Fold what method ``name`` trained into plain weights: a standard, ``save_pretrained``-able transformers model."""
    return get_method(name).merge(model)


def trainable_summary(model: nn.Module) -> dict[str, float]:
    """Count trainable parameters against the size of the base model.

    ``total_params`` counts the base model once: tied tensors once, without the parameters a method adds (LoRA/DoRA
    factors, SpFT deltas) or duplicates (S2FT ``values`` live in zeroed entries of the full-size frozen ``weight``).

    Returns:
        ``{"trainable_params", "total_params", "trainable_pct"}`` with the percentage in [0, 100].
    """
    trainable = total = 0
    for name, param in model.named_parameters():  # tied tensors are listed once
        if param.requires_grad:
            trainable += param.numel()
        if not _is_added(name):
            total += param.numel()
    return {"trainable_params": trainable, "total_params": total, "trainable_pct": 100.0 * trainable / max(total, 1)}


def _is_added(name: str) -> bool:
    """Parameters a method injected on top of the base weights."""
    return "lora_" in name or name.endswith(".values")
