"""Mixed-adapter batches: several S2FT adapters on one unmerged base model, one adapter per batch row.

``load_adapters(base, {"math": "out/a", "cs": "out/b"})`` wraps every projection some adapter trained in a
``MultiAdapterLinear`` that keeps the base weight as it is and stores, per adapter, the trained positions and the
*delta* (trained values minus the base values at those positions), so that adding it to the base output gives that
adapter's merged model exactly up to fp rounding:

- input columns (o, down): ``y_i += D_a x_i[idx_a]`` (gather the columns, one small matmul);
- output rows (q, k, v, gate, up): ``y_i[idx_a] += D_a x_i`` (one small matmul, scatter-add into the rows).

The model's ``forward`` and ``generate`` take ``adapter_names=[...]``, one name per row (``"__base__"``: the base
model), as PEFT's mixed batches do: a forward pre-hook on the top model pops the names and groups the rows by adapter
once per call; each wrapped linear then runs one gather-matmul-scatter per adapter present in the batch.
``python -m experiments.bench.serving`` measured this grouping against padding the adapters to one batched matmul.
"""

import functools
import os
import threading
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from s2ft.adapter import check_fits
from s2ft.adapter_format import Adapter, AdapterError, as_adapter, naming
from s2ft.layers import plain_linear
from s2ft.state import check_fresh, check_unmerged

BASE = "__base__"
# nn.ModuleDict refuses a key that is one of its attributes (train, eval, values, cuda, ...): adapters are kept under
# this prefix, which no attribute has, so that any name works.
SLOT_PREFIX = "adapter_"


@dataclass
class _Call:
    """One open call of the top model in a thread: its rows per adapter and whether ``forwarding`` counts it."""

    counted: bool
    groups: list[tuple[str, torch.Tensor]]


class MultiAdapterState:
    """What a mixed-adapter model remembers (``model.s2ft_adapters``).

    The current call's rows are kept per thread: two threads running the one model at once (a threaded server) each
    see their own ``adapter_names``, where one shared record let a call run with the other's rows, or with none.

    Attributes:
        configs: Per loaded adapter name (in load order), its selection settings.
        groups: This thread's innermost open call's rows per adapter present, ``[(name, row indices)]``; set by the
            pre-hook, dropped when the call returns (a submodule called on its own, ``model.model(...)``, is the base
            model).
        generation: While ``generate`` runs with ``adapter_names`` in this thread: the batch's row count and its
            groups, used by every forward call of that generation.
        generating: How many ``generate`` calls with ``adapter_names`` run now, in any thread.
        forwarding: How many calls of the top model with ``adapter_names`` run now, in any thread.
        hooks: The top model's forward pre-hook and forward hook, and the pre-hook of its decoder (``base_model``)
            that refuses ``adapter_names`` the top model's call did not read (removed when the last adapter is).
    """

    def __init__(self) -> None:
        self.configs: dict[str, dict] = {}
        self.hooks: list = []
        self.generating = 0
        self.forwarding = 0
        # Held while rows are grouped (their names checked against the loaded adapters) and counted, while
        # remove_adapter checks the counts and removes, and while add_adapter attaches: no call starts with an adapter
        # that is going or half there, and no add and removal interleave.
        self._lock = threading.Lock()
        self._call = threading.local()

    @property
    def groups(self) -> list[tuple[str, torch.Tensor]]:
        calls = self._open_calls()
        return calls[-1].groups if calls else []

    @property
    def generation(self) -> tuple[int, list[tuple[str, torch.Tensor]]] | None:
        return getattr(self._call, "generation", None)

    @contextmanager
    def generating_with(self, names, rows: int | None, device):
        """This thread's ``generate`` runs with ``names``' rows (``adapter_names``) while the context is open."""
        with self._lock:
            groups = _group_rows(self, names, rows, device)
            self.generating += 1
        self._call.generation = (len(names), groups)
        try:
            yield
        finally:
            self._call.generation = None
            with self._lock:
                self.generating -= 1

    def open_call(self, names, rows: int | None, device, groups: list | None = None) -> None:
        """Starts this thread's call of the top model: with ``names`` (``adapter_names``), groups its rows and counts
        it in ``forwarding`` until ``close_call``; else it runs ``groups`` (a generation's), or the base model.

        Every call pushes one entry, its groups and whether it counted, on this thread's stack of open calls, which
        ``close_call`` pops: a call refused here leaves the count as it found it, and a call nested in another (a
        hook that runs the model) leaves the outer one its own rows, where one record per thread was cleared by the
        inner call's end and the outer call's later layers ran the base model.
        """
        call = _Call(counted=False, groups=groups or [])
        self._open_calls().append(call)
        if names is None:
            return
        with self._lock:
            call.groups = _group_rows(self, names, rows, device)
            self.forwarding += 1
        call.counted = True

    def close_call(self) -> None:
        """Ends this thread's innermost call of the top model (``open_call``); the forward hook runs it even when the
        call raised."""
        calls = self._open_calls()
        # Empty when a pre-hook registered before ours raised: our pre-hook did not run, so nothing was opened.
        if calls and calls.pop().counted:
            with self._lock:
                self.forwarding -= 1

    def _open_calls(self) -> list["_Call"]:
        if not hasattr(self._call, "open"):
            self._call.open = []
        return self._call.open

    def __getstate__(self) -> dict:
        # A copy (deepcopy, pickle) has no call in flight; locks and thread-locals are not copied.
        return {"configs": self.configs, "hooks": self.hooks}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        self.configs, self.hooks = state["configs"], state["hooks"]


