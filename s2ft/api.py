"""apply_s2ft: select coupled structures, optionally co-permute them, freeze the model and wrap the trained blocks."""

import torch
from torch import nn

from s2ft.config import COMPONENTS, LAYOUTS, S2FTConfig
from s2ft.layers import S2FTLinear
from s2ft.permute import permute_model
from s2ft.selection import select_units
from s2ft.state import S2FTState, attach_state, check_fresh, fingerprint
from s2ft.structures import AXIS, Selection, find_structures, unit_positions


def apply_s2ft(model: nn.Module, cfg: S2FTConfig, calibration=None, layout: str | None = None) -> nn.Module:
    """Turns ``model`` into an S2FT model in place: only the selected units' rows/columns train.

    Selects units with ``cfg`` (``s2ft.selection.select_units``), then calls ``apply_selection``.

    Args:
        model: A supported decoder (see ``s2ft.structures.find_structures``) without S2FT applied.
        cfg: What to train (it validated itself when built).
        calibration: Iterable of tokenized batches for the activation and gradient strategies.
        layout: Overrides ``cfg.layout`` ("gather" or "permuted").

    Returns:
        ``model``, with ``model.s2ft_state`` recording the selection settings.

    Raises:
        AdapterError: If the model already has S2FT applied.
        ValueError: On an invalid config/layout.
    """
    check_fresh(model)
    layout = cfg.layout if layout is None else layout
    return apply_selection(model, select_units(model, cfg, calibration), layout, cfg.metadata())


def apply_selection(model: nn.Module, selection: Selection, layout: str = "gather", metadata=None) -> nn.Module:
    """Freezes every parameter and wraps each projection with selected units in an ``S2FTLinear``.

    With ``layout="permuted"`` the selected units are first co-permuted to the front of each coupled structure
    (function-preserving, ``s2ft.permute.permute_model``) so the trained blocks are contiguous; adapters are still
    saved in the original coordinates and ``merge_and_unload`` permutes back.

    Args:
        model: A supported decoder without S2FT applied.
        selection: ``{(layer, component): unit indices}`` in the model's original coordinates; empty entries are
            skipped.
        layout: "gather" (train index-gathered units in place) or "permuted".
        metadata: Selection settings recorded in ``adapter_config.json``.

    Returns:
        ``model``, in place, with ``model.s2ft_state``.
    """
    check_fresh(model)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    selection = {key: torch.as_tensor(units, dtype=torch.long) for key, units in selection.items() if len(units)}
    if not selection:
        raise ValueError("the selection is empty: S2FT needs at least one unit to train")
    structures = {s.index: s for s in find_structures(model)}
    unknown = [key for key in selection if key[0] not in structures or key[1] not in COMPONENTS]
    if unknown:
        raise ValueError(
            f"selection keys {unknown} are not (layer, component) of this model: layers "
            f"0..{len(structures) - 1}, components {', '.join(COMPONENTS)}"
        )
    unit_perms = {}
    if layout == "permuted":
        selection, permutations = permute_model(model, selection)
        unit_perms = {(layer, c): p.perm(c) for layer, p in permutations.items() for c in COMPONENTS}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    base_fingerprint = fingerprint(model)
    model.requires_grad_(False)
    modules = {}
    for (layer, component), units in sorted(selection.items()):
        structure = structures[layer]
        name, size = structure.module_name(component), structure.unit_size(component)
        wrapped = S2FTLinear(
            structure.linear(component), AXIS[component], unit_positions(units.sort().values, size), size
        )
        model.set_submodule(name, wrapped)
        modules[name] = (layer, component)
    metadata = dict(metadata or {}) | {"layout": layout}
    attach_state(model, S2FTState(modules, metadata, unit_perms, flags, base_fingerprint))
    return model
