"""s2ft: Structured Sparse Fine-Tuning (S2FT) for Llama-like decoders, with adapters in original coordinates."""

from s2ft.adapter import (
    PreparedAdapter,
    fuse_adapters,
    load_adapter,
    merge_adapter,
    merge_and_unload,
    prepare_adapter,
    save_adapter,
    switch_adapter,
    trainable_parameter_count,
    unload,
    unmerge_adapter,
)
from s2ft.adapter_format import Adapter, AdapterError, load_adapter_file
from s2ft.api import apply_s2ft
from s2ft.config import S2FTConfig, S2FTConfigError
from s2ft.layers import S2FTLinear
from s2ft.multi_adapter import add_adapter, load_adapters, loaded_adapters, remove_adapter
from s2ft.permute import permute_model
from s2ft.selection import select_units
from s2ft.structures import find_structures
from s2ft.version import __version__

__all__ = [
    "Adapter",
    "AdapterError",
    "PreparedAdapter",
    "S2FTConfig",
    "S2FTConfigError",
    "S2FTLinear",
    "__version__",
    "add_adapter",
    "apply_s2ft",
    "find_structures",
    "export_lora",
    "fuse_adapters",
    "load_adapter",
    "load_adapter_file",
    "load_adapters",
    "loaded_adapters",
    "merge_adapter",
    "merge_and_unload",
    "permute_model",
    "prepare_adapter",
    "remove_adapter",
    "save_adapter",
    "select_units",
    "switch_adapter",
    "trainable_parameter_count",
    "unload",
    "unmerge_adapter",
]


def __getattr__(name: str):
    # export_lora needs peft, whose import takes seconds; `import s2ft` should not pay it.
    if name == "export_lora":
        from s2ft.export import export_lora

        return export_lora
    raise AttributeError(f"module 's2ft' has no attribute {name!r}")
