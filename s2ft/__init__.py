"""s2ft: Structured Sparse Fine-Tuning (S2FT) for Llama-like decoders, with adapters in original coordinates."""

from s2ft.adapter import (
    fuse_adapters,
    load_adapter,
    merge_adapter,
    merge_and_unload,
    save_adapter,
    switch_adapter,
    trainable_parameter_count,
    unmerge_adapter,
)
from s2ft.adapter_format import Adapter, AdapterError, load_adapter_file
from s2ft.api import apply_s2ft
from s2ft.config import S2FTConfig, S2FTConfigError
from s2ft.layers import S2FTLinear
from s2ft.permute import permute_model
from s2ft.selection import select_units
from s2ft.structures import find_structures
from s2ft.version import __version__

__all__ = [
    "Adapter",
    "AdapterError",
    "S2FTConfig",
    "S2FTConfigError",
    "S2FTLinear",
    "__version__",
    "apply_s2ft",
    "find_structures",
    "fuse_adapters",
    "load_adapter",
    "load_adapter_file",
    "merge_adapter",
    "merge_and_unload",
    "permute_model",
    "save_adapter",
    "select_units",
    "switch_adapter",
    "trainable_parameter_count",
    "unmerge_adapter",
]
