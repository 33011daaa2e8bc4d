"""The S2FT adapter file format: trained rows/columns + their unit indices in the base model's original coordinates.

On disk an adapter is a folder with ``adapter.safetensors`` (``<module name>.values`` per trained module) and
``adapter_config.json`` (base model, shape fingerprint, base digest, selection config, library version, and per module
its layer, component, axis, unit size, weight shape and unit indices). Reading checks everything a model is not needed
for; ``s2ft.adapter.check_fits`` checks the rest against a model before it is touched.

The base digest (``base_digest``) is the SHA-256 of the base model's own values at the trained rows/columns
(``s2ft.adapter.base_digest``): names and shapes do not tell a base from its -Instruct model or another
initialization, its weights do. It is ``{"dtype": <the base's dtype>, "sha256": {<dtype>: <hex digest>}}`` with one
digest per dtype the base may be loaded in: its own, and bfloat16 and float16 (the base's values rounded to them, as
``from_pretrained(dtype=...)`` rounds them); a base in mixed dtypes records its narrowest as its own. Adapters saved
before it was recorded have none (null or no field).
"""

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from s2ft.errors import UserError
from s2ft.structures import AXIS, unit_positions

FORMAT = "s2ft-adapter"
WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
# The dtypes adapter values may have: S2FT's matmuls (and isfinite) take no other (float8, integers, complex).
VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The dtypes a base digest may be taken in, by name.
DIGEST_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in VALUE_DTYPES}


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
    """An S2FT adapter: per module name, the trained units and values (original coordinates).

    ``base_digest`` is the base model's digest at the trained slots (see the module docstring); None for adapters
    saved before it was recorded, whose base cannot be checked.
    """

    modules: dict[str, AdapterModule]
    base_model: str | None = None
    fingerprint: str | None = None
    config: dict = field(default_factory=dict)
    library_version: str | None = None
    base_digest: dict | None = None

    def units(self) -> dict[tuple[int, str], torch.Tensor]:
        """The selection this adapter trained: ``{(layer, component): sorted unit indices}``."""
        return {(m.layer, m.component): m.units for m in self.modules.values()}


