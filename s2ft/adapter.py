"""The adapter lifecycle on a model: extract, save, load, merge, unmerge, fuse and switch S2FT adapters.

The file format lives in ``s2ft.adapter_format``; a model's S2FT bookkeeping in ``s2ft.state``. Every function
validates the adapter against the model before touching it, so a refused adapter leaves the model as it was.
"""

import hashlib
import logging
import math
import os
import weakref
from dataclasses import dataclass
from functools import reduce

import torch
from torch import nn

from s2ft.adapter_format import (
    DIGEST_DTYPES,
    Adapter,
    AdapterError,
    AdapterModule,
    as_adapter,
    naming,
    write_adapter,
)
from s2ft.layers import S2FTLinear, plain_linear, slot_major
from s2ft.permute import permute_linear
from s2ft.state import (
    S2FTState,
    attach_state,
    check_fresh,
    check_unmerged,
    detach_state,
    fingerprint,
    mark_merged,
    model_state,
    s2ft_modules,
)
from s2ft.structures import find_structures, unit_positions
from s2ft.version import __version__

log = logging.getLogger(__name__)
# Besides the base's own dtype, a base digest is taken in the half dtypes a base is loaded in for training or serving.
HALF_DTYPES = (torch.bfloat16, torch.float16)


def _reorder_units(values: torch.Tensor, axis: int, unit_size: int, order: torch.Tensor) -> torch.Tensor:
    """Reorders the unit blocks of ``values`` along ``axis``."""
    blocks = values.unflatten(axis, (-1, unit_size))
    return blocks.index_select(axis, order.to(values.device)).flatten(axis, axis + 1)


def extract_adapter(model: nn.Module) -> Adapter:
    """The model's current adapter, mapped back to original coordinates if the model is co-permuted."""
    state = model_state(model)
    modules = {}
    for name, module in s2ft_modules(model).items():
        layer, component = state.modules[name]
        units, values = module.units.cpu(), module.values.detach().cpu()
        if (layer, component) in state.unit_perms:
            units = state.unit_perms[layer, component][units]
            order = torch.argsort(units)
            units, values = units[order], _reorder_units(values, module.axis, module.unit_size, order)
        shape = (module.out_features, module.in_features)
        # A contiguous copy: a switched model keeps trained columns column-major (``switch_adapter``), an ``Adapter``
        # holds plain tensors (safetensors writes only contiguous ones).
        values = values.clone(memory_format=torch.contiguous_format)
        modules[name] = AdapterModule(layer, component, module.axis, module.unit_size, shape, units, values)
    return Adapter(
        modules,
        base_model=_model_name(model),
        fingerprint=state.fingerprint,
        base_digest=base_digest(model, modules),
        config=dict(state.config),
        library_version=__version__,
    )


def _model_name(model: nn.Module) -> str | None:
    return getattr(model, "name_or_path", None) or None


def base_slots(model: nn.Module, modules: dict[str, AdapterModule]) -> dict[str, torch.Tensor]:
    """The base model's own values at each adapter module's rows/columns, in original coordinates and unit order.

    ``model`` may be the plain base or an S2FT model of it, merged or not, co-permuted or not: the trained slots of an
    S2FT layer hold zeros or its values, so its ``base_values`` stand in for them, and a co-permuted layer is read at
    the current positions of the original units. The modules must fit ``model`` (``check_fits``' shape checks).
    """
    state = getattr(model, "s2ft_state", None)
    slots = {}
    for name, m in modules.items():
        module = model.get_submodule(name)
        weight = module.weight.detach()
        positions = unit_positions(_current_units(state, m), m.unit_size).to(weight.device)
        values = weight.index_select(m.axis, positions)
        if isinstance(module, S2FTLinear):
            at = torch.full((weight.shape[m.axis],), -1, dtype=torch.long, device=weight.device)
            at[module.index] = torch.arange(module.index.numel(), device=weight.device)
            found = at[positions]
            hit = (found >= 0).nonzero().flatten()
            values.index_copy_(m.axis, hit, module.base_values.index_select(m.axis, found[hit]).to(values.dtype))
        slots[name] = values.cpu()
    return slots


