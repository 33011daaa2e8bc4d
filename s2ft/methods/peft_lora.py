"""LoRA and DoRA baselines through PEFT (paper defaults: r=32, alpha=64, dropout 0.05 on q, k, v, up, down)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from s2ft.checks import is_number, is_positive_int
from s2ft.methods.method import Method
from s2ft.methods.spft import entry_count, module_list_problems

# peft is imported inside the functions that use it: it is an optional dependency (the `suite` extra) and takes
# ~0.5 s to import, which S2FT, full and SpFT runs (and `import s2ft.methods`) should not pay.

DEFAULTS: dict[str, Any] = {
    "r": 32,
    "lora_alpha": 64,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    "budget": None,  # a trainable count or a fraction: sets r to the closest rank (r is then ignored)
    # What a fractional budget is a fraction of: "model" (all parameters) or "linear" (the entries of the decoder's
    # q, k, v, o, gate, up and down weights, what SpFT's p counts), so LoRA and SpFT at one p train the same count.
    "budget_of": "model",
}
BUDGET_OF = ("model", "linear")


def option_problems(options: dict[str, Any]) -> list[str]:
    """Every problem of LoRA's / DoRA's ``method.options`` (merged over DEFAULTS) that shows without the model."""
    problems = []
    budget = options["budget"]
    if budget is None and not is_positive_int(options["r"]):
        problems.append(f"method.options.r must be a rank (int >= 1), got {options['r']!r}")
    if budget is not None and (not is_number(budget) or budget <= 0):
        problems.append(f"method.options.budget must be null, a count >= 1 or a fraction in (0, 1), got {budget!r}")
    if options["budget_of"] not in BUDGET_OF:
        problems.append(f"method.options.budget_of must be one of {BUDGET_OF}, got {options['budget_of']!r}")
    if not is_number(options["lora_alpha"]) or options["lora_alpha"] <= 0:
        problems.append(f"method.options.lora_alpha must be a number > 0, got {options['lora_alpha']!r}")
    dropout = options["lora_dropout"]
    if not is_number(dropout) or not 0 <= dropout < 1:
        problems.append(f"method.options.lora_dropout must be a probability in [0, 1), got {dropout!r}")
    return problems + module_list_problems(options["target_modules"])


def fit_problems(model: nn.Module, options: dict[str, Any]) -> list[str]:
    """Target modules ``model`` lacks (and a budget's rank), as `prepare` would find them."""
    try:
        if options["budget"] is not None:
            rank_for_budget(model, options["budget"], options["target_modules"], options["budget_of"])
        else:
            lora_param_count(model, options["r"], options["target_modules"])
    except ValueError as err:
        return [str(err)]
    return []


def lora_param_count(model: nn.Module, r: int, target_modules: list[str], key: str = "method.options") -> int:
    """Trainable parameters PEFT's LoRA with rank ``r`` on ``target_modules`` would add: r * (in + out) per linear.

    Modules are matched as PEFT matches a list: the module name equals a target or ends with ``"." + target``.
    """
    if not is_positive_int(r):
        raise ValueError(f"{key}.r must be a positive int, got {r!r}")
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError(f"{key}.target_modules must be a non-empty list of module names, got {target_modules!r}")
    count, matched = 0, set()
    for target, module in _target_linears(model, target_modules):
        count += r * (module.in_features + module.out_features)
        matched.add(target)
    missing = sorted(set(target_modules) - matched)
    if missing:
        raise ValueError(f"{key}.target_modules {missing} match no nn.Linear in the model; check the names")
    return count


def rank_for_budget(model: nn.Module, budget: float | int, target_modules: list[str], of: str = "model") -> int:
    """The LoRA rank whose trainable count is closest to ``budget``: a count, or a fraction of the model's parameters
    (``of="model"``) or of its decoder linear-layer entries (``of="linear"``, the base of SpFT's p)."""
    if isinstance(budget, bool) or not isinstance(budget, float | int) or budget <= 0:
        raise ValueError(f"method.options.budget must be a count >= 1 or a fraction in (0, 1), got {budget!r}")
    if of not in BUDGET_OF:
        raise ValueError(f"method.options.budget_of must be one of {BUDGET_OF}, got {of!r}")
    if isinstance(budget, float) and budget < 1:
        if of == "model":
            base = sum(p.numel() for p in model.parameters())
        else:
            base = entry_count(model)
        count = budget * base
    else:
        count = budget
    r = max(1, round(count / lora_param_count(model, 1, target_modules)))
    full = full_rank(model, target_modules)
    if r > full:
        # Past every target layer's full rank a LoRA adds parameters and no expressiveness (a budget of 0.99 of the
        # model was taken as it came).
        raise ValueError(
            f"method.options.budget={budget!r} gives LoRA rank {r}, above {full}, the largest full rank of the target "
            f"layers (no layer's update can use more); lower the budget to at most "
            f"{full * lora_param_count(model, 1, target_modules)} parameters, or train every weight with method=full"
        )
    return r


def full_rank(model: nn.Module, target_modules: list[str]) -> int:
    """The largest ``min(in_features, out_features)`` of the linears ``target_modules`` match."""
    lora_param_count(model, 1, target_modules)  # the targets' own errors first
    return max(min(module.in_features, module.out_features) for _, module in _target_linears(model, target_modules))


def _target_linears(model: nn.Module, target_modules: list[str]):
    """(target, module) for each ``nn.Linear`` a target matches as PEFT matches a list: the module name equals the
    target or ends with ``"." + target``."""
    for name, module in model.named_modules():
        target = next((t for t in target_modules if name == t or name.endswith("." + t)), None)
        if target is not None and isinstance(module, nn.Linear):
            yield target, module


def lora_config(options: dict[str, Any], dora: bool, r: int | None = None):
    """The ``peft.LoraConfig`` for ``options`` (DoRA when ``dora``; ``r`` overrides ``options["r"]``)."""
    from peft import LoraConfig

    targets = options["target_modules"]
    if isinstance(targets, str) or not targets:
        raise ValueError(f"method.options.target_modules must be a list of module names, got {targets!r}")
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=r or options["r"],
        lora_alpha=options["lora_alpha"],
        lora_dropout=options["lora_dropout"],
        target_modules=list(targets),
        use_dora=dora,
    )


def prepare(model: nn.Module, options: dict[str, Any], calibration, name: str = "lora") -> nn.Module:
    """Wrap ``model`` in a PEFT model whose only trainable parameters are the LoRA (and DoRA magnitude) weights."""
    from peft import get_peft_model

    r = None
    if options["budget"] is not None:
        r = rank_for_budget(model, options["budget"], options["target_modules"], options["budget_of"])
    return get_peft_model(model, lora_config(options, dora=name == "dora", r=r))


def save(model: nn.Module, out_dir: Path) -> None:
    from peft.tuners.lora import Embedding as LoraEmbedding

    # PEFT's default ("auto") asks the hub whether the base model's vocabulary changed: a network call and a warning
    # for a local model. The suite never resizes the vocabulary, so the embeddings are saved only when LoRA trains them.
    embedding_trained = any(isinstance(module, LoraEmbedding) for module in model.modules())
    model.save_pretrained(out_dir, save_embedding_layers=embedding_trained)


def load(model: nn.Module, path: Path) -> nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(model, path)


def merge(model: nn.Module) -> nn.Module:
    return model.merge_and_unload()


LORA = Method("lora", DEFAULTS, prepare, save, load, merge, option_problems=option_problems, fit_problems=fit_problems)
DORA = Method("dora", DEFAULTS, prepare, save, load, merge, option_problems=option_problems, fit_problems=fit_problems)