class AdapterSlots(nn.Module):
    """One adapter's part of one projection: the trained positions and their deltas against the base weight."""

    def __init__(self, index: torch.Tensor, delta: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index)
        self.register_buffer("delta", delta)


class MultiAdapterLinear(nn.Linear):
    """An ``nn.Linear`` (same ``weight`` and ``bias`` Parameters, unchanged) plus per-adapter row or column deltas.

    It is an ``nn.Linear`` with the same parameter names, so the model's fingerprint and the adapter checks see the
    base model. Rows of the batch whose adapter did not train this projection (or ``"__base__"``) get the base output.

    Args:
        linear: The base layer; its Parameters are reused, not copied.
        axis: 0 (output rows: q, k, v, gate, up) or 1 (input columns: o, down).
        state: The model's ``MultiAdapterState`` (read for the current call's row groups).
    """

    def __init__(self, linear: nn.Linear, axis: int, state: MultiAdapterState) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.axis, self.state = axis, state
        self.adapters = nn.ModuleDict()

    def add(self, name: str, positions: torch.Tensor, values: torch.Tensor) -> None:
        """Stores adapter ``name``'s trained rows/columns at ``positions`` as deltas against the base weight."""
        # The difference is taken in fp32 at least (fp32 values beside a bf16 weight), and in fp64 for an fp64 model
        # (in fp32, its rows were 4e-7 off the merged fp64 model's on the tiny models), then kept in the weight's dtype.
        dtype = torch.promote_types(torch.promote_types(values.dtype, self.weight.dtype), torch.float32)
        with torch.no_grad():
            positions = positions.to(self.weight.device)
            base = self.weight.index_select(self.axis, positions).to(dtype)
            delta = (values.to(device=self.weight.device, dtype=dtype) - base).to(self.weight.dtype)
        self.adapters[SLOT_PREFIX + name] = AdapterSlots(positions, delta)

    def trains(self, name: str) -> bool:
        """Whether adapter ``name`` trained this projection."""
        return SLOT_PREFIX + name in self.adapters

    def remove(self, name: str) -> None:
        """Drops adapter ``name``'s rows/columns."""
        del self.adapters[SLOT_PREFIX + name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if not self.state.groups:
            return out
        rows_first = out.view(out.shape[0], -1, out.shape[-1])
        inputs = x.reshape(x.shape[0], -1, x.shape[-1])
        for name, rows in self.state.groups:
            if not self.trains(name):
                continue
            # The row groups are made on model.device; a model spread over devices (device_map) has layers elsewhere.
            rows = rows.to(x.device)
            slots = self.adapters[SLOT_PREFIX + name]
            selected = inputs.index_select(0, rows)
            if self.axis == 1:
                rows_first.index_add_(0, rows, F.linear(selected.index_select(-1, slots.index), slots.delta))
            else:
                steps = torch.arange(rows_first.shape[1], device=rows.device)
                where = (rows[:, None, None], steps[None, :, None], slots.index[None, None, :])
                rows_first.index_put_(where, F.linear(selected, slots.delta), accumulate=True)
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, axis={self.axis}, "
            f"adapters={[key.removeprefix(SLOT_PREFIX) for key in self.adapters]}"
        )


