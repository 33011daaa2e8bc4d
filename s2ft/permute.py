"""Co-permutation: reorders heads and FFN channels in place so that selected units come first, keeping the function."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from s2ft.structures import ATTN_NAMES, AXIS, MLP_NAMES, LayerStructure, Selection, find_structures, unit_positions

# Tensors a layer may hold besides the projections: Qwen3's q_norm / k_norm weights and (older transformers) rotary
# frequencies act within a head, shared by all heads, so a head permutation leaves them valid. Anything else might
# index heads or channels, so it is refused.
HEAD_SHARED = ("q_norm", "k_norm", "rotary_emb")


@dataclass(frozen=True)
class LayerPermutation:
    """The permutations applied to one layer; position i of the new layer holds original unit `perm[i]`.

    Attributes:
        q_heads: Query-head permutation (q rows, o columns).
        kv_heads: KV-head permutation (k and v rows); query head q_heads[i] uses KV head q_heads[i] // group.
        channels: Intermediate-channel permutation (gate and up rows, down columns).
    """

    q_heads: torch.Tensor
    kv_heads: torch.Tensor
    channels: torch.Tensor

    def perm(self, component: str) -> torch.Tensor:
        """The permutation that moves `component`'s units."""
        if component in ("q", "o"):
            return self.q_heads
        if component in ("k", "v"):
            return self.kv_heads
        return self.channels

    def to_original(self, component: str, units: torch.Tensor) -> torch.Tensor:
        """Maps unit indices in the permuted layer back to the original ones, element by element."""
        return self.perm(component)[torch.as_tensor(units, dtype=torch.long)]

    def to_permuted(self, component: str, units: torch.Tensor) -> torch.Tensor:
        """Maps original unit indices to their positions in the permuted layer, element by element."""
        perm = self.perm(component)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel())
        return inverse[torch.as_tensor(units, dtype=torch.long)]


def permute_model(model: nn.Module, selection: Selection) -> tuple[Selection, dict[int, LayerPermutation]]:
    """Co-permutes, in place, every layer named in `selection` so that its selected units come first.

    Attention: under GQA the only function-preserving moves are permuting KV groups (a KV head with its block of
    query heads) and permuting query heads within a group, so query head i keeps KV head i // group. Groups are
    ordered by (most selected "o" heads, most selected "q" heads, KV head in "k", KV head in "v", original index);
    within a group, query heads selected in "o", then in "q", come first. FFN channels are ordered by (selected in
    "down", in "up", in "gate", original index). Selected units are contiguous at the front whenever the layout allows
    (e.g. at most one partially selected group); otherwise the returned selection still holds their correct new
    indices. Biases of q/k/v/gate/up move with their rows; RoPE and Qwen3's q_norm/k_norm act within a head, so the
    logits are unchanged.

    Args:
        model: The model to permute (before any S2FT wrapping).
        selection: (layer, component) -> unit indices in the model's current coordinates.

    Returns:
        The selection in the new coordinates (sorted), and {layer index: LayerPermutation} for the permuted layers.

    Raises:
        ValueError: If a layer does not exist, a layer holds parameters that might index heads or channels, or a
            projection is not a plain weight/bias module.
    """
    structures = find_structures(model)
    layers = sorted({layer for layer, _ in selection})
    missing = [i for i in layers if not 0 <= i < len(structures)]
    if missing:
        raise ValueError(f"selection names layers {missing}; the model has layers 0..{len(structures) - 1}")
    # Everything is checked and planned before the first weight moves, so a bad input leaves the model unchanged.
    permutations = {}
    for layer in layers:
        s = structures[layer]
        _check_permutable(s)
        chosen = {c: _checked_units(s, c, selection.get((layer, c), [])) for c in AXIS}
        q_heads, kv_heads = _head_order(s, chosen)
        channels = _order(s.intermediate_size, [chosen["down"], chosen["up"], chosen["gate"]])
        permutations[layer] = LayerPermutation(q_heads, kv_heads, channels)
    for layer, permutation in permutations.items():
        s = structures[layer]
        for component in AXIS:
            permute_linear(s.linear(component), component, permutation.perm(component), s.unit_size(component))
    new_selection = {
        (layer, c): permutations[layer].to_permuted(c, units).sort().values for (layer, c), units in selection.items()
    }
    return new_selection, permutations


