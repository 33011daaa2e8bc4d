"""S2FT adapters: trained rows/columns + their unit indices in the base model's original coordinates.

On disk an adapter is a folder with ``adapter.safetensors`` (``<module name>.values`` per trained module) and
``adapter_config.json`` (base model, shape fingerprint, selection config, library version, and per module its layer,
component, axis, unit size, weight shape and unit indices). Everything is validated before a model is touched.
"""

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from s2ft.errors import UserError
from s2ft.layers import S2FTLinear
from s2ft.permute import permute_linear
from s2ft.structures import AXIS, find_structures, unit_positions

FORMAT = "s2ft-adapter"
WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"


class AdapterError(UserError, ValueError):
    """An adapter that is missing, corrupt, or does not fit the model it is applied to."""


@dataclass
class AdapterModule:
    """One trained module: ``values`` are the rows (axis 0) or columns (axis 1) of ``units``, in that order.

    Attributes:
        layer: Decoder layer index.
        component: One of q, k, v, o, gate, up, down.
        axis: 0 (output rows) or 1 (input columns).
        unit_size: Rows/columns per unit (head_dim for heads, 1 for FFN channels).
        shape: The base module's weight shape (out_features, in_features).
        units: Sorted unit indices in the original (unpermuted) coordinates.
        values: The trained rows/columns.
    """

    layer: int
    component: str
    axis: int
    unit_size: int
    shape: tuple[int, int]
    units: torch.Tensor
    values: torch.Tensor

    @property
    def positions(self) -> torch.Tensor:
        """Row/column positions of the units in the weight."""
        return unit_positions(self.units, self.unit_size)


@dataclass
class Adapter:
    """An S2FT adapter: per module name, the trained units and values (original coordinates)."""

    modules: dict[str, AdapterModule]
    base_model: str | None = None
    fingerprint: str | None = None
    config: dict = field(default_factory=dict)
    library_version: str | None = None

    def units(self) -> dict[tuple[int, str], torch.Tensor]:
        """The selection this adapter trained: ``{(layer, component): sorted unit indices}``."""
        return {(m.layer, m.component): m.units for m in self.modules.values()}


@dataclass
class S2FTState:
    """What an S2FT model remembers about itself (``model.s2ft_state``).

    Attributes:
        modules: S2FTLinear module name -> (layer, component).
        config: Selection settings written to ``adapter_config.json``.
        unit_perms: For a co-permuted model, (layer, component) -> tensor mapping each current unit position to its
            original unit index, for every component of every permuted layer; empty when not permuted.
        requires_grad: The parameters' requires_grad flags before S2FT froze them, restored by merge_and_unload.
        fingerprint: The base model's ``fingerprint`` (names and shapes do not change, so it is computed once).
    """

    modules: dict[str, tuple[int, str]]
    config: dict
    unit_perms: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    requires_grad: dict[str, bool] = field(default_factory=dict)
    fingerprint: str | None = None


def fingerprint(model: nn.Module) -> str:
    """Hash of every parameter name and shape of the base model (an S2FT model hashes like its base)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if not name.endswith(".values") or not isinstance(model.get_submodule(name.rsplit(".", 1)[0]), S2FTLinear):
            digest.update(f"{name}:{tuple(param.shape)};".encode())
    return digest.hexdigest()


def s2ft_modules(model: nn.Module) -> dict[str, S2FTLinear]:
    """The model's S2FTLinear modules by name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, S2FTLinear)}


def _state(model: nn.Module) -> S2FTState:
    state = getattr(model, "s2ft_state", None)
    if state is None:
        raise ValueError("this model has no S2FT adapter; call s2ft.apply_s2ft(model, cfg) or s2ft.load_adapter first")
    return state


def _reorder_units(values: torch.Tensor, axis: int, unit_size: int, order: torch.Tensor) -> torch.Tensor:
    """Reorders the unit blocks of ``values`` along ``axis``."""
    blocks = values.unflatten(axis, (-1, unit_size))
    return blocks.index_select(axis, order.to(values.device)).flatten(axis, axis + 1)