def _state(model: nn.Module) -> MultiAdapterState:
    state = getattr(model, "s2ft_adapters", None)
    if state is None:
        raise AdapterError("this model has no mixed adapters; call s2ft.load_adapters(base, {name: path}) first")
    return state


def _check_name(name, loaded) -> None:
    if not isinstance(name, str) or not name or "." in name or name == BASE:
        raise AdapterError(f"adapter name {name!r} must be a non-empty string without '.', and not {BASE!r}")
    if name in loaded:
        raise AdapterError(f"an adapter named {name!r} is already loaded; remove_adapter(model, {name!r}) first")


def _row_count(args: tuple, kwargs: dict) -> int | None:
    for key in ("input_ids", "inputs_embeds", "inputs"):  # inputs: generate's name for its first argument
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    return args[0].shape[0] if args and isinstance(args[0], torch.Tensor) else None


def _rows_hook(model: nn.Module, args: tuple, kwargs: dict):
    state = model.s2ft_adapters
    rows = _row_count(args, kwargs)
    if "adapter_names" in kwargs:
        state.open_call(kwargs.pop("adapter_names"), rows, model.device)
    elif state.generation is not None:
        expected, groups = state.generation
        state.open_call(None, rows, model.device, groups)  # generate's step: generate counts its rows
        if rows is not None and rows != expected:
            raise AdapterError(
                f"generate with adapter_names runs {expected} rows but the model got {rows}: beam search and "
                "num_return_sequences expand the batch, which adapter_names cannot follow (it takes one name per "
                "row of the prompt). For n samples per prompt, repeat the rows instead: "
                "input_ids.repeat_interleave(n, 0) (and the attention mask), each adapter name n times"
            )
    else:
        state.open_call(None, rows, model.device)
    return args, kwargs


def _refuse_names(module: nn.Module, args: tuple, kwargs: dict) -> None:
    # Only the top model's call reads adapter_names (its pre-hook pops them); model.forward(...) skips that hook and
    # hands them on in **kwargs, which transformers' decoders accept and ignore: every row ran the base model.
    if kwargs.get("adapter_names") is not None:  # None asks for the base model, which is what runs
        raise AdapterError(
            "adapter_names reached the decoder without the mixed-adapter model's call reading them (every row would "
            "run the base model): call model(..., adapter_names=...) or model.generate(..., adapter_names=...), not "
            "model.forward(...) or a submodule"
        )


def _clear_rows(model: nn.Module, args: tuple, output) -> None:
    model.s2ft_adapters.close_call()


def _generate(model: nn.Module, *args, adapter_names=None, **kwargs):
    """``generate`` with one adapter name per row (``adapter_names``), for every step of the generation."""
    state = model.s2ft_adapters
    if adapter_names is None:
        return type(model).generate(model, *args, **kwargs)
    with state.generating_with(adapter_names, _row_count(args, kwargs), model.device):
        return type(model).generate(model, *args, **kwargs)