def _checked_units(s: LayerStructure, component: str, units) -> torch.Tensor:
    units = torch.as_tensor(units, dtype=torch.long).reshape(-1).cpu()
    size = s.num_units(component)
    if units.numel() and (units.min() < 0 or units.max() >= size or units.unique().numel() != units.numel()):
        raise ValueError(
            f"selection ({s.index}, {component!r}) must hold distinct unit indices in [0, {size}), got {units.tolist()}"
        )
    return units


def _order(size: int, priorities: list[torch.Tensor]) -> torch.Tensor:
    """range(size) sorted by (not in priorities[0], not in priorities[1], ..., index)."""
    rank = torch.zeros(size, dtype=torch.long)
    for weight, members in enumerate(reversed(priorities)):
        outside = torch.ones(size, dtype=torch.bool)
        outside[members] = False
        rank += outside.long() << weight
    return torch.sort(rank, stable=True).indices


def _head_order(s: LayerStructure, chosen: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    group = s.group_size
    in_o, in_q, in_k, in_v = (set(chosen[c].tolist()) for c in ("o", "q", "k", "v"))

    def group_key(g: int) -> tuple:
        heads = range(g * group, (g + 1) * group)
        return -sum(h in in_o for h in heads), -sum(h in in_q for h in heads), g not in in_k, g not in in_v, g

    def within(g: int, units: torch.Tensor) -> torch.Tensor:
        return units[(units >= g * group) & (units < (g + 1) * group)] - g * group

    kv_heads = sorted(range(s.num_kv_heads), key=group_key)
    q_heads = []
    for g in kv_heads:
        inside = _order(group, [within(g, chosen["o"]), within(g, chosen["q"])])
        q_heads += (g * group + inside).tolist()
    return torch.tensor(q_heads, dtype=torch.long), torch.tensor(kv_heads, dtype=torch.long)


def _check_permutable(s: LayerStructure) -> None:
    projections = {f"self_attn.{n}": s.linear(c) for c, n in ATTN_NAMES.items()}
    projections.update({f"mlp.{n}": s.linear(c) for c, n in MLP_NAMES.items()})
    for name, linear in projections.items():
        extra = [n for n, _ in linear.named_parameters()] + [n for n, _ in linear.named_buffers()]
        if set(extra) - {"weight", "bias"}:
            raise ValueError(
                f"{s.prefix}.{name} is a {type(linear).__name__} holding {extra}; permute_model needs plain "
                f"nn.Linear projections, so permute before apply_s2ft wraps the layers"
            )
    known = {f"self_attn.{n}.{p}" for n in ATTN_NAMES.values() for p in ("weight", "bias")}
    known |= {f"mlp.{n}.{p}" for n in MLP_NAMES.values() for p in ("weight", "bias")}
    for owner, module in (("self_attn", s.attn), ("mlp", s.mlp)):
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            qualified = f"{owner}.{name}"
            shared = name.split(".")[0] in HEAD_SHARED and tensor.numel() <= s.head_dim
            if qualified not in known and not shared:
                raise ValueError(
                    f"{s.prefix}.{qualified} (shape {tuple(tensor.shape)}) may index heads or channels, so permuting "
                    f"would change the model; use layout='gather' for this architecture"
                )


def permute_linear(linear: nn.Module, component: str, perm: torch.Tensor, unit_size: int) -> None:
    positions = unit_positions(perm, unit_size).to(linear.weight.device)
    with torch.no_grad():
        linear.weight.copy_(linear.weight.index_select(AXIS[component], positions))
        if AXIS[component] == 0 and linear.bias is not None:
            linear.bias.copy_(linear.bias.index_select(0, positions))