def extract_adapter(model: nn.Module) -> Adapter:
    """The model's current adapter, mapped back to original coordinates if the model is co-permuted."""
    state = _state(model)
    modules = {}
    for name, module in s2ft_modules(model).items():
        layer, component = state.modules[name]
        units, values = module.units.cpu(), module.values.detach().cpu()
        if (layer, component) in state.unit_perms:
            units = state.unit_perms[layer, component][units]
            order = torch.argsort(units)
            units, values = units[order], _reorder_units(values, module.axis, module.unit_size, order)
        shape = (module.out_features, module.in_features)
        modules[name] = AdapterModule(layer, component, module.axis, module.unit_size, shape, units, values.clone())
    return Adapter(
        modules,
        base_model=getattr(model, "name_or_path", None) or None,
        fingerprint=state.fingerprint,
        config=dict(state.config),
        library_version=_version(),
    )


def _version() -> str:
    from s2ft import __version__

    return __version__


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Writes the model's adapter to the folder ``path`` (created if needed), atomically per file.

    Args:
        model: A model with S2FT applied (``apply_s2ft`` or ``load_adapter``).
        path: Output folder; gets ``adapter.safetensors`` and ``adapter_config.json``.
    """
    adapter = extract_adapter(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "library_version": adapter.library_version,
        "base_model": adapter.base_model,
        "fingerprint": adapter.fingerprint,
        "components": sorted({m.component for m in adapter.modules.values()}),
        "config": adapter.config,
        "modules": {
            name: {
                "layer": m.layer,
                "component": m.component,
                "axis": m.axis,
                "unit_size": m.unit_size,
                "shape": list(m.shape),
                "units": m.units.tolist(),
            }
            for name, m in adapter.modules.items()
        },
    }
    tensors = {f"{name}.values": m.values.contiguous() for name, m in adapter.modules.items()}
    _atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    _atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_adapter_file(path: str | os.PathLike) -> Adapter:
    """Reads and checks an adapter folder (no model needed).

    Raises:
        AdapterError: Missing or corrupt files, missing fields, unit indices out of range / unsorted / duplicated,
            values of the wrong shape or with NaN/inf.
    """
    path = Path(path)
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    for file in (config_path, weights_path):
        if not file.is_file():
            raise AdapterError(f"adapter file missing: {file} (save one with s2ft.save_adapter(model, {str(path)!r}))")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"corrupt adapter config {config_path}: {err}") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT or not isinstance(config.get("modules"), dict):
        raise AdapterError(f"{config_path} is not an S2FT adapter config (expected format {FORMAT!r} and 'modules')")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"corrupt adapter weights {weights_path}: {err}") from err
    expected = {f"{name}.values" for name in config["modules"]}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise AdapterError(f"{weights_path} does not match {config_path}: missing {missing}, unexpected {extra}")
    modules = {}
    for name, entry in config["modules"].items():
        units = entry.get("units") if isinstance(entry, dict) else None
        if not isinstance(units, list) or not all(isinstance(u, int) and not isinstance(u, bool) for u in units):
            raise AdapterError(f"corrupt entry for module {name!r} in {config_path}: 'units' must be a list of ints")
        try:
            module = AdapterModule(
                layer=int(entry["layer"]),
                component=str(entry["component"]),
                axis=int(entry["axis"]),
                unit_size=int(entry["unit_size"]),
                shape=(int(entry["shape"][0]), int(entry["shape"][1])),
                units=torch.tensor(units, dtype=torch.long),
                values=tensors[f"{name}.values"],
            )
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise AdapterError(f"corrupt entry for module {name!r} in {config_path}: {err!r}") from err
        modules[name] = module
    adapter = Adapter(
        modules,
        base_model=config.get("base_model"),
        fingerprint=config.get("fingerprint"),
        config=config.get("config", {}),
        library_version=config.get("library_version"),
    )
    check_adapter(adapter, source=str(path))
    return adapter


def check_adapter(adapter: Adapter, source: str = "adapter") -> None:
    """Checks an adapter's internal consistency (indices, shapes, finite values).

    Raises:
        AdapterError: Naming the module and the problem.
    """
    if not adapter.modules:
        raise AdapterError(f"{source}: the adapter has no modules")
    for name, m in adapter.modules.items():
        where = f"{source}: module {name!r}"
        if m.component not in AXIS or AXIS[m.component] != m.axis:
            raise AdapterError(f"{where}: component {m.component!r} with axis {m.axis} is not an S2FT component")
        if m.unit_size < 1 or m.shape[m.axis] % m.unit_size:
            raise AdapterError(f"{where}: unit size {m.unit_size} does not divide weight dim {m.shape[m.axis]}")
        num_units = m.shape[m.axis] // m.unit_size
        units = m.units
        if units.ndim != 1 or units.numel() == 0 or units.dtype != torch.long:
            raise AdapterError(f"{where}: units must be a non-empty 1-D list of integers")
        if int(units.min()) < 0 or int(units.max()) >= num_units:
            raise AdapterError(f"{where}: unit indices must lie in [0, {num_units}), got {units.tolist()}")
        if not bool((units[1:] > units[:-1]).all()):
            raise AdapterError(f"{where}: unit indices must be sorted and unique (duplicates or disorder found)")
        expected = list(m.shape)
        expected[m.axis] = units.numel() * m.unit_size
        if list(m.values.shape) != expected:
            raise AdapterError(f"{where}: values have shape {tuple(m.values.shape)}, expected {tuple(expected)}")
        if not m.values.is_floating_point() or not bool(torch.isfinite(m.values).all()):
            raise AdapterError(f"{where}: values contain NaN/inf or are not floating point")


def _as_adapter(path_or_adapter) -> Adapter:
    if isinstance(path_or_adapter, Adapter):
        check_adapter(path_or_adapter)
        return path_or_adapter
    return load_adapter_file(path_or_adapter)


def check_fits(model: nn.Module, adapter: Adapter) -> None:
    """Checks that ``adapter`` was made for ``model``'s architecture (module names, shapes, fingerprint).

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


