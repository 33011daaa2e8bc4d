"""s2ft: Structured Sparse Fine-Tuning (S2FT) for Llama-like decoders, with adapters in original coordinates."""

__version__ = "0.1.0"

from s2ft.adapter import (  # noqa: E402
    Adapter,
    AdapterError,
    PreparedAdapter,
    fuse_adapters,
    load_adapter,
    load_adapter_file,
    merge_adapter,
    merge_and_unload,
    prepare_adapter,
    save_adapter,
    switch_adapter,
    trainable_parameter_count,
    unmerge_adapter,
)
from s2ft.api import apply_s2ft  # noqa: E402
from s2ft.config import S2FTConfig, S2FTConfigError  # noqa: E402
from s2ft.layers import S2FTLinear  # noqa: E402
from s2ft.multi_adapter import add_adapter, load_adapters, loaded_adapters, remove_adapter  # noqa: E402
from s2ft.permute import permute_model  # noqa: E402
from s2ft.selection import select_units  # noqa: E402
from s2ft.structures import find_structures  # noqa: E402

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
    "unmerge_adapter",
]


def __getattr__(name: str):
    # export_lora needs peft, whose import takes seconds; `import s2ft` should not pay it.
    if name == "export_lora":
        from s2ft.export import export_lora

        return export_lora
    raise AttributeError(f"module 's2ft' has no attribute {name!r}")