def _slots_sha256(slots: dict[str, torch.Tensor], dtype: torch.dtype) -> str:
    digest = hashlib.sha256()
    for name in sorted(slots):
        values = slots[name].to(dtype).contiguous()
        digest.update(f"{name}:{tuple(values.shape)};".encode())
        digest.update(values.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _compared_dtype(dtypes: set[torch.dtype]) -> torch.dtype | None:
    """The narrowest of ``dtypes`` that every other one holds exactly; None where there is none (bf16 and fp16).

    A model loaded in mixed dtypes (some linear weights bf16, the rest fp32) holds, rounded to it, what a load of the
    checkpoint in that dtype holds: ``from_pretrained`` rounds as ``Tensor.to`` does, and rounding an exact wider copy
    gives the same bits.
    """
    return next((d for d in dtypes if all(torch.promote_types(d, other) == other for other in dtypes)), None)


def base_digest(model: nn.Module, modules: dict[str, AdapterModule]) -> dict:
    """The digest of the base model's values at the modules' trained slots, as ``adapter_config.json`` records it.

    One SHA-256 over the modules in name order (name, shape, then the values' bytes) per dtype: the base's own (the
    widest of its modules' weights), bfloat16 and float16. An adapter trained on an fp32 base then loads onto the
    same checkpoint in bf16 (compared in bf16: ``from_pretrained`` rounds as ``Tensor.to`` does) and one trained on
    a bf16 base onto the fp32 checkpoint (whose values are compared rounded to bf16), while another checkpoint of the
    same architecture (a base and its -Instruct, another initialization) is told apart. Digests, not values: the
    record stays a few bytes, and equal digests mean equal values.

    A base in mixed dtypes (some weights bf16, the rest fp32) records the narrowest (``_compared_dtype``) as its own:
    a digest in the widest would hold the narrow weights' rounded values, and the checkpoint loaded in that dtype,
    the adapter's own base, was refused.

    Args:
        model: The base model or an S2FT model of it (see ``base_slots``).
        modules: The adapter's modules (original coordinates).

    Returns:
        ``{"dtype": NAME, "sha256": {NAME: hex digest}}``.
    """
    slots = base_slots(model, modules)
    dtypes = {values.dtype for values in slots.values()}
    own = _compared_dtype(dtypes) or reduce(torch.promote_types, dtypes)
    return {
        "dtype": _dtype_name(own),
        "sha256": {_dtype_name(dtype): _slots_sha256(slots, dtype) for dtype in dict.fromkeys((own, *HALF_DTYPES))},
    }


def check_base(model: nn.Module, adapter: Adapter) -> None:
    """Checks that ``model`` holds the adapter's base weights at its trained slots (the recorded ``base_digest``).

    The model's values are compared in its own dtype when the adapter records a digest in it, else rounded to the
    dtype of the adapter's base (a wider model than the base it was trained on); a model in mixed dtypes, in the
    narrowest, which its other dtypes hold exactly (``_compared_dtype``). An adapter without a digest (saved
    before it was recorded) is not checked: a one-line warning says so.

    Raises:
        AdapterError: Naming both bases and the fix, when the values differ.
    """
    recorded = adapter.base_digest
    trained_on = adapter.base_model or "unknown"
    if recorded is None:
        log.warning(
            "the S2FT adapter of %s records no base digest (saved by an older s2ft): its base weights are not checked",
            trained_on,
        )
        return
    slots = base_slots(model, adapter.modules)
    dtypes = {values.dtype for values in slots.values()}
    names = sorted(_dtype_name(d) for d in dtypes)
    here = names[0] if len(names) == 1 else f"mixed dtypes: {', '.join(names)}"
    # A model in mixed dtypes is compared in the one that holds all its values as a load of the base in it would.
    compared = _compared_dtype(dtypes)
    own = None if compared is None else _dtype_name(compared)
    dtype = own if own in recorded["sha256"] else recorded["dtype"]
    if _slots_sha256(slots, DIGEST_DTYPES[dtype]) == recorded["sha256"][dtype]:
        return
    name = _model_name(model)
    recorded_base = f"{adapter.base_model or 'recorded without a name'}, {recorded['dtype']}"
    if compared is None:
        # bf16 and fp16 weights (each rounded from the checkpoint) hold no one dtype's load of it: the digests cannot
        # tell this base from another, so "not the base" would be a guess.
        raise AdapterError(
            f"this model ({name or 'unnamed'}, {here}) holds the adapter's modules in dtypes that round the base "
            "each its own way, so its weights cannot be compared with the base the adapter was trained on "
            f"({recorded_base}): "
            f"load the base model in one dtype, the adapter's {recorded['dtype']}: from_pretrained(..., "
            f"torch_dtype=torch.{recorded['dtype']}) (casting weights already rounded to one half dtype to another "
            "does not give the base's values back)"
        )
    loaded = f"{name or 'unnamed'}, {here}"
    # Under one name and dtype the weights changed (a folder or hub revision); in another dtype, rounding may differ.
    # Two missing names are no name in common: saying "the same name" there described models that have none.
    if name is not None and name == adapter.base_model and here == recorded["dtype"]:
        renamed = "; the same name, so the weights behind it changed"
    elif name is None and adapter.base_model is None:
        renamed = "; neither model has a name_or_path, so only their weights tell them apart"
    else:
        renamed = ""
    rounding = (
        f"; a checkpoint rounded to another dtype can differ too, so load the base in {recorded['dtype']}"
        if here != recorded["dtype"]
        else ""
    )
    raise AdapterError(
        f"this model ({loaded}) is not the base the adapter was trained on ({recorded_base}{renamed}): its weights "
        f"at the adapter's trained rows/columns differ (SHA-256 in {dtype}), as another "
        "checkpoint of the same architecture (a base and its -Instruct, another initialization) does, and the "
        "adapter's values would replace or offset the wrong weights. Load the adapter onto the model it was trained "
        f"on{rounding}"
    )


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Writes the model's adapter to the folder ``path`` (created if needed), atomically per file.

    Args:
        model: A model with S2FT applied (``apply_s2ft`` or ``load_adapter``).
        path: Output folder; gets ``adapter.safetensors`` and ``adapter_config.json``.
    """
    write_adapter(extract_adapter(model), path)


def check_fits(model: nn.Module, adapter: Adapter) -> None:
    """Checks that ``adapter`` was made for ``model``: its architecture (module names, shapes, fingerprint, heads) and
    its weights (``check_base``).

    Raises:
        AdapterError: Naming the first mismatch.
    """
    named = dict(model.named_modules())
    for name, m in adapter.modules.items():
        module = named.get(name)
        if not isinstance(module, (nn.Linear, S2FTLinear)):
            found = "nothing" if module is None else type(module).__name__
            raise AdapterError(
                f"adapter module {name!r} is not a linear layer of this model (found {found}): the adapter was made "
                f"for another base model ({adapter.base_model or 'unknown'})"
            )
        shape = (module.out_features, module.in_features)
        if shape != m.shape:
            raise AdapterError(
                f"adapter module {name!r} has weight shape {m.shape} but the model's is {shape}: the adapter was made "
                f"for another base model ({adapter.base_model or 'unknown'})"
            )
    state = getattr(model, "s2ft_state", None)
    model_fingerprint = state.fingerprint if state is not None else fingerprint(model)
    if adapter.fingerprint is not None and adapter.fingerprint != model_fingerprint:
        raise AdapterError(
            f"the model's parameter names/shapes differ from the base the adapter was trained on "
            f"({adapter.base_model or 'unknown'}); load it onto that base model"
        )
    # Names and shapes do not fix the heads: 8 heads of 8 and 4 heads of 16 have the same weights' shapes.
    structures = {s.index: s for s in find_structures(model)}
    for name, m in adapter.modules.items():
        structure = structures.get(m.layer)
        if structure is None or structure.module_name(m.component) != name:
            found = f"layer {m.layer} has no such projection" if structure is None else "it is not"
            raise AdapterError(
                f"adapter module {name!r} is recorded as the {m.component} projection of layer {m.layer}, but in this "
                f"model {found}: a corrupt adapter, or one made for another base ({adapter.base_model or 'unknown'})"
            )
        if structure.unit_size(m.component) != m.unit_size:
            raise AdapterError(
                f"adapter module {name!r} trains {m.component} units of {m.unit_size} rows/columns, but this model's "
                f"are of {structure.unit_size(m.component)} (another head_dim): the adapter was made for another base "
                f"model ({adapter.base_model or 'unknown'})"
            )
    check_base(model, adapter)


def _current_units(state: S2FTState | None, m: AdapterModule) -> torch.Tensor:
    """The module's units in the model's current (possibly co-permuted) coordinates, in the adapter's order."""
    if state is None or (m.layer, m.component) not in state.unit_perms:
        return m.units
    return torch.argsort(state.unit_perms[m.layer, m.component])[m.units]


def _current_coordinates(state: S2FTState | None, m: AdapterModule) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's positions and values in the model's current (possibly permuted) coordinates, sorted."""
    if state is None or (m.layer, m.component) not in state.unit_perms:
        return m.positions, m.values
    units = _current_units(state, m)
    order = torch.argsort(units)
    return unit_positions(units[order], m.unit_size), _reorder_units(m.values, m.axis, m.unit_size, order)


def load_adapter(base: nn.Module, path, trainable: bool = False) -> nn.Module:
    """Applies a saved adapter to a base model (in place; unmerged), after validating everything.

    Args:
        base: The base model the adapter was trained on, without S2FT applied.
        path: Adapter folder, or an ``Adapter``.
        trainable: Keep the adapter's values trainable (to continue training), in fp32 at least whatever the base's
            dtype; all base weights are frozen. Otherwise the values keep the file's dtype.

    Returns:
        ``base`` with the adapter's modules replaced by S2FTLinear.

    Raises:
        AdapterError: See ``load_adapter_file`` and ``check_fits``; the model is unchanged when raised.
        AdapterError: Also if ``base`` already has an S2FT adapter, or holds a merged one (``merge_and_unload``,
            ``fuse_adapters``).
    """
    check_fresh(base, "use s2ft.switch_adapter(model, path) instead")
    check_unmerged(base, "load_adapter")
    adapter = as_adapter(path)
    check_fits(base, adapter)
    flags = {name: p.requires_grad for name, p in base.named_parameters()}
    base.requires_grad_(False)
    for name, m in adapter.modules.items():
        # Values keep the file's precision (fp32 beside a bf16 base, as training keeps them); trained: fp32 at least.
        dtype = torch.promote_types(m.values.dtype, torch.float32) if trainable else m.values.dtype
        layer = S2FTLinear(base.get_submodule(name), m.axis, m.positions, m.unit_size, m.values, dtype)
        layer.values.requires_grad_(trainable)
        base.set_submodule(name, layer)
    modules = {name: (m.layer, m.component) for name, m in adapter.modules.items()}
    attach_state(base, S2FTState(modules, dict(adapter.config), requires_grad=flags, fingerprint=fingerprint(base)))
    return base


def merge_adapter(model: nn.Module) -> None:
    """Writes every S2FTLinear's values into its weight (exact copy; forward is a plain linear)."""
    model_state(model)
    for module in s2ft_modules(model).values():
        module.merge()


def unmerge_adapter(model: nn.Module) -> None:
    """Undoes ``merge_adapter`` exactly."""
    model_state(model)
    for module in s2ft_modules(model).values():
        module.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merges the adapter and returns a plain transformers model in the original coordinates (in place).

    S2FTLinear modules become ``nn.Linear`` holding the merged weights, a co-permuted model is permuted back, and the
    parameters' requires_grad flags are restored, so ``save_pretrained`` / ``from_pretrained`` work as usual. Weights
    that ``switch_adapter`` stored column-major are stored row-major again, as ``from_pretrained`` gives them: the
    plain model computes bit for bit what the freshly merged one does (a matmul's rounding can depend on the layout).

    The result is marked ``model.s2ft_merged = True``: ``load_adapter``, ``load_adapters``, ``fuse_adapters`` and
    ``export_lora`` refuse it, and ``switch_adapter`` and ``prepare_adapter`` an S2FT model applied on it, since their
    deltas are taken against the base (``unload`` gives the base back instead).
    """
    _unwrap(model, merge=True)
    mark_merged(model)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Removes the adapter without merging it and returns the plain base model in the original coordinates (in place).

    The base model's own values go back into the trained rows/columns (``base_values``, kept since the adapter was
    applied), so the result is the base model bit for bit, as ``from_pretrained`` gave it: the model to give
    ``load_adapters`` or another ``load_adapter``, without loading the base again. The adapter is lost unless saved
    first (``save_adapter``).
    """
    return _unwrap(model, merge=False)


def _unwrap(model: nn.Module, merge: bool) -> nn.Module:
    state = model_state(model)
    for name, module in s2ft_modules(model).items():
        if merge:
            module.merge()
        else:
            module.restore_base()
        model.set_submodule(name, plain_linear(module))
    for module in model.modules():  # also the modules a switch unwrapped (restored to the base, left column-major)
        if isinstance(module, nn.Linear) and not module.weight.is_contiguous():
            module.weight.data = module.weight.data.contiguous()
    if state.unit_perms:
        _restore_original_order(model, state.unit_perms)
    for name, param in model.named_parameters():
        param.requires_grad_(state.requires_grad.get(name, True))
    detach_state(model)
    return model


def _restore_original_order(model: nn.Module, unit_perms: dict[tuple[int, str], torch.Tensor]) -> None:
    """Undoes the co-permutation by applying each component's inverse unit permutation."""
    structures = {s.index: s for s in find_structures(model)}
    for (layer, component), perm in unit_perms.items():
        structure = structures[layer]
        permute_linear(structure.linear(component), component, torch.argsort(perm), structure.unit_size(component))


def fuse_adapters(base: nn.Module, paths_or_adapters, weights=None) -> nn.Module:
    """Adds several adapters to a plain base model: ``W = W_base + sum_i w_i * (values_i - W_base[units_i])``.

    Deltas are taken against the base before any is added, so overlapping units add up and disjoint units are each
    set to their own adapter's (weighted) values. The result is merged into ``base`` in place (the paper's fusion).

    Args:
        base: The plain base model (no S2FT applied).
        paths_or_adapters: Adapter folders or ``Adapter`` objects.
        weights: One weight per adapter (default: all 1).

    Raises:
        AdapterError: On a bad adapter or a mismatched base (``adapter I of N (FOLDER): ...``), or weights that are
            not one finite number per adapter; the model is unchanged when raised.
        AdapterError: Also if ``base`` has S2FT applied or adapters loaded, or already holds a merged update (a
            fused or ``merge_and_unload`` model: fuse every adapter in one call).

    The result is marked ``base.s2ft_merged = True`` (see ``merge_and_unload``).
    """
    check_fresh(base, "fuse_adapters needs the plain base model: s2ft.unload(model) gives it back, or load a fresh one")
    check_unmerged(base, "fuse_adapters")
    # One folder or one weight is iterable too (by characters, or not at all): refuse it before any file is read.
    if isinstance(paths_or_adapters, (str, os.PathLike, Adapter)):
        raise AdapterError(f"fuse_adapters takes a list of adapters, got {paths_or_adapters!r}: give [path, ...]")
    weights = None if weights is None else _numbers(weights)
    sources = list(paths_or_adapters)
    adapters = []
    for i, source in enumerate(sources):
        with naming(f"adapter {i + 1} of {len(sources)}", source):
            adapters.append(as_adapter(source))
    weights = [1.0] * len(adapters) if weights is None else weights
    if not adapters or len(weights) != len(adapters) or not all(math.isfinite(w) for w in weights):
        raise AdapterError(f"give one finite weight per adapter: {len(adapters)} adapters, weights {weights}")
    for i, (source, adapter) in enumerate(zip(sources, adapters, strict=True)):
        with naming(f"adapter {i + 1} of {len(sources)}", source):
            check_fits(base, adapter)
    parts: dict[str, list[tuple[AdapterModule, float]]] = {}
    for adapter, w in zip(adapters, weights, strict=True):
        for name, m in adapter.modules.items():
            parts.setdefault(name, []).append((m, w))
    fused = []
    for name, modules in parts.items():
        weight = base.get_submodule(name).weight
        axis = modules[0][0].axis
        positions = torch.cat([m.positions for m, _ in modules]).unique().to(weight.device)
        # Summed in fp64 and rounded to the weight's dtype once: base + (values - base) is then exactly the values, so
        # one adapter of weight 1 gives what merging it gives, bit for bit, also fp32 values on a bf16 base (each
        # delta rounded to bf16 and added into the bf16 weight rounded twice: one entry in three was 1 ulp off).
        base_slots = weight.detach().index_select(axis, positions).double()
        slots = base_slots.clone()
        for m, w in modules:
            at = torch.searchsorted(positions, m.positions.to(weight.device))
            slots.index_add_(
                axis, at, w * (m.values.to(weight.device, torch.float64) - base_slots.index_select(axis, at))
            )
        fused.append((weight, axis, positions, slots.to(weight.dtype)))
    with torch.no_grad():
        for weight, axis, positions, slots in fused:
            weight.index_copy_(axis, positions, slots)
    mark_merged(base)
    return base


def _numbers(weights) -> list[float]:
    """``weights`` as a list of floats; an ``AdapterError`` for a number, a string or anything else not a list of
    numbers."""
    try:
        numbers = [float(w) for w in weights]
    except (TypeError, ValueError):
        numbers = None
    if numbers is None or isinstance(weights, str):
        raise AdapterError(f"fuse_adapters weights must be a list of numbers, one per adapter, got {weights!r}")
    return numbers


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter validated once for one S2FT model: ``switch_adapter`` to it only copies rows and columns.

    Attributes:
        adapter: The adapter.
        slots: Per module name, its positions and values in the model's current (possibly permuted) coordinates, on
            the model's device.
        model_state: The ``s2ft_state`` of the model it was prepared for (weakly); on any other model it is
            validated again.
    """

    adapter: Adapter
    slots: dict[str, tuple[torch.Tensor, torch.Tensor]]
    model_state: weakref.ref


def prepare_adapter(model: nn.Module, path_or_adapter) -> PreparedAdapter:
    """Reads and validates an adapter for ``model`` once, so that switching to it later costs only the copies.

    Args:
        model: An S2FT model (``apply_s2ft`` or ``load_adapter``); it is not changed.
        path_or_adapter: Adapter folder or ``Adapter``.

    Raises:
        AdapterError: On a bad adapter or one made for another base, or a model applied on one that holds a merged
            update (``merge_and_unload``, ``fuse_adapters``).
    """
    state = model_state(model)
    # S2FT applied on a merged model keeps the mark (``mark_merged``): an adapter of the original base that trains
    # other rows/columns passes the base check there and would be switched in on top of the merged update.
    check_unmerged(model, "prepare_adapter")
    adapter = as_adapter(path_or_adapter)
    check_fits(model, adapter)
    slots = {}
    for name, m in adapter.modules.items():
        device = model.get_submodule(name).weight.device
        positions, values = _current_coordinates(state, m)
        slots[name] = (positions.to(device), slot_major(values.to(device), m.axis))
    return PreparedAdapter(adapter, slots, weakref.ref(state))


def switch_adapter(model: nn.Module, path_or_adapter) -> nn.Module:
    """Replaces the model's adapter by another one, touching only the old and new rows/columns.

    The old adapter's slots are restored from the stored base values and the new adapter's values are written;
    modules trained by both are retargeted in place (no module rebuild). Merged state is kept. A folder or an
    ``Adapter`` is validated on every call; a ``PreparedAdapter`` (``prepare_adapter``) for this model was validated
    once, so switching to it is only the copies. The weights of modules trained by columns (o, down) are stored
    column-major from the first switch on (same values; ``S2FTLinear.store_slot_major``), so that a switch copies
    whole runs of memory instead of writing into every row.

    Trainable values stay trainable, but an optimizer built before the switch does not follow it: it holds the
    modules' old parameters (a module newly wrapped gets a new one) and the old adapter's moments, so build a new
    optimizer after switching before training on.

    Raises:
        AdapterError: On a bad adapter or one made for another base, or a model applied on one that holds a merged
            update (``merge_and_unload``, ``fuse_adapters``; see ``prepare_adapter``); the model is unchanged when
            raised.
    """
    state = model_state(model)
    check_unmerged(model, "switch_adapter")  # before a PreparedAdapter skips prepare_adapter's checks
    prepared = path_or_adapter
    if not isinstance(prepared, PreparedAdapter) or prepared.model_state() is not state:
        source = prepared.adapter if isinstance(prepared, PreparedAdapter) else prepared
        prepared = prepare_adapter(model, source)
    current = s2ft_modules(model)
    merged = any(module.merged for module in current.values())
    trainable = any(module.values.requires_grad for module in current.values())
    # Newly wrapped modules keep their values in the model's values dtype (fp32 beside a bf16 weight), like the
    # modules that are retargeted, so that no adapter value is rounded to the weight's dtype; frozen values, in the
    # wider of that and the adapter's dtype (fp32 values after bf16 ones).
    values_dtype = next((module.values.dtype for module in current.values()), None)
    for name, module in current.items():
        if name not in prepared.slots:
            module.restore_base()
            model.set_submodule(name, plain_linear(module))
    for name, m in prepared.adapter.modules.items():
        positions, values = prepared.slots[name]
        if name in current:
            layer = current[name]
            layer.store_slot_major()
            layer.retarget(positions, values, merged, checked=True)
        else:
            dtype = values_dtype if trainable else torch.promote_types(values_dtype, values.dtype)
            layer = S2FTLinear(model.get_submodule(name), m.axis, positions, m.unit_size, values, dtype)
            layer.store_slot_major()
            model.set_submodule(name, layer)
            if merged:
                layer.merge()
        layer.values.requires_grad_(trainable)
    state.modules = {name: (m.layer, m.component) for name, m in prepared.adapter.modules.items()}
    state.config = dict(prepared.adapter.config)
    return model


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of parameter entries with ``requires_grad`` (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