def _group_rows(state: MultiAdapterState, names, rows: int | None, device) -> list[tuple[str, torch.Tensor]]:
    # Only a list or tuple: a string iterates by characters, a set in no fixed order, a dict by its keys, and an
    # iterator would be used up by the checks below; each then ran rows with the wrong adapters or failed later.
    if not isinstance(names, (list, tuple)):
        hint = f"; for one adapter on every row: [{names!r}] * rows" if isinstance(names, str) else ""
        raise AdapterError(
            f"adapter_names must be a list or tuple with one adapter name per row, got {type(names).__name__}: "
            f"{names!r}{hint}"
        )
    if not all(isinstance(name, str) for name in names):
        raise AdapterError(f"adapter_names must be a list with one adapter name (a string) per row, got {names!r}")
    unknown = sorted(set(names) - set(state.configs) - {BASE})
    if unknown:
        raise AdapterError(f"unknown adapter names {unknown}; loaded: {list(state.configs)} (or {BASE!r})")
    if rows is not None and len(names) != rows:
        raise AdapterError(f"adapter_names has {len(names)} names for a batch of {rows} rows; give one name per row")
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        if name != BASE:
            groups.setdefault(name, []).append(row)
    return [(name, torch.tensor(rows, device=device)) for name, rows in groups.items()]


def _validated(model: nn.Module, name: str, source) -> Adapter:
    with naming(f"adapter {name!r}", source):
        adapter = as_adapter(source)
        check_fits(model, adapter)
    return adapter


def _attach(model: nn.Module, state: MultiAdapterState, name: str, adapter: Adapter) -> None:
    for module_name, m in adapter.modules.items():
        layer = model.get_submodule(module_name)
        if not isinstance(layer, MultiAdapterLinear):
            layer = MultiAdapterLinear(layer, m.axis, state)
            model.set_submodule(module_name, layer)
        layer.add(name, m.positions, m.values)
    state.configs[name] = dict(adapter.config)


def load_adapters(base: nn.Module, adapters: Mapping[str, str | os.PathLike | Adapter]) -> nn.Module:
    """Loads several adapters, by name, onto one base model without merging them (in place).

    Every adapter is read and validated (like ``load_adapter``: files, indices, values, the base model) before the
    model is touched. Then ``model(..., adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])`` run
    each row with its own adapter (``"__base__"`` for the base model); without ``adapter_names`` every row runs the
    base model.

    Args:
        base: The plain base model the adapters were trained on (no S2FT applied).
        adapters: Adapter name -> adapter folder or ``Adapter``.

    Returns:
        ``base``, with ``base.s2ft_adapters`` recording the loaded adapters.

    Raises:
        AdapterError: A bad adapter or one made for another base, named (``adapter 'NAME' (FOLDER): ...``); the
            model is unchanged when raised.
        AdapterError: Also for an empty mapping, a bad name, a model that already has S2FT adapters, or one that
            holds a merged update (``merge_and_unload``, ``fuse_adapters``).
    """
    if getattr(base, "s2ft_adapters", None) is not None:
        raise AdapterError("this model already has S2FT adapters; use s2ft.add_adapter(model, name, path)")
    # Not "or merge_and_unload": that leaves one adapter merged into the weights, and an adapter that trained other
    # rows/columns passes the base check there, so its rows (and the base's) were served on top of it, silently.
    check_fresh(
        base,
        "load_adapters needs the plain base model the adapters were trained on: s2ft.unload(model) gives it back, or "
        "load a fresh copy (not merge_and_unload: it keeps its adapter in the weights, under every row)",
    )
    check_unmerged(base, "load_adapters")
    if not isinstance(adapters, Mapping):
        raise AdapterError(f"load_adapters takes a mapping of names to adapters, got {adapters!r}: {{'name': path}}")
    if not adapters:
        raise AdapterError("give at least one adapter: load_adapters(base, {'name': 'path/to/adapter'})")
    loaded: dict[str, Adapter] = {}
    for name, source in adapters.items():
        _check_name(name, loaded)
        loaded[name] = _validated(base, name, source)
    state = MultiAdapterState()
    for name, adapter in loaded.items():
        _attach(base, state, name, adapter)
    state.hooks = [
        base.register_forward_pre_hook(_rows_hook, with_kwargs=True),
        base.register_forward_hook(_clear_rows, always_call=True),
    ]
    inner = getattr(base, "base_model", base)
    if inner is not base:
        state.hooks.append(inner.register_forward_pre_hook(_refuse_names, with_kwargs=True))
    # A partial, not a bound method: both bind a deep copy of the model to its copy, but a bound method pickles as
    # getattr(model, "_generate"), which the unpickled model lacks, so torch.load of a saved model failed.
    base.generate = functools.partial(_generate, base)
    base.save_pretrained = _refuse_save_pretrained  # a plain function: pickled by name
    base.s2ft_adapters = state
    return base


