"""What an S2FT model remembers about itself (``model.s2ft_state``), and the checks that read it."""

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from s2ft.adapter_format import AdapterError
from s2ft.layers import FITTED, S2FTLinear


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
        load_hooks: The load_state_dict pre-hooks of the model and its submodules (``attach_state``), removed by
            ``detach_state``.
    """

    modules: dict[str, tuple[int, str]]
    config: dict
    unit_perms: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    requires_grad: dict[str, bool] = field(default_factory=dict)
    fingerprint: str | None = None
    load_hooks: list[RemovableHandle] = field(default_factory=list, compare=False, repr=False)


def attach_state(model: nn.Module, state: S2FTState) -> None:
    """Records ``state`` as ``model.s2ft_state``; while it is there, transformers' ``save_pretrained`` refuses, and
    ``load_state_dict`` checks every S2FT layer's part of a state dict before it loads any (``_fit_every_layer``),
    on the model and on any of its submodules that holds others (``model.model.layers[3].load_state_dict``)."""
    model.s2ft_state = state
    # Every module with children, not only those holding an S2FT layer now: switch_adapter may wrap others later.
    state.load_hooks = [
        module.register_load_state_dict_pre_hook(_fit_every_layer)
        for module in model.modules()
        if module is model or next(module.children(), None) is not None
    ]
    # A plain function, not a bound method: a pickled model (torch.save) stores it by name and refuses when loaded.
    model.save_pretrained = _refuse_save_pretrained


def detach_state(model: nn.Module) -> None:
    """Undoes ``attach_state``: the model is plain again, and ``save_pretrained`` is transformers' own."""
    for hook in model.s2ft_state.load_hooks:
        hook.remove()
    del model.s2ft_state
    model.__dict__.pop("save_pretrained", None)


def _fit_every_layer(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    # Each S2FT layer refuses its own part of a state dict as it loads, after the tensors before it were copied: one
    # refused at the last layer left a half-loaded model. Fitted here first, before torch copies anything, a refusal
    # leaves every tensor as it was. The hook runs on the module load_state_dict was called on (a submodule's load
    # is atomic too) and on the S2FT model wherever it sits (a LightningModule's load reaches it as "model."); a
    # submodule reached inside a larger load was fitted there, so it fits nothing again.
    if prefix and getattr(module, "s2ft_state", None) is None:
        return
    fitted = {}
    for name, layer in module.named_modules():
        if isinstance(layer, S2FTLinear):
            fitted[f"{prefix}{name}.{FITTED}"] = layer._fit_state_dict(state_dict, f"{prefix}{name}.")
    # Only once every part is accepted: each layer takes its result from torch's own copy of the dict (a fitted
    # weight is in it already; one computed for a dict without the weight comes under FITTED) and fits nothing
    # twice.
    state_dict.update(fitted)


def _refuse_save_pretrained(*args, **kwargs) -> None:
    # The S2FT layers' weights hold zeros at the trained slots (the values are separate tensors from_pretrained
    # ignores), and a co-permuted model is in another order: the saved model would load back as another model.
    raise AdapterError(
        "save_pretrained cannot save an S2FT model: it would write the frozen weights without the trained values "
        "(zeros at the trained rows/columns), which from_pretrained loads back as another model. Save the adapter "
        "with s2ft.save_adapter(model, path) (s2ft.load_adapter loads it onto the base), or a plain merged model with "
        "s2ft.merge_and_unload(model).save_pretrained(path) (in place: the model stops being an S2FT model)"
    )


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


def model_state(model: nn.Module) -> S2FTState:
    """The model's ``S2FTState``; a clear error when it has none."""
    state = getattr(model, "s2ft_state", None)
    if state is None and getattr(model, "s2ft_adapters", None) is not None:
        raise AdapterError(
            "this model serves mixed adapters (s2ft.load_adapters), which are not saved, merged or switched: do that "
            "on a model with one adapter (s2ft.load_adapter on a fresh base); remove_adapter the last one for the base"
        )
    if state is None:
        raise AdapterError(
            "this model has no S2FT adapter; call s2ft.apply_s2ft(model, cfg) or s2ft.load_adapter first"
        )
    return state


def check_fresh(model: nn.Module, hint: str = "start from a fresh base model (or merge_and_unload)") -> None:
    """Refuses a model that already has S2FT applied or loaded: one adapter (``model.s2ft_state``, S2FTLinear
    modules) or mixed adapters (``model.s2ft_adapters``, `s2ft.multi_adapter`).

    Raises:
        AdapterError: Naming what to do instead (``hint``).
    """
    loaded = getattr(model, "s2ft_state", None) is not None or getattr(model, "s2ft_adapters", None) is not None
    if loaded or s2ft_modules(model):
        raise AdapterError(f"this model already has an S2FT adapter; {hint}")


# Set on a plain model whose weights hold a merged S2FT update (``merge_and_unload``, ``fuse_adapters``).
MERGED = "s2ft_merged"


def mark_merged(model: nn.Module) -> None:
    """Records that ``model``'s plain weights hold a merged S2FT update (``model.s2ft_merged = True``).

    The mark stays while S2FT is applied on top (``unload`` gives the merged weights back) and goes with the weights:
    ``from_pretrained`` of a saved merged model gives an unmarked one, a base of its own, and so does a
    ``load_state_dict`` that replaces every weight (the base's state dict loaded back, say); one that leaves any
    weight missing keeps the mark.
    """
    if getattr(model, MERGED_HOOK, None) is None:
        setattr(model, MERGED_HOOK, model.register_load_state_dict_post_hook(_unmark_when_replaced))
    setattr(model, MERGED, True)


MERGED_HOOK = "_s2ft_merged_hook"


def _unmark_when_replaced(model: nn.Module, incompatible_keys) -> None:
    # Called after the model's own subtree is loaded: no missing key means no merged value is left in it.
    if not incompatible_keys.missing_keys and hasattr(model, MERGED):
        delattr(model, MERGED)


def check_unmerged(model: nn.Module, action: str) -> None:
    """Refuses a model marked by ``mark_merged``: an adapter's delta is measured against the base it was trained on.

    The base check (``s2ft.adapter.check_base``) cannot see a merged update that lies outside the adapter's own
    rows/columns, where the merged model still holds the base's values; the mark can.

    Args:
        model: The model to load, fuse or export onto.
        action: What was refused, e.g. ``"load_adapter"``.

    Raises:
        AdapterError: Naming the merged update and how to get the base back.
    """
    if getattr(model, MERGED, False):
        raise AdapterError(
            f"{action}: this model's weights already hold a merged S2FT update (merge_and_unload or fuse_adapters), "
            "so another adapter's delta on top would be measured against the wrong base (the base check passes "
            "wherever the adapters train other rows/columns). Load the base model again (from_pretrained); from an "
            "S2FT model, s2ft.unload(model) instead of merge_and_unload gives the base back"
        )