def _current_coordinates(state: S2FTState | None, m: AdapterModule) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's positions and values in the model's current (possibly permuted) coordinates, sorted."""
    if state is None or (m.layer, m.component) not in state.unit_perms:
        return m.positions, m.values
    to_current = torch.argsort(state.unit_perms[m.layer, m.component])
    units = to_current[m.units]
    order = torch.argsort(units)
    return unit_positions(units[order], m.unit_size), _reorder_units(m.values, m.axis, m.unit_size, order)


def load_adapter(base: nn.Module, path, trainable: bool = False) -> nn.Module:
    """Applies a saved adapter to a base model (in place; unmerged), after validating everything.

    Args:
        base: The base model the adapter was trained on, without S2FT applied.
        path: Adapter folder, or an ``Adapter``.
        trainable: Keep the adapter's values trainable (to continue training); all base weights are frozen.

    Returns:
        ``base`` with the adapter's modules replaced by S2FTLinear.

    Raises:
        AdapterError: See ``load_adapter_file`` and ``check_fits``; the model is unchanged when raised.
        ValueError: If ``base`` already has an S2FT adapter.
    """
    if getattr(base, "s2ft_state", None) is not None or s2ft_modules(base):
        raise ValueError("this model already has an S2FT adapter; use s2ft.switch_adapter(model, path) instead")
    adapter = _as_adapter(path)
    check_fits(base, adapter)
    flags = {name: p.requires_grad for name, p in base.named_parameters()}
    base.requires_grad_(False)
    for name, m in adapter.modules.items():
        parent, _, child = name.rpartition(".")
        linear = base.get_submodule(name)
        layer = S2FTLinear(linear, m.axis, m.positions, m.unit_size, m.values)
        layer.values.requires_grad_(trainable)
        setattr(base.get_submodule(parent), child, layer)
    modules = {name: (m.layer, m.component) for name, m in adapter.modules.items()}
    base.s2ft_state = S2FTState(modules, dict(adapter.config), requires_grad=flags, fingerprint=fingerprint(base))
    return base


def merge_adapter(model: nn.Module) -> None:
    """Writes every S2FTLinear's values into its weight (exact copy; forward is a plain linear)."""
    _state(model)
    for module in s2ft_modules(model).values():
        module.merge()


