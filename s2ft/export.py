"""Export an S2FT adapter as an exactly equivalent PEFT LoRA adapter, so LoRA servers (vLLM, LoRAX, TGI) serve it.

An S2FT update is a LoRA whose rank is the number of trained rows or columns of a module. With ``D`` the delta
(trained values minus the base values at the trained positions; a LoRA adds to the base weight):

- trained input columns (o, down): ``A`` (r x in) is the one-hot selection of the columns, ``B`` (out x r) is ``D``;
- trained output rows (q, k, v, gate, up): ``A`` (r x in) is ``D``, ``B`` (out x r) is the one-hot scatter.

``B @ A`` is then ``D`` at the trained positions and exactly zero elsewhere, and a one-hot matmul only copies
inputs, so the LoRA output equals S2FT's up to fp rounding of the delta's matmul. Ranks differ per module; they go to
``rank_pattern`` with ``alpha_pattern`` equal to them (scale alpha / r = 1 everywhere, also for servers that read only
the global ``r`` and ``lora_alpha``, which are equal too).
"""

import os
import re
import shutil
import uuid
from collections import Counter
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn

from s2ft.adapter import check_fits
from s2ft.adapter_format import Adapter, AdapterError, check_adapter, load_adapter_file
from s2ft.state import check_fresh, check_unmerged

WEIGHTS_NAME = "adapter_model.safetensors"


def lora_factors(
    delta: torch.Tensor, positions: torch.Tensor, axis: int, shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA ``(A, B)`` with ``B @ A`` equal to ``delta`` at ``positions`` along ``axis`` and zero elsewhere.

    Args:
        delta: The trained rows (axis 0, r x in) or columns (axis 1, out x r) minus the base values.
        positions: Their row or column positions in the weight, length r.
        axis: 0 (output rows) or 1 (input columns).
        shape: The weight's shape (out, in).
    """
    rank, slots = positions.numel(), torch.arange(positions.numel())
    one_hot = torch.zeros(rank, shape[axis], dtype=delta.dtype)
    one_hot[slots, positions] = 1
    return (one_hot, delta) if axis == 1 else (delta, one_hot.T)


def _check_out_dir(out_dir: Path) -> None:
    """Refuses an ``out_dir`` that holds files, or one under a file (which ``mkdir`` refuses with an ``OSError``)."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise AdapterError(f"{out_dir} already exists and is not an empty folder; export to a new folder")
    # exists() is False under a file (NotADirectoryError is swallowed): the first ancestor that exists must be a folder.
    existing = next((p for p in out_dir.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise AdapterError(f"cannot export to {out_dir}: {existing} is a file, not a folder; export to a new folder")


def export_lora(adapter: str | os.PathLike | Adapter, out_dir: str | os.PathLike, base: nn.Module) -> LoraConfig:
    """Writes an S2FT adapter as a PEFT LoRA adapter folder ``out_dir``.

    ``PeftModel.from_pretrained(base, out_dir)`` then gives the S2FT model's outputs within fp32 rounding.

    Args:
        adapter: An S2FT adapter folder (``save_adapter``) or ``Adapter``.
        out_dir: The LoRA folder to write (``adapter_config.json``, ``adapter_model.safetensors``); must not exist or
            be empty, so nothing is overwritten. It appears whole or not at all: the files are written to a staging
            folder beside it, which is then renamed.
        base: The base model the adapter was trained on (the deltas need its weights); not changed.

    Returns:
        The written ``LoraConfig`` (per-module ranks in ``rank_pattern``).

    Raises:
        AdapterError: A bad adapter, one made for another base, an ``out_dir`` that holds files, or one under a file
            (nothing is written).
        AdapterError: Also if ``base`` has S2FT applied or adapters loaded, or holds a merged update
            (``merge_and_unload``, ``fuse_adapters``): its weights are not the base's.
    """
    # An S2FT model's weights hold zeroed or merged slots, which would give wrong deltas without any error.
    check_fresh(base, "export_lora needs the plain base model the adapter was trained on: its weights give the deltas")
    check_unmerged(base, "export_lora")
    if isinstance(adapter, Adapter):
        check_adapter(adapter)
    else:
        adapter = load_adapter_file(adapter)
    check_fits(base, adapter)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    tensors, ranks = {}, {}
    for name, m in adapter.modules.items():
        weight = base.get_submodule(name).weight.detach().cpu().float()
        positions = m.positions
        delta = m.values.float() - weight.index_select(m.axis, positions)
        a, b = lora_factors(delta, positions, m.axis, tuple(weight.shape))
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
        ranks[name] = positions.numel()
    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(name): r for name, r in ranks.items() if r != rank}
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=sorted(ranks),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=adapter.base_model,
    )
    # A stop between the two files would otherwise leave weights without a config: a folder PEFT cannot load and
    # that a second export refuses as not empty.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex}.tmp")
    staging.mkdir()
    try:
        save_file(tensors, staging / WEIGHTS_NAME, metadata={"format": "pt"})
        config.save_pretrained(staging)
        if out_dir.is_dir():
            out_dir.rmdir()  # checked empty above
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return config