def write_adapter(adapter: Adapter, path: str | os.PathLike) -> None:
    """Writes ``adapter`` to the folder ``path`` (created if needed), atomically per file.

    Args:
        adapter: The adapter (e.g. ``s2ft.adapter.extract_adapter(model)``).
        path: Output folder; gets ``adapter.safetensors`` and ``adapter_config.json``.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:  # the path, or a folder above it, is a file
        file = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise AdapterError(f"cannot save the adapter to {path}: {file} is a file, not a folder; give a folder") from err
    config = {
        "format": FORMAT,
        "library_version": adapter.library_version,
        "base_model": adapter.base_model,
        "fingerprint": adapter.fingerprint,
        "base_digest": adapter.base_digest,
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
    # Serialized before any file is written: a config json cannot write must not leave new weights beside the old
    # adapter's config (a folder that no longer loads).
    json.dumps(config)
    tensors = {f"{name}.values": m.values.contiguous() for name, m in adapter.modules.items()}
    digest = {}

    def write_weights(tmp: Path) -> None:
        save_file(tensors, tmp, metadata={"format": FORMAT})
        digest["weights_sha256"] = file_sha256(tmp)

    atomic_write(path / WEIGHTS_NAME, write_weights)
    # The config names the weights it was saved with: a save stopped between its two files leaves new weights beside
    # the old config, which loading then refuses instead of pairing one adapter's units with another's values.
    text = json.dumps({**config, **digest}, indent=2) + "\n"
    atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    sha = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def atomic_write(target: Path, write) -> None:
    """Calls ``write(tmp)`` on a temporary file beside ``target``, then renames it over ``target``.

    The file gets the mode a plain ``open()`` gives (0666 less the umask): safetensors, like mkstemp, creates 0600.
    """
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_adapter_file(path: str | os.PathLike) -> Adapter:
    """Reads and checks an adapter folder (no model needed).

    Raises:
        AdapterError: Missing or corrupt files, missing fields, unit indices out of range / unsorted / duplicated,
            values of the wrong shape or with NaN/inf.
        AdapterError: Also for a ``path`` that is no path (a number, None, a mapping), naming its type.
    """
    _check_source(path, "a folder (str or os.PathLike)")
    path = Path(path)
    if path.is_file():
        raise AdapterError(f"{path} is a file; give the adapter's folder (it holds {WEIGHTS_NAME} and {CONFIG_NAME})")
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    missing = f"(save one with s2ft.save_adapter(model, {str(path)!r}))"
    if not config_path.is_file() and (path / "adapter" / CONFIG_NAME).is_file():
        # A run directory (run.py's outputs): saving an adapter into it, as the hint below says, was not the fix.
        raise AdapterError(
            f"adapter file missing: {config_path}; {path} is a run directory, whose adapter is its adapter/ folder: "
            f"give {str(path / 'adapter')!r}"
        )
    if not config_path.is_file():
        raise AdapterError(f"adapter file missing: {config_path} {missing}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"corrupt adapter config {config_path}: {err}") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT or not isinstance(config.get("modules"), dict):
        # A PEFT folder (export_lora writes them) has the same file name: say what it is.
        peft = isinstance(config, dict) and "peft_type" in config
        hint = (
            f"; it is a PEFT {config['peft_type']} adapter: load it with peft.PeftModel.from_pretrained" if peft else ""
        )
        raise AdapterError(
            f"{config_path} is not an S2FT adapter config (expected format {FORMAT!r} and 'modules'){hint}"
        )
    if not isinstance(config.get("config", {}), dict):
        raise AdapterError(f"corrupt adapter config {config_path}: 'config' (the selection settings) must be a mapping")
    # Every entry before the weights are read: int() truncated a float shape (576.5 -> 576) or took it (576.0), and
    # an empty entry or name failed later as a KeyError repr or as the model itself (get_submodule("")).
    for name, entry in config["modules"].items():
        _check_entry(config_path, name, entry)
    if not weights_path.is_file():
        raise AdapterError(f"adapter file missing: {weights_path} {missing}")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"corrupt adapter weights {weights_path}: {err}") from err
    recorded = config.get("weights_sha256")  # older adapters carry none: not checked
    if recorded is not None and recorded != file_sha256(weights_path):
        raise AdapterError(
            f"{weights_path} is not the file {config_path} was saved with (its SHA-256 differs): a save stopped "
            "between its two files, or one file copied from another adapter; save the adapter again"
        )
    expected = {f"{name}.values" for name in config["modules"]}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise AdapterError(f"{weights_path} does not match {config_path}: missing {missing}, unexpected {extra}")
    modules = {
        name: AdapterModule(
            layer=entry["layer"],
            component=entry["component"],
            axis=entry["axis"],
            unit_size=entry["unit_size"],
            shape=tuple(entry["shape"]),
            units=torch.tensor(entry["units"], dtype=torch.long),
            values=tensors[f"{name}.values"],
        )
        for name, entry in config["modules"].items()
    }
    adapter = Adapter(
        modules,
        base_model=config.get("base_model"),
        fingerprint=config.get("fingerprint"),
        base_digest=config.get("base_digest"),
        config=config.get("config", {}),
        library_version=config.get("library_version"),
    )
    check_adapter(adapter, source=str(path))
    return adapter


# The fields of a module's entry in adapter_config.json, in the order save writes them.
ENTRY_FIELDS = ("layer", "component", "axis", "unit_size", "shape", "units")


def _is_int(value) -> bool:
    # JSON's true and false are Python bools, which are ints; 1.0 is a float, which int() took (and 1.5 truncated).
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entry(config_path: Path, name: str, entry) -> None:
    """Checks one module entry of an adapter config: a named mapping of every field, each of its type.

    Raises:
        AdapterError: Naming the file, the module, the field and the bad value.
    """
    if not name:
        raise AdapterError(
            f"corrupt adapter config {config_path}: 'modules' has an entry with an empty module name ({name!r}); each "
            "is named by the module it trains (e.g. model.layers.0.self_attn.o_proj): save the adapter again"
        )
    where = f"corrupt entry for module {name!r} in {config_path}"
    fields = ", ".join(ENTRY_FIELDS[:-1]) + f" and {ENTRY_FIELDS[-1]}"
    if not isinstance(entry, dict):
        problem = f"it is {entry!r}, not a mapping of {fields}"
    elif not entry:
        problem = f"it is empty: expected {fields}"
    elif missing := [field for field in ENTRY_FIELDS if field not in entry]:
        problem = "missing " + ", ".join(map(repr, missing))
    elif bad := next((field for field in ("layer", "axis", "unit_size") if not _is_int(entry[field])), None):
        problem = f"{bad!r} must be an integer, got {entry[bad]!r}"
    elif not isinstance(entry["component"], str):
        problem = f"'component' must be a string, got {entry['component']!r}"
    elif not (isinstance(entry["shape"], list) and len(entry["shape"]) == 2 and all(map(_is_int, entry["shape"]))):
        problem = f"'shape' must be two integers [out_features, in_features], got {entry['shape']!r}"
    elif not (isinstance(entry["units"], list) and all(_is_int(u) and -(2**63) <= u < 2**63 for u in entry["units"])):
        # Beyond 64 bits torch.tensor raised its own overflow error; the range check (check_adapter) names the rest.
        problem = f"'units' must be a list of 64-bit ints, got {entry['units']!r}"
    else:
        return
    raise AdapterError(f"{where}: {problem}; save the adapter again")


def check_adapter(adapter: Adapter, source: str = "adapter") -> None:
    """Checks an adapter's internal consistency (indices, shapes, finite values).

    Raises:
        AdapterError: Naming the module and the problem.
    """
    if not adapter.modules:
        raise AdapterError(f"{source}: the adapter has no modules")
    check_digest(adapter.base_digest, source)
    for name, m in adapter.modules.items():
        # An Adapter built in Python is not read from a file (_check_entry): "" names the model itself.
        if not isinstance(name, str) or not name:
            raise AdapterError(f"{source}: an adapter module's name is empty ({name!r}); name it by its module path")
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
        if m.values.dtype not in VALUE_DTYPES:
            raise AdapterError(
                f"{where}: values are {m.values.dtype}; S2FT computes with float16, bfloat16, float32 or float64"
            )
        if not bool(torch.isfinite(m.values).all()):
            raise AdapterError(f"{where}: values contain NaN/inf")


def check_digest(digest, source: str = "adapter") -> None:
    """Checks the form of a recorded base digest (None: not recorded).

    Raises:
        AdapterError: Anything but ``{"dtype": NAME, "sha256": {NAME: 64 hex digits, ...}}`` with the base's own
            dtype among the digests.
    """
    if digest is None:
        return
    sha = digest.get("sha256") if isinstance(digest, dict) else None
    if (
        not isinstance(sha, dict)
        or not isinstance(digest.get("dtype"), str)
        or digest["dtype"] not in sha
        or not all(name in DIGEST_DTYPES for name in sha)
        or not all(isinstance(h, str) and len(h) == 64 and set(h) <= set("0123456789abcdef") for h in sha.values())
    ):
        raise AdapterError(
            f"{source}: corrupt base_digest {digest!r}: expected {{'dtype': NAME, 'sha256': {{NAME: hex SHA-256}}}} "
            f"with dtype names of {', '.join(DIGEST_DTYPES)}; save the adapter again"
        )


def as_adapter(path_or_adapter) -> Adapter:
    """A checked ``Adapter`` from a folder or an ``Adapter`` object.

    Raises:
        AdapterError: See ``load_adapter_file`` and ``check_adapter``; also for anything else (a number, None, a
            mapping), naming its type.
    """
    if isinstance(path_or_adapter, Adapter):
        check_adapter(path_or_adapter)
        return path_or_adapter
    _check_source(path_or_adapter, "a folder (str or os.PathLike) or an s2ft.Adapter")
    return load_adapter_file(path_or_adapter)


def _check_source(source, accepted: str) -> None:
    # Path(source) raises a bare TypeError for these (bytes too: pathlib takes only str), a traceback run.py shows as
    # a bug; the caller's naming() then says which adapter it was.
    if not isinstance(source, (str, os.PathLike)):
        raise AdapterError(
            f"an adapter is {accepted}, got {type(source).__name__}: {source!r}; give the folder save_adapter wrote"
        )


@contextmanager
def naming(label: str, source) -> Iterator[None]:
    """Prefixes an ``AdapterError`` raised inside with ``label`` and, for a folder, ``source``: among several adapters
    (``load_adapters``, ``fuse_adapters``) a refusal then says which one it is."""
    try:
        yield
    except AdapterError as err:
        where = label if isinstance(source, Adapter) else f"{label} ({source})"
        raise AdapterError(f"{where}: {err}") from err