def unmerge_adapter(model: nn.Module) -> None:
    """Undoes ``merge_adapter`` exactly."""
    _state(model)
    for module in s2ft_modules(model).values():
        module.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merges the adapter and returns a plain transformers model in the original coordinates (in place).

    S2FTLinear modules become ``nn.Linear`` holding the merged weights, a co-permuted model is permuted back, and the
    parameters' requires_grad flags are restored, so ``save_pretrained`` / ``from_pretrained`` work as usual.
    """
    state = _state(model)
    for name, module in s2ft_modules(model).items():
        module.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, _plain_linear(module))
    if state.unit_perms:
        _restore_original_order(model, state.unit_perms)
    for name, param in model.named_parameters():
        param.requires_grad_(state.requires_grad.get(name, True))
    del model.s2ft_state
    return model


def _plain_linear(module: S2FTLinear) -> nn.Linear:
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight = module.weight
    linear.bias = module.bias
    return linear


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
        AdapterError / ValueError: On a bad adapter, a mismatched base, or a wrong number of weights; the model is
            unchanged when raised.
    """
    if getattr(base, "s2ft_state", None) is not None or s2ft_modules(base):
        raise ValueError("fuse_adapters needs a plain base model; call merge_and_unload or start from a fresh base")
    adapters = [_as_adapter(item) for item in paths_or_adapters]
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if not adapters or len(weights) != len(adapters) or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"give one finite weight per adapter: {len(adapters)} adapters, weights {weights}")
    for adapter in adapters:
        check_fits(base, adapter)
    deltas = []
    for adapter, w in zip(adapters, weights, strict=True):
        for name, m in adapter.modules.items():
            weight = base.get_submodule(name).weight
            positions = m.positions.to(weight.device)
            base_values = weight.detach().index_select(m.axis, positions)
            # In fp32: fp32 adapter values on a bf16 base differ from it by less than the base's rounding step.
            delta = w * (m.values.to(weight.device, torch.float32) - base_values.float())
            deltas.append((weight, m.axis, positions, delta.to(weight.dtype)))
    with torch.no_grad():
        for weight, axis, positions, delta in deltas:
            weight.index_add_(axis, positions, delta)
    return base


def switch_adapter(model: nn.Module, path_or_adapter) -> nn.Module:
    """Replaces the model's adapter by another one, touching only the old and new rows/columns.

    The old adapter's slots are restored from the stored base values and the new adapter's values are written;
    modules trained by both are retargeted in place (no module rebuild). Merged state is kept.

    Raises:
        AdapterError: On a bad adapter or one made for another base; the model is unchanged when raised.
    """
    state = _state(model)
    adapter = _as_adapter(path_or_adapter)
    check_fits(model, adapter)
    current = s2ft_modules(model)
    merged = any(module.merged for module in current.values())
    trainable = any(module.values.requires_grad for module in current.values())
    for name, module in current.items():
        if name not in adapter.modules:
            module.restore_base()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, _plain_linear(module))
    for name, m in adapter.modules.items():
        positions, values = _current_coordinates(state, m)
        if name in current:
            layer = current[name]
            layer.retarget(positions, values, merged)
        else:
            parent, _, child = name.rpartition(".")
            layer = S2FTLinear(model.get_submodule(name), m.axis, positions, m.unit_size, values)
            setattr(model.get_submodule(parent), child, layer)
            if merged:
                layer.merge()
        layer.values.requires_grad_(trainable)
    state.modules = {name: (m.layer, m.component) for name, m in adapter.modules.items()}
    state.config = dict(adapter.config)
    return model


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of parameter entries with ``requires_grad`` (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def config_metadata(cfg) -> dict:
    """The selection settings of an S2FTConfig, JSON-ready, for ``adapter_config.json``."""
    metadata = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "exclude"}
    metadata["exclude"] = str(cfg.exclude) if isinstance(cfg.exclude, (str, os.PathLike)) else None
    return metadata