def _refuse_save_pretrained(*args, **kwargs) -> None:
    # The adapters' deltas are buffers from_pretrained drops (with a warning): the folder would load as the base.
    raise AdapterError(
        "save_pretrained cannot save a mixed-adapter model: from_pretrained would drop the adapters' deltas and load "
        "the base model. Each adapter is saved on its own (s2ft.save_adapter, before load_adapters); to save the base, "
        "remove_adapter every adapter first"
    )


def add_adapter(model: nn.Module, name: str, source: str | os.PathLike | Adapter) -> nn.Module:
    """Loads one more adapter onto a mixed-adapter model (validated first; a refusal names the adapter and leaves the
    model unchanged).

    The files are read and checked before the model's mixed-adapter lock is taken; the adapter is attached under it,
    so a ``remove_adapter`` or a call grouping its rows (in another thread) runs before or after the add, not within.

    Raises:
        AdapterError: A bad adapter or one made for another base, a bad name or one already loaded, or the model's
            last adapter removed (in another thread) while this one was being read.
    """
    state = _state(model)
    _check_name(name, state.configs)  # before reading any file; checked again under the lock
    adapter = _validated(model, name, source)
    with state._lock:
        # remove_adapter of the last adapter made the model the plain base and dropped this state (its hooks too):
        # attached to it, the adapter would sit in MultiAdapterLinear modules that no call reads.
        if getattr(model, "s2ft_adapters", None) is not state:
            raise AdapterError(
                f"the model's last mixed adapter was removed while adapter {name!r} was being read: it is the plain "
                f"base model now; load it with s2ft.load_adapters(model, {{{name!r}: path}})"
            )
        _check_name(name, state.configs)  # another add of this name may have come first
        _attach(model, state, name, adapter)
    return model


def remove_adapter(model: nn.Module, name: str) -> nn.Module:
    """Drops adapter ``name`` and its memory; projections no adapter trains any more become plain ``nn.Linear``.

    Removing the last adapter leaves the plain base model (no hook, no ``s2ft_adapters``).

    Raises:
        AdapterError: No adapter ``name`` is loaded, or a ``generate`` or forward call with ``adapter_names`` is
            running (in any thread); the model is unchanged when raised.
    """
    state = _state(model)
    # Under the lock that calls take to group and count their rows: none starts between the check and the removal.
    with state._lock:
        if name not in state.configs:
            raise AdapterError(f"no adapter named {name!r} is loaded; loaded: {list(state.configs)}")
        # Its rows would go on with the base model's weights from the next layer on, silently (from a streamer, a
        # stopping criterion, a hook or another thread).
        if state.generating:
            raise AdapterError(f"generate is running with adapter_names; remove adapter {name!r} after it returns")
        if state.forwarding:
            raise AdapterError(
                f"a forward call with adapter_names is running; remove adapter {name!r} after it returns"
            )
        for module_name, module in list(model.named_modules()):
            if isinstance(module, MultiAdapterLinear) and module.trains(name):
                module.remove(name)
                if not len(module.adapters):
                    model.set_submodule(module_name, plain_linear(module))
        del state.configs[name]
        if not state.configs:
            for hook in state.hooks:
                hook.remove()
            del model.generate, model.save_pretrained, model.s2ft_adapters
    return model


def loaded_adapters(model: nn.Module) -> list[str]:
    """The names of the adapters loaded on a mixed-adapter model, in load order."""
    return list(_state(model).configs)
