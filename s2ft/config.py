"""S2FTConfig: which coupled structures to train, how many, and how to pick them."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from s2ft.checks import is_number, is_positive_int
from s2ft.errors import UserError
from s2ft.registry import STRATEGIES

COMPONENTS = ("q", "k", "v", "o", "gate", "up", "down")
ORDERS = ("large", "small")
ALLOCATIONS = ("uniform", "global")
LAYOUTS = ("gather", "permuted")
DEFAULT_TARGET_SPLIT = {"o": 0.5, "down": 0.5}


class S2FTConfigError(UserError, ValueError):
    """A bad S2FTConfig or a budget that does not fit the model."""


@dataclass
class S2FTConfig:
    """What S2FT trains.

    Give exactly one of `ratios` or `target_params`. The config is validated once, on construction (call
    `validate()` again after changing a field); the budget arithmetic is documented in `s2ft.selection.unit_counts`.

    Attributes:
        ratios: Component (one of COMPONENTS) -> fraction of its units to train, in (0, 1].
        target_params: Instead of ratios, a trainable-parameter count (int >= 1) or a fraction of all model
            parameters (float in (0, 1)).
        target_split: With target_params, component -> share of the target (shares sum to 1);
            default {"o": 0.5, "down": 0.5}, the paper's recipe.
        strategy: Scoring strategy, a name registered in `s2ft.registry.STRATEGIES`
            (random, weight, activation, weight_activation, gradient).
        order: "large" keeps the top-k scores, "small" the bottom-k.
        seed: Seed of the random strategy.
        allocation: "uniform" gives every layer the same count; "global" picks over all layers at once.
        layers: Decoder layer indices to select from (default: all).
        exclude: Units that must not be selected: an Adapter, a Selection dict, or a path to a saved adapter.
        layout: "gather" trains index-gathered units in place; "permuted" co-permutes them to the front first.
    """

    ratios: dict[str, float] | None = None
    target_params: float | int | None = None
    target_split: dict[str, float] | None = None
    strategy: str = "random"
    order: str = "large"
    seed: int = 0
    allocation: str = "uniform"
    layers: list[int] | None = None
    exclude: Any = None
    layout: str = "gather"

    def __post_init__(self) -> None:
        # Hydra hands over DictConfig / ListConfig; plain containers keep the rest of the library simple.
        if isinstance(self.ratios, Mapping):
            self.ratios = dict(self.ratios)
        if isinstance(self.target_split, Mapping):
            self.target_split = dict(self.target_split)
        if isinstance(self.layers, Sequence) and not isinstance(self.layers, str):
            self.layers = list(self.layers)
        self.validate()

    def metadata(self) -> dict:
        """The selection settings, JSON-ready, as ``adapter_config.json`` records them (an excluded adapter by path)."""
        metadata = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "exclude"}
        metadata["exclude"] = str(self.exclude) if isinstance(self.exclude, (str, os.PathLike)) else None
        return metadata

    @property
    def components(self) -> list[str]:
        """The components that get units, in COMPONENTS order."""
        budget = self.ratios if self.ratios is not None else (self.target_split or DEFAULT_TARGET_SPLIT)
        return [c for c in COMPONENTS if c in budget]

    def validate(self) -> None:
        """Checks every field and raises one S2FTConfigError that lists every problem found.

        Raises:
            S2FTConfigError: If any field is invalid.
        """
        problems = []
        if (self.ratios is None) == (self.target_params is None):
            given = "both" if self.ratios is not None else "neither"
            problems.append(f"give exactly one of ratios or target_params ({given} given)")
        if self.target_split is not None and self.target_params is None:
            problems.append("target_split is only used with target_params; remove it or set target_params")
        problems += field_problems({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        if problems:
            raise S2FTConfigError("invalid S2FTConfig:\n  - " + "\n  - ".join(problems))


def field_problems(fields: Mapping[str, Any]) -> list[str]:
    """What is wrong with each of the given S2FTConfig fields on its own (a None budget field is not checked).

    The one home of the per-field rules: `S2FTConfig.validate` adds the rules between fields, and
    `s2ft.methods.s2ft.option_problems` checks the run config's `method.options` with the same rules.

    Args:
        fields: Field name -> value, any subset of S2FTConfig's fields.
    """
    problems = []
    for name, value in fields.items():
        if value is None and name in _OPTIONAL:
            continue
        problems += _FIELD_CHECKS[name](value)
    return problems


def _check_split(split) -> list[str]:
    problems = _check_shares("target_split", split)
    shares = [v for v in split.values() if is_number(v)] if isinstance(split, Mapping) else []
    if shares and len(shares) == len(split) and not math.isclose(sum(shares), 1.0, abs_tol=1e-6):
        problems.append(f"target_split shares must sum to 1, got {sum(shares):g}")
    return problems


def _check_seed(seed) -> list[str]:
    if not isinstance(seed, int) or isinstance(seed, bool):
        return [f"seed must be an int, got {seed!r}"]
    return []


def _check_layers(layers) -> list[str]:
    indices = layers if isinstance(layers, list) else []
    if not indices or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in indices):
        return [f"layers must be a non-empty list of layer indices >= 0, got {layers!r}"]
    if len(set(layers)) != len(layers):
        return [f"layers has duplicates: {layers}"]
    return []


def _check_exclude(exclude) -> list[str]:
    if isinstance(exclude, (int, float, bool)):
        return [f"exclude must be an adapter, a selection dict or an adapter path, got {exclude!r}"]
    return []


def _check_ratio(name: str, value) -> list[str]:
    if not is_number(value) or not 0 < value <= 1:
        return [f"{name} must be a number in (0, 1], got {value!r}"]
    return []


def _check_shares(field: str, shares) -> list[str]:
    if not isinstance(shares, Mapping) or not shares:
        return [f"{field} must be a non-empty dict of component -> fraction, got {shares!r}"]
    problems = []
    for component, value in shares.items():
        if component not in COMPONENTS:
            problems.append(f"{field}: unknown component {component!r}; valid components: {', '.join(COMPONENTS)}")
        else:
            problems += _check_ratio(f"{field}[{component!r}]", value)
    return problems


def _check_target(target) -> list[str]:
    if is_positive_int(target):
        return []
    if isinstance(target, float) and 0 < target < 1:
        return []
    return [
        f"target_params must be a parameter count (int >= 1) or a fraction of all parameters (float in (0, 1)), "
        f"got {target!r}"
    ]


def _check_choice(field: str, value, valid: tuple[str, ...]) -> list[str]:
    if value not in valid:
        return [f"unknown {field} {value!r}; valid: {', '.join(valid)}"]
    return []


_OPTIONAL = ("ratios", "target_params", "target_split", "layers", "exclude")
_FIELD_CHECKS = {
    "ratios": lambda ratios: _check_shares("ratios", ratios),
    "target_params": _check_target,
    "target_split": _check_split,
    "strategy": lambda strategy: _check_choice("strategy", strategy, tuple(STRATEGIES)),
    "order": lambda order: _check_choice("order", order, ORDERS),
    "seed": _check_seed,
    "allocation": lambda allocation: _check_choice("allocation", allocation, ALLOCATIONS),
    "layers": _check_layers,
    "exclude": _check_exclude,
    "layout": lambda layout: _check_choice("layout", layout, LAYOUTS),
}
