"""Which units S2FT trains: budgets, registered scoring strategies and the one top/bottom-k routine."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from s2ft.adapter_format import Adapter, AdapterError, load_adapter_file
from s2ft.config import COMPONENTS, DEFAULT_TARGET_SPLIT, S2FTConfig, S2FTConfigError
from s2ft.registry import STRATEGIES
from s2ft.structures import AXIS, LayerStructure, Selection, find_structures

Scores = dict[tuple[int, str], torch.Tensor]
ScoreFn = Callable[..., Scores]


def register(name: str) -> Callable[[ScoreFn], ScoreFn]:
    """Registers a scoring strategy under `name` in `s2ft.registry.STRATEGIES` (a name can be taken only once).

    A strategy is called as `fn(model, structures, components, calibration=..., seed=...)` and returns
    `{(layer index, component): float tensor [num_units]}`; higher means more important.
    """
    return STRATEGIES.register(name)


def round_half_up(x: float) -> int:
    """Rounds to the nearest int, halves up; rounding to 9 decimals first absorbs float noise (0.29 * 100)."""
    return math.floor(round(x, 9) + 0.5)


def top_k(scores: torch.Tensor, k: int, order: str) -> torch.Tensor:
    """Indices of the k largest (order="large") or smallest (order="small") scores, returned sorted.

    The sort is stable, so among equal scores the lower index wins.

    Raises:
        ValueError: If k is out of [0, len(scores)], the order is unknown, or a score is NaN.
    """
    if order not in ("large", "small"):
        raise ValueError(f"unknown order {order!r}; valid: large, small")
    if not 0 <= k <= scores.numel():
        raise ValueError(f"cannot pick {k} of {scores.numel()} units")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; check the model weights and the calibration data")
    ranked = torch.sort(scores.reshape(-1), descending=order == "large", stable=True).indices
    return ranked[:k].sort().values


def chosen_layers(cfg: S2FTConfig, structures: list[LayerStructure]) -> list[LayerStructure]:
    """The structures of `cfg.layers` (all layers when None), in model order."""
    if cfg.layers is None:
        return list(structures)
    missing = sorted(set(cfg.layers) - {s.index for s in structures})
    if missing:
        raise S2FTConfigError(f"layers {missing} do not exist; the model has layers 0..{len(structures) - 1}")
    return [s for s in structures if s.index in set(cfg.layers)]


def component_budgets(cfg: S2FTConfig, structures: list[LayerStructure], total_params: int) -> dict[str, int]:
    """Total units per component over the chosen layers (see `unit_counts` for the rule)."""
    layers = chosen_layers(cfg, structures)
    if cfg.ratios is not None:
        return {c: sum(counts) for c, counts in _ratio_counts(cfg, layers).items()}
    return _target_budgets(cfg, layers, total_params)


def unit_counts(cfg: S2FTConfig, structures: list[LayerStructure], total_params: int) -> dict[tuple[int, str], int]:
    """Units to select per (layer, component): the budget rule.

    - `ratios`, allocation "uniform": every chosen layer gets round_half_up(ratio * num_units) units.
    - `ratios`, allocation "global": the component gets round_half_up(ratio * sum of num_units over chosen layers)
      units in total, picked over all layers at once by score, so the per-layer split is only known after scoring:
      use `component_budgets` for the totals and `select_units` for the split.
    - `target_params` (an int count, or a float fraction of `total_params` rounded half up to a count T), split by
      `target_split` (default half "o", half "down"): every component but the last in COMPONENTS order gets
      round_half_up(share * T / unit_params) units (unit_params: the weight entries of one unit, e.g. head_dim *
      hidden for a head); the last gets round_half_up(remaining params / its unit_params), so the total lands within
      half a unit of the last component (for the default split: one Down channel) of T. A component's total is
      spread as evenly as possible over the chosen layers: total // L each, plus one for the first total % L layers.

    Args:
        cfg: The config.
        structures: All layers, from `find_structures`.
        total_params: The model's parameter count, used when target_params is a fraction.

    Returns:
        {(layer index, component): count} for the chosen layers and the configured components.

    Raises:
        S2FTConfigError: If a component gets zero units (naming the smallest ratio or target that gives one),
            the budget exceeds the units available, a layer does not exist, or allocation is "global".
    """
    layers = chosen_layers(cfg, structures)
    if cfg.ratios is not None and cfg.allocation == "uniform":
        ratio_counts = _ratio_counts(cfg, layers)
        return {(s.index, c): ratio_counts[c][i] for i, s in enumerate(layers) for c in cfg.components}
    if cfg.allocation == "global":
        raise S2FTConfigError(
            "allocation='global' splits the budget across layers by score; use component_budgets() for the totals "
            "or select_units() for the per-layer split"
        )
    counts = {}
    for component, total in component_budgets(cfg, layers, total_params).items():
        base, extra = divmod(total, len(layers))
        for i, s in enumerate(layers):
            counts[(s.index, component)] = base + (i < extra)
    return counts


def _ratio_counts(cfg: S2FTConfig, layers: list[LayerStructure]) -> dict[str, list[int]]:
    """Per component: each chosen layer's count (uniform) or the one total over all chosen layers (global)."""
    counts, problems = {}, []
    for c in cfg.components:
        ratio = cfg.ratios[c]
        pools = [s.num_units(c) for s in layers]
        if cfg.allocation == "global":
            pools = [sum(pools)]
        counts[c] = [round_half_up(ratio * units) for units in pools]
        if 0 in counts[c]:
            units = max(pools)
            scope = "per layer" if cfg.allocation == "uniform" else "over all layers"
            problems.append(
                f"ratios[{c!r}]={ratio:g} gives 0 of {units} units {scope}; the smallest ratio giving one unit is "
                f"{0.5 / units:.4g}"
            )
    if problems:
        raise S2FTConfigError("budget gives no unit:\n  - " + "\n  - ".join(problems))
    return counts


