"""S2FT through the core library, with an option to match a LoRA configuration's trainable-parameter count."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from s2ft.adapter import load_adapter, merge_and_unload, save_adapter, trainable_parameter_count
from s2ft.api import apply_s2ft
from s2ft.checks import did_you_mean, is_positive_int
from s2ft.config import S2FTConfig, S2FTConfigError, field_problems
from s2ft.methods.method import Method
from s2ft.methods.peft_lora import lora_param_count
from s2ft.selection import component_budgets
from s2ft.structures import find_structures

CONFIG_FIELDS = tuple(field.name for field in dataclasses.fields(S2FTConfig))

# method.options: S2FTConfig's fields with its defaults (the paper's arithmetic ratios in place of none), and two
# options of the run: a budget matched to a LoRA configuration, and the size of the calibration set.
DEFAULTS: dict[str, Any] = {
    **{field.name: field.default for field in dataclasses.fields(S2FTConfig)},
    "ratios": {"o": 0.052, "down": 0.02},
    "match_lora": None,  # {"r": RANK, "target_modules": [...]}: target_params becomes that LoRA's trainable count
    "calibration_size": 64,  # items, or a fraction (0, 1) of the training set (`calibration_items`)
}
# The strategies that score units on training batches (`s2ft.selection`); the others need no calibration data.
CALIBRATED_STRATEGIES = ("activation", "weight_activation", "gradient")
MATCH_LORA_KEYS = ("r", "target_modules")
MATCH_TOLERANCE = 0.02  # relative gap allowed between S2FT's and the matched LoRA's trainable counts


def option_problems(options: dict[str, Any]) -> list[str]:
    """Every problem of S2FT's ``method.options`` (merged over DEFAULTS) that shows without the model.

    The budget's size (``match_lora``) and whether it fits need the model; `build_config` checks those.
    """
    problems = _budget_problems(options) + _ratio_problems(options)
    size = options["calibration_size"]
    if not (is_positive_int(size) or (isinstance(size, float) and 0 < size < 1)):
        problems.append(
            f"method.options.calibration_size must be a number of items (int >= 1) or a fraction of the training set "
            f"(0 < float < 1, e.g. 0.01 as in the paper), got {size!r}"
        )
    exclude = options["exclude"]
    if exclude is not None and not (isinstance(exclude, str) and Path(exclude).is_dir()):
        problems.append(f"method.options.exclude {exclude!r} is not an adapter folder (give the path save wrote)")
    budgeted = _budgeted(options)
    if not budgeted and options["ratios"] is None:
        problems.append("method.options: give ratios, or a budget (target_params or match_lora)")
    if options["target_split"] is not None and not budgeted:
        problems.append("method.options.target_split is only used with a budget; remove it or set target_params")
    fields = {name: options[name] for name in CONFIG_FIELDS if name not in ("ratios", "exclude")}
    problems += [f"method.options: {problem}" for problem in field_problems(fields)]
    return problems


def _budgeted(options: dict[str, Any]) -> bool:
    """Whether the options set a parameter budget (``target_params`` or ``match_lora``)."""
    return options["target_params"] is not None or options["match_lora"] is not None


def _budget_problems(options: dict[str, Any]) -> list[str]:
    """The rules of the option S2FTConfig does not have: match_lora, and that it is not given with target_params."""
    problems = []
    match = options["match_lora"]
    if match is not None and options["target_params"] is not None:
        problems.append("set method.options.match_lora or method.options.target_params, not both")
    if match is not None and not isinstance(match, dict):
        problems.append(f"method.options.match_lora must be {{r: RANK, target_modules: [...]}}, got {match!r}")
    elif match is not None:
        prefix = "method.options.match_lora."
        problems += [
            f"unknown key {prefix}{key}; {did_you_mean(key, MATCH_LORA_KEYS, prefix)}"
            for key in match
            if key not in MATCH_LORA_KEYS
        ]
    return problems


def _ratio_problems(options: dict[str, Any]) -> list[str]:
    """The ratios, by S2FTConfig's rules. With a budget they split it over components (`build_config`), and the
    S2FTConfig built then never sees them; without one they are its own."""
    ratios = options["ratios"]
    if ratios is None:
        return []
    split = _budgeted(options) and not options["target_split"]
    why = " (with a budget, ratios set how it is split over components)" if split else ""
    return [f"method.options.{problem}{why}" for problem in field_problems({"ratios": ratios})]


def build_config(model: nn.Module, options: dict[str, Any]) -> S2FTConfig:
    """Translate ``method.options`` into an ``S2FTConfig`` (``match_lora`` becomes ``target_params``).

    With a parameter budget (``match_lora`` or ``target_params``) and no ``target_split``, the budget is split over
    the components named in ``ratios`` in proportion to the parameters those ratios would train (ratio x weight size),
    so ``ratios: {o: .052, down: .02}`` keeps its O/Down balance (about half and half on LLaMA-7B) at any budget.

    Raises:
        S2FTConfigError: Options S2FTConfig does not check itself (match_lora, ratios that split a budget) are wrong,
            or the config is (listing every problem).
    """
    # What the S2FTConfig built below checks itself (every field it is given) is not checked here.
    problems = _budget_problems(options) + (_ratio_problems(options) if _budgeted(options) else [])
    if problems:
        raise S2FTConfigError("invalid method.options:\n  - " + "\n  - ".join(problems))
    ratios, target_params, split = options["ratios"], options["target_params"], options["target_split"]
    match = options["match_lora"]
    if match is not None:
        target_params = lora_param_count(model, match.get("r"), match.get("target_modules"), "match_lora")
    if target_params is not None and ratios:
        if not split:
            layer = find_structures(model)[0]
            params = {c: r * layer.linear(c).weight.numel() for c, r in ratios.items()}
            split = {c: p / sum(params.values()) for c, p in params.items()}
        ratios = None
    fields = {name: options[name] for name in CONFIG_FIELDS}
    return S2FTConfig(**{**fields, "ratios": ratios, "target_params": target_params, "target_split": split})


def planned_params(model: nn.Module, options: dict[str, Any]) -> int:
    """The trainable count ``prepare`` gives ``model`` with ``options``, from the budget rule alone: nothing is
    selected or changed, so it works on a meta-device model of a paper's shape (`s2ft.models.shape_model`)."""
    cfg = build_config(model, options)
    structures = find_structures(model)
    budgets = component_budgets(cfg, structures, sum(p.numel() for p in model.parameters()))
    return sum(count * structures[0].unit_params(c) for c, count in budgets.items())


def fit_problems(model: nn.Module, options: dict[str, Any]) -> list[str]:
    """What `prepare` would refuse on ``model`` from the budget rule alone (no unit, layers it lacks, a match_lora
    count its units cannot meet); a meta-device model of the real shape will do."""
    try:
        got = planned_params(model, options)
        match = options["match_lora"]
        want = None if match is None else lora_param_count(model, match.get("r"), match.get("target_modules"))
    except ValueError as err:  # S2FTConfigError included
        return [f"method.options: {err}".replace(":\n  - ", ": ").replace("\n  - ", "; ")]
    if want is not None and abs(got - want) > MATCH_TOLERANCE * want:
        return [
            f"method.options.match_lora asks for {want} parameters but S2FT's units give {got} (more than "
            f"{MATCH_TOLERANCE:.0%} apart): add a fine-grained component (down/up/gate) to method.options.ratios"
        ]
    return []


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
METHOD = Method(
    "s2ft",
    DEFAULTS,
    prepare,
    save_adapter,
    load_adapter,
    merge_and_unload,
    option_problems=option_problems,
    calibration_items=calibration_items,
    fit_problems=fit_problems,
)
