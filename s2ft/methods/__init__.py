"""Fine-tuning methods behind one interface: S2FT, LoRA, DoRA, full, SpFT and none (evaluation only).

Every method module exposes ``DEFAULTS`` (its options and their defaults), ``prepare(model, options, calibration,
name)``, ``save(model, out_dir)``, ``load(model, path)`` and ``merge(model)``. This module dispatches on the method
name, rejects unknown options early, and reports trainable counts the same way for every method so budgets compare.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import import_module
from pathlib import Path
from typing import Any

import torch
from torch import nn

METHODS = {"s2ft", "lora", "dora", "full", "spft", "none"}
EVAL_ONLY = {"none"}  # methods with nothing to train: a training run with them is a configuration error

_MODULES = {
    "s2ft": "s2ft.methods.s2ft",
    "lora": "s2ft.methods.peft_lora",
    "dora": "s2ft.methods.peft_lora",
    "full": "s2ft.methods.full",
    "spft": "s2ft.methods.spft",
    "none": "s2ft.methods.none",
}


def _module(name: str):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)} (config key method.name)")
    return import_module(_MODULES[name])


def method_options(name: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """Return the method's defaults updated with ``options``; raise on keys the method does not know.

    Args:
        name: A method in ``METHODS``.
        options: The ``method.options`` mapping of the config (``None`` means all defaults).
    """
    module = _module(name)
    defaults = module.DEFAULTS
    options = _plain(options or {})
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(
            f"method {name!r} does not take option(s) {unknown}; its options are {sorted(defaults)} "
            f"(fix method.options in the config)"
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
    model = _module(name).prepare(model, method_options(name, options), calibration, name)
    if name != "full":
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
    _module(name).save(model, out_dir)


def load_trained(model: nn.Module, name: str, path: str | Path) -> nn.Module:
    """Apply what ``save_trained`` wrote at ``path`` to the base ``model`` and return the model to evaluate."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no saved {name} weights at {path}: pass the folder save_trained wrote")
    return _module(name).load(model, path)


def merge_trained(model: nn.Module, name: str) -> nn.Module:
    """Fold what method ``name`` trained into plain weights: a standard, ``save_pretrained``-able transformers model."""
    return _module(name).merge(model)


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