def _target_budgets(cfg: S2FTConfig, layers: list[LayerStructure], total_params: int) -> dict[str, int]:
    target = cfg.target_params
    target = target if isinstance(target, int) else round_half_up(target * total_params)
    split = cfg.target_split or DEFAULT_TARGET_SPLIT
    components = [c for c in COMPONENTS if c in split]
    budgets, used = {}, 0
    for i, c in enumerate(components):
        unit_params = layers[0].unit_params(c)
        capacity = sum(s.num_units(c) for s in layers)
        last = i == len(components) - 1
        wanted = (target - used) / unit_params if last else split[c] * target / unit_params
        count = max(round_half_up(wanted), 0)
        if count == 0:
            hint = "" if last else f" the smallest target giving one is {math.ceil(0.5 * unit_params / split[c])};"
            raise S2FTConfigError(
                f"target_params={cfg.target_params} (= {target} params) gives no {c!r} unit (one has {unit_params} "
                f"params);{hint} raise target_params or change target_split"
            )
        if count > capacity:
            raise S2FTConfigError(
                f"target_params={cfg.target_params} (= {target} params) needs {count} {c!r} units but the chosen "
                f"layers have only {capacity}; lower target_params or change target_split"
            )
        budgets[c] = count
        used += count * unit_params
    return budgets


def unit_norms_sq(matrix: torch.Tensor, axis: int, unit_size: int) -> torch.Tensor:
    """Squared L2 norm of each unit's slice of a weight-shaped matrix (rows for axis 0, columns for axis 1), fp64."""
    matrix = matrix.detach().double()
    if axis == 0:
        return matrix.reshape(-1, unit_size, matrix.shape[1]).pow(2).sum((1, 2))
    return matrix.reshape(matrix.shape[0], -1, unit_size).pow(2).sum((0, 2))


@register("random")
def random_scores(model, structures, components, calibration=None, seed=0) -> Scores:
    """Uniform random scores in [0, 1), one independent stream per (seed, layer, component).

    Each stream's generator is seeded from numpy's SeedSequence([seed, layer, component index]), so a component's
    draw does not depend on which other components are selected, and CPU sampling is independent of thread count.
    """
    scores = {}
    for s in structures:
        for c in components:
            stream = np.random.SeedSequence([seed, s.index, COMPONENTS.index(c)]).generate_state(1, np.uint64)[0]
            generator = torch.Generator().manual_seed(int(stream))
            scores[(s.index, c)] = torch.rand(s.num_units(c), generator=generator, dtype=torch.float64)
    return scores


@register("weight")
def weight_scores(model, structures, components, calibration=None, seed=0) -> Scores:
    """L2 norm of each unit's slice of its component's own weight (e.g. an O head: its head_dim columns of o_proj)."""
    return {
        (s.index, c): unit_norms_sq(s.linear(c).weight, AXIS[c], s.unit_size(c)).sqrt()
        for s in structures
        for c in components
    }


