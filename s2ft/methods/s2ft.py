"""S2FT through the core library, with an option to match a LoRA configuration's trainable-parameter count."""

from __future__ import annotations

from typing import Any

from torch import nn

from s2ft.adapter import load_adapter, merge_and_unload, save_adapter, trainable_parameter_count
from s2ft.api import apply_s2ft
from s2ft.config import S2FTConfig, S2FTConfigError
from s2ft.methods.method import Method
from s2ft.methods.peft_lora import lora_param_count
from s2ft.selection import component_budgets
from s2ft.structures import find_structures

DEFAULTS: dict[str, Any] = {
    "ratios": {"o": 0.05, "down": 0.02},
    "target_params": None,
    "target_split": None,
    "match_lora": None,
    "strategy": "random",
    "order": "large",
    "seed": 0,
    "allocation": "uniform",
    "layers": None,
    "layout": "gather",
    "exclude": None,
    "calibration_size": 64,  # items, or a fraction (0, 1) of the training set (`calibration_items`)
}
# The strategies that score units on training batches (`s2ft.selection`); the others need no calibration data.
CALIBRATED_STRATEGIES = ("activation", "weight_activation", "gradient")
MATCH_LORA_KEYS = ("r", "target_modules")
MATCH_TOLERANCE = 0.02  # relative gap allowed between S2FT's and the matched LoRA's trainable counts


def build_config(model: nn.Module, options: dict[str, Any]):
    """Translate ``method.options`` into a validated ``S2FTConfig`` (``match_lora`` becomes ``target_params``).

    With a parameter budget (``match_lora`` or ``target_params``) and no ``target_split``, the budget is split over
    the components named in ``ratios`` in proportion to the parameters those ratios would train (ratio x weight size),
    so ``ratios: {o: .052, down: .02}`` keeps its O/Down balance (about half and half on LLaMA-7B) at any budget.
    """
    ratios, target_params, split = options["ratios"], options["target_params"], options["target_split"]
    match = options["match_lora"]
    if match is not None:
        if target_params is not None:
            raise S2FTConfigError("set either method.options.match_lora or method.options.target_params, not both")
        unknown = sorted(set(match) - set(MATCH_LORA_KEYS))
        if unknown:
            raise S2FTConfigError(f"method.options.match_lora takes {' and '.join(MATCH_LORA_KEYS)}, not {unknown}")
        target_params = lora_param_count(model, match.get("r"), match.get("target_modules"), "match_lora")
    if target_params is not None and ratios:
        problems = ratio_problems(ratios)
        if problems:
            raise S2FTConfigError("invalid method.options:\n  - " + "\n  - ".join(problems))
        if not split:
            layer = find_structures(model)[0]
            params = {c: r * layer.linear(c).weight.numel() for c, r in ratios.items()}
            split = {c: p / sum(params.values()) for c, p in params.items()}
        ratios = None
    cfg = S2FTConfig(
        ratios=dict(ratios) if ratios else None,
        target_params=target_params,
        target_split=dict(split) if split else None,
        strategy=options["strategy"],
        order=options["order"],
        seed=options["seed"],
        allocation=options["allocation"],
        layers=list(options["layers"]) if options["layers"] is not None else None,
        exclude=options["exclude"],
        layout=options["layout"],
    )
    cfg.validate()
    return cfg


def ratio_problems(ratios) -> list[str]:
    """What is wrong with ``method.options.ratios`` (component -> fraction in (0, 1]) when a budget splits over them."""
    try:
        S2FTConfig(ratios=ratios)
    except S2FTConfigError as err:
        return [line.strip()[2:] for line in str(err).splitlines()[1:]]
    return []


def planned_params(model: nn.Module, options: dict[str, Any]) -> int:
    """The trainable count ``prepare`` gives ``model`` with ``options``, from the budget rule alone: nothing is
    selected or changed, so it works on a meta-device model of a paper's shape (`s2ft.models.shape_model`)."""
    cfg = build_config(model, options)
    structures = find_structures(model)
    budgets = component_budgets(cfg, structures, sum(p.numel() for p in model.parameters()))
    return sum(count * structures[0].unit_params(c) for c, count in budgets.items())


def prepare(model: nn.Module, options: dict[str, Any], calibration, name: str = "s2ft") -> nn.Module:
    """Freeze the model and train the selected heads/channels; with ``match_lora`` check the count is matched."""
    cfg = build_config(model, options)
    model = apply_s2ft(model, cfg, calibration)
    if options["match_lora"] is not None:
        got, want = trainable_parameter_count(model), cfg.target_params
        if abs(got - want) > MATCH_TOLERANCE * want:
            raise S2FTConfigError(
                f"S2FT trains {got} parameters but match_lora asks for {want} (more than {MATCH_TOLERANCE:.0%} apart): "
                f"the model's units are too coarse for this budget; add a fine-grained component (down/up/gate) "
                f"to method.options.ratios or target_split"
            )
    return model


def calibration_items(options: dict[str, Any], train_items: int) -> int:
    """How many training items the selection strategy of ``options`` scores on: 0 when it needs none, else
    `calibration_count` of ``calibration_size``."""
    options = {**DEFAULTS, **options}
    if options["strategy"] not in CALIBRATED_STRATEGIES:
        return 0
    return calibration_count(options["calibration_size"], train_items)


def calibration_count(size: int | float, train_items: int) -> int:
    """Items in the calibration set: ``size`` items, or a fraction ``0 < size < 1`` of the training set (the paper
    scores on 1% of the fine-tuning data); at least one item and at most the whole training set."""
    count = round(size * train_items) if isinstance(size, float) and size < 1 else int(size)
    return max(1, min(count, train_items))


# An S2FT run saves, loads and merges its adapter with the core library.
METHOD = Method("s2ft", DEFAULTS, prepare, save_adapter, load_adapter, merge_and_unload)
