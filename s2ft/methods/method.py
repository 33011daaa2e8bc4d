"""What a fine-tuning method is to the suite: its options and the five steps of its lifecycle."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Method:
    """One fine-tuning method, registered in ``s2ft.methods.METHODS`` under ``name``.

    Attributes:
        name: The ``method.name`` of a config.
        defaults: Its options (``method.options``) and their defaults; any other option is an error.
        prepare: ``prepare(model, options, calibration, name) -> model``: make exactly its parameters trainable.
        save: ``save(model, out_dir)``: write what it trained.
        load: ``load(model, path) -> model``: apply what ``save`` wrote to a base model.
        merge: ``merge(model) -> model``: fold what it trained into plain weights.
        trains: False for evaluation-only methods (a training run with one is a configuration error).
        fp32_trainables: Cast the parameters it makes trainable to fp32 in a half-precision model (adapters); full
            fine-tuning keeps the model's dtype and trains through the optimizer's fp32 master weights.
        option_problems: ``option_problems(options) -> [problem, ...]``: what is wrong with its options (merged over
            ``defaults``) that shows without the model, for the run's config check (`s2ft.run_config`).
        calibration_items: ``calibration_items(options, train_items) -> int``: how many training items ``prepare``
            wants as calibration batches (0: none).
        fit_problems: ``fit_problems(model, options) -> [problem, ...]``: what ``prepare`` would refuse on ``model``
            (a budget that gives no unit, modules or layers it lacks), found on a meta-device model of its shape
            (`s2ft.models.shape_model`) before the real one loads; ``options`` already pass ``option_problems``.
    """

    name: str
    defaults: dict[str, Any]
    prepare: Callable
    save: Callable
    load: Callable
    merge: Callable
    trains: bool = True
    fp32_trainables: bool = True
    option_problems: Callable[[dict[str, Any]], list[str]] = lambda options: []
    calibration_items: Callable[[dict[str, Any], int], int] = lambda options, train_items: 0
    fit_problems: Callable[[Any, dict[str, Any]], list[str]] = lambda model, options: []