@register("activation")
def activation_scores(model, structures, components, calibration=None, seed=0) -> Scores:
    """L2 norm of each unit's activation over all non-padding calibration tokens (attention_mask == 1).

    Input-side components read the slice of the matrix input: "o" the per-head attention output entering o_proj,
    "down" the intermediate channel act(gate) * up entering down_proj. Output-side components (q, k, v, gate, up)
    read the unit's slice of that projection's output (before RoPE / norms). The model runs in eval mode under
    torch.no_grad; the norm is sqrt of the sum of squares over tokens and the unit's features.
    """
    batches = _calibration(calibration, model, "activation")
    sums = {(s.index, c): torch.zeros(s.num_units(c), dtype=torch.float64) for s in structures for c in components}
    current = {}

    def accumulate(key, x):
        mask = current["mask"]
        if x.shape[:2] != mask.shape:
            raise ValueError(f"activation of shape {tuple(x.shape)} does not match attention_mask {tuple(mask.shape)}")
        tokens = x.detach()[mask.bool()].double()
        sums[key] += tokens.reshape(tokens.shape[0], sums[key].numel(), -1).pow(2).sum((0, 2)).cpu()

    handles = []
    for s in structures:
        for c in components:
            linear, key = s.linear(c), (s.index, c)
            if AXIS[c] == 1:
                hook = linear.register_forward_pre_hook(lambda _m, args, key=key: accumulate(key, args[0]))
            else:
                hook = linear.register_forward_hook(lambda _m, _args, out, key=key: accumulate(key, out))
            handles.append(hook)
    try:
        with _eval_mode(model), torch.no_grad():
            for batch in batches:
                current["mask"] = batch["attention_mask"]
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    return {key: total.sqrt() for key, total in sums.items()}


@register("weight_activation")
def weight_activation_scores(model, structures, components, calibration=None, seed=0) -> Scores:
    """Product of the `weight` and `activation` scores of each unit."""
    batches = _calibration(calibration, model, "weight_activation")
    activation = activation_scores(model, structures, components, batches)
    weight = weight_scores(model, structures, components)
    return {key: weight[key] * activation[key] for key in weight}


@register("gradient")
def gradient_scores(model, structures, components, calibration=None, seed=0) -> Scores:
    """Per unit: sqrt of the sum over calibration batches of the squared L2 norm of the unit's weight-gradient slice.

    The loss is the model's own LM loss for each batch (`labels` given, -100 ignored), in eval mode. Only the scored
    weights require grad; a post-accumulate-grad hook reduces each weight's .grad to per-unit squared norms and frees
    it at once, so no optimizer state exists and all gradients are never held together. requires_grad flags, .grad
    and the training mode are restored afterwards.
    """
    batches = _calibration(calibration, model, "gradient", need_labels=True)
    sums = {(s.index, c): torch.zeros(s.num_units(c), dtype=torch.float64) for s in structures for c in components}
    flags = {p: p.requires_grad for p in model.parameters()}
    scored = {s.linear(c).weight: (s.index, c) for s in structures for c in components}
    old_grads = {w: w.grad for w in scored}

    unit_size = {(s.index, c): s.unit_size(c) for s in structures for c in components}

    def reduce_grad(weight):
        key = scored[weight]
        sums[key] += unit_norms_sq(weight.grad, AXIS[key[1]], unit_size[key]).cpu()
        weight.grad = None

    handles = []
    try:
        for p in flags:
            p.requires_grad_(False)
        for weight in scored:
            weight.grad = None
            weight.requires_grad_(True)
            handles.append(weight.register_post_accumulate_grad_hook(reduce_grad))
        with _eval_mode(model), torch.enable_grad():
            for batch in batches:
                loss = getattr(model(**batch), "loss", None)
                if loss is None:
                    raise ValueError(f"{type(model).__name__} returned no loss; gradient scoring needs a causal LM")
                loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for weight, grad in old_grads.items():
            weight.grad = grad
    return {key: total.sqrt() for key, total in sums.items()}


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _calibration(calibration, model: nn.Module, strategy: str, need_labels: bool = False):
    """Checks that calibration data was given, then returns an iterator of checked batches on the model's device."""
    if calibration is None:
        raise S2FTConfigError(
            f"strategy {strategy!r} needs calibration data: pass calibration=<iterable of dicts with input_ids, "
            f"attention_mask, labels>, or use strategy 'random' or 'weight'"
        )
    device = next(model.parameters()).device
    keys = ("input_ids", "attention_mask", "labels") if need_labels else ("input_ids", "attention_mask")

    def batches():
        count = 0
        for i, batch in enumerate(calibration):
            missing = [k for k in keys if not isinstance(batch, Mapping) or k not in batch]
            if missing:
                raise S2FTConfigError(
                    f"calibration batch {i} lacks {missing}; strategy {strategy!r} needs {list(keys)}"
                )
            count += 1
            yield {k: torch.as_tensor(batch[k]).to(device) for k in keys}
        if count == 0:
            raise S2FTConfigError(f"calibration yielded no batches; strategy {strategy!r} needs at least one")

    return batches()


