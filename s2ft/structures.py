"""Coupled structures of a decoder: attention heads and FFN channels, located per layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM (or their base models)"
ATTN_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
MLP_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
AXIS = {"q": 0, "k": 0, "v": 0, "gate": 0, "up": 0, "o": 1, "down": 1}  # 0: output rows, 1: input columns
# Which units are trained: (layer index, component) -> sorted unit indices (long).
Selection = dict[tuple[int, str], torch.Tensor]


@dataclass(frozen=True)
class LayerStructure:
    """One decoder layer's attention and FFN, with the sizes that define its units.

    Units: q and o -> query heads (head_dim rows of q_proj, head_dim columns of o_proj); k and v -> KV heads
    (head_dim rows); gate and up -> intermediate channels (one row each); down -> intermediate channels (one column).
    """

    index: int
    prefix: str
    attn: nn.Module
    mlp: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int

    def linear(self, component: str) -> nn.Module:
        """The projection holding `component`'s units, e.g. "o" -> attn.o_proj."""
        if component in ATTN_NAMES:
            return getattr(self.attn, ATTN_NAMES[component])
        return getattr(self.mlp, MLP_NAMES[component])

    def module_name(self, component: str) -> str:
        """Qualified module name of `component`'s projection, e.g. "model.layers.3.self_attn.o_proj"."""
        if component in ATTN_NAMES:
            return f"{self.prefix}.self_attn.{ATTN_NAMES[component]}"
        return f"{self.prefix}.mlp.{MLP_NAMES[component]}"

    def num_units(self, component: str) -> int:
        """Number of units of `component`: query heads, KV heads or intermediate channels."""
        if component in ("q", "o"):
            return self.num_heads
        if component in ("k", "v"):
            return self.num_kv_heads
        return self.intermediate_size

    def unit_size(self, component: str) -> int:
        """Rows (axis 0) or columns (axis 1) per unit: head_dim for attention, 1 for FFN."""
        return self.head_dim if component in ATTN_NAMES else 1

    def unit_params(self, component: str) -> int:
        """Weight entries of one unit: unit_size rows or columns, each hidden_size long (biases are not trained)."""
        return self.unit_size(component) * self.hidden_size

    @property
    def group_size(self) -> int:
        """Query heads per KV head: query head i uses KV head i // group_size."""
        return self.num_heads // self.num_kv_heads


def unit_positions(units: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Expands unit indices into the row (axis 0) or column (axis 1) positions they cover.

    Args:
        units: Unit indices, shape [n].
        unit_size: Rows or columns per unit.

    Returns:
        Long tensor [n * unit_size]: unit u covers positions u * unit_size ... u * unit_size + unit_size - 1,
        in the order of `units`.
    """
    units = torch.as_tensor(units, dtype=torch.long)
    offsets = torch.arange(unit_size, dtype=torch.long, device=units.device)
    return (units[:, None] * unit_size + offsets).reshape(-1)


def find_structures(model: nn.Module) -> list[LayerStructure]:
    """Finds the decoder layers of a Llama-like model and their coupled structures.

    A decoder layer is a module with `self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj`. Head counts and
    sizes come from the model config (an explicit `head_dim` wins over hidden_size // num_attention_heads) and
    are checked against the weight shapes.

    Args:
        model: A causal LM, its base model, or any module wrapping one.

    Returns:
        One LayerStructure per decoder layer, in model order (`index` counts from 0).

    Raises:
        ValueError: If no decoder layer is found (naming what was found instead), or a config and a weight disagree.
    """
    layers = [
        (name, module)
        for name, module in model.named_modules()
        if _has_children(getattr(module, "self_attn", None), ATTN_NAMES.values())
        and _has_children(getattr(module, "mlp", None), MLP_NAMES.values())
    ]
    if not layers:
        raise ValueError(
            f"no decoder layer with self_attn.{{q,k,v,o}}_proj and mlp.{{gate,up,down}}_proj found in "
            f"{type(model).__name__}; found {_describe_first_block(model)}. Supported: {SUPPORTED}."
        )
    return [_structure(index, name, module, model) for index, (name, module) in enumerate(layers)]


def _has_children(module: nn.Module | None, names) -> bool:
    return module is not None and all(isinstance(getattr(module, n, None), nn.Module) for n in names)


def _describe_first_block(model: nn.Module) -> str:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            block = module[0]
            children = ", ".join(f"{n}: {type(c).__name__}" for n, c in block.named_children())
            return f"a block {name}.0 of type {type(block).__name__} with children [{children}]"
    children = ", ".join(f"{n}: {type(c).__name__}" for n, c in model.named_children())
    return f"no list of blocks; top-level children [{children}]"


def _text_config(layer: nn.Module, model: nn.Module):
    config = getattr(layer.self_attn, "config", None) or getattr(model, "config", None)
    if config is None:
        config = next((m.config for m in model.modules() if getattr(m, "config", None) is not None), None)
    if config is None:
        raise ValueError(f"cannot read head counts: no `config` on {type(model).__name__} or its attention modules")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _structure(index: int, prefix: str, layer: nn.Module, model: nn.Module) -> LayerStructure:
    config = _text_config(layer, model)
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    hidden = config.hidden_size
    intermediate = layer.mlp.gate_proj.weight.shape[0]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
    if isinstance(getattr(config, "intermediate_size", None), int) and config.intermediate_size != intermediate:
        raise ValueError(
            f"{prefix}.mlp.gate_proj has {intermediate} rows but config.intermediate_size={config.intermediate_size}"
        )
    structure = LayerStructure(
        index, prefix, layer.self_attn, layer.mlp, num_heads, num_kv_heads, head_dim, hidden, intermediate
    )
    expected = {
        "q": (num_heads * head_dim, hidden),
        "k": (num_kv_heads * head_dim, hidden),
        "v": (num_kv_heads * head_dim, hidden),
        "o": (hidden, num_heads * head_dim),
        "gate": (intermediate, hidden),
        "up": (intermediate, hidden),
        "down": (hidden, intermediate),
    }
    for component, shape in expected.items():
        weight = getattr(structure.linear(component), "weight", None)
        if weight is None or tuple(weight.shape) != shape:
            found = None if weight is None else tuple(weight.shape)
            raise ValueError(
                f"{structure.module_name(component)}.weight has shape {found}, expected {shape} from the config "
                f"(num_attention_heads={num_heads}, num_key_value_heads={num_kv_heads}, head_dim={head_dim}, "
                f"hidden_size={hidden}); is the config the one this model was built with?"
            )
    return structure