def excluded_units(exclude, structures: list[LayerStructure]) -> Selection:
    """Normalizes `cfg.exclude` to a Selection in original coordinates.

    Accepts a Selection dict ((layer, component) -> unit indices), a dict of module name -> unit indices, an
    `s2ft.adapter_format.Adapter` (its `units()`), or a path to a saved adapter (read with `load_adapter_file`).
    """
    if exclude is None:
        return {}
    if isinstance(exclude, (str, Path)):
        exclude = load_adapter_file(exclude)
    if isinstance(exclude, Adapter):
        _check_units_fit(exclude, structures)
    if callable(getattr(exclude, "units", None)):
        exclude = exclude.units()
    if not isinstance(exclude, Mapping):
        raise ValueError(f"exclude must be an adapter, a selection dict or an adapter path, got {type(exclude)}")
    names = {s.module_name(c): (s.index, c) for s in structures for c in COMPONENTS}
    selection = {}
    for key, units in exclude.items():
        if isinstance(key, str):
            if key not in names:
                raise ValueError(f"exclude names module {key!r}, which is not an S2FT projection of this model")
            key = names[key]
        if key not in names.values():
            raise ValueError(f"exclude has key {key!r}; expected (layer index, component) of this model")
        units = torch.as_tensor(units, dtype=torch.long).reshape(-1).cpu()
        size = structures[key[0]].num_units(key[1])
        if units.numel() and (units.min() < 0 or units.max() >= size):
            raise ValueError(f"exclude {key}: unit indices must lie in [0, {size}), got {units.tolist()}")
        selection[key] = units
    return selection


def _check_units_fit(adapter: Adapter, structures: list[LayerStructure]) -> None:
    """Refuses an adapter whose units are not this model's: unit indices mean other rows/columns under another head
    size (4 heads of 16 have the shapes of 8 heads of 8), so excluding them would exclude other units."""
    for name, m in adapter.modules.items():
        structure = structures[m.layer] if 0 <= m.layer < len(structures) else None
        fits = (
            structure is not None
            and structure.module_name(m.component) == name
            and structure.unit_size(m.component) == m.unit_size
            and structure.num_units(m.component) * m.unit_size == m.shape[m.axis]
        )
        if not fits:
            raise AdapterError(
                f"exclude: adapter module {name!r} ({m.component} units of {m.unit_size} in layer {m.layer}) is not a "
                f"projection of this model with those units: the adapter was made for another base model "
                f"({adapter.base_model or 'unknown'})"
            )


def select_units(model: nn.Module, cfg: S2FTConfig, calibration=None) -> Selection:
    """Selects the units to train: scores every unit with `cfg.strategy`, then keeps top/bottom-k per budget.

    Args:
        model: The model (not modified; its modes and requires_grad flags are restored).
        cfg: The config.
        calibration: Iterable of dicts with `input_ids`, `attention_mask`, `labels`; needed by activation,
            weight_activation and gradient.

    Returns:
        {(layer index, component): sorted long tensor of unit indices} in the model's current (original)
        coordinates, for every chosen layer and configured component.

    Raises:
        S2FTConfigError: For a bad config or budget; ValueError for missing calibration or too few units left
            after `cfg.exclude`.
    """
    structures = find_structures(model)
    layers = chosen_layers(cfg, structures)
    total_params = sum(p.numel() for p in model.parameters())
    excluded = excluded_units(cfg.exclude, structures)
    # Budgets first: a budget error must not wait for an expensive calibration pass.
    if cfg.allocation == "uniform":
        counts = unit_counts(cfg, structures, total_params)
    else:
        totals = component_budgets(cfg, structures, total_params)
    scores = STRATEGIES[cfg.strategy](model, layers, cfg.components, calibration=calibration, seed=cfg.seed)
    candidates = {}
    for s in layers:
        for c in cfg.components:
            keep = torch.ones(s.num_units(c), dtype=torch.bool)
            keep[excluded.get((s.index, c), torch.empty(0, dtype=torch.long))] = False
            candidates[(s.index, c)] = keep.nonzero().reshape(-1)
    if cfg.allocation == "uniform":
        return {
            (layer, c): _pick(scores[(layer, c)], units, counts[(layer, c)], cfg.order, f"layer {layer} {c!r}")
            for (layer, c), units in candidates.items()
        }
    selection = {}
    for c, total in totals.items():
        keys = [(s.index, c) for s in layers]
        pool = torch.cat([scores[key][candidates[key]] for key in keys])
        picked = _pick(pool, torch.arange(pool.numel()), total, cfg.order, f"all layers {c!r}")
        offset = 0
        for key in keys:
            size = candidates[key].numel()
            mine = picked[(picked >= offset) & (picked < offset + size)] - offset
            selection[key] = candidates[key][mine]
            offset += size
    return selection


def _pick(scores: torch.Tensor, candidates: torch.Tensor, k: int, order: str, where: str) -> torch.Tensor:
    """The top/bottom-k of `scores` among `candidates` (sorted unit indices)."""
    if k > candidates.numel():
        raise ValueError(
            f"{where}: {k} units requested but only {candidates.numel()} remain after excluding "
            f"the units of cfg.exclude; lower the budget"
        )
    return candidates[top_k(scores[candidates], k, order)]
