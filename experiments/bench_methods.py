"""The fine-tuning methods the training benchmark compares, each set up with the same trainable budget.

`floor` is every weight frozen with the backward pass still run to the embeddings (the embedding output is made to
require grad, as `transformers` does for adapters with gradient checkpointing): the cost of a step that updates
nothing, which no method that trains weights inside the network can go below.
"""

import torch
from torch import nn

METHODS = ("s2ft", "lora", "dora", "full", "spft", "floor")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def total_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lora_params_per_rank(model: nn.Module, targets: tuple[str, ...]) -> int:
    """LoRA parameters added per unit of rank: in + out features of every targeted linear layer."""
    count = sum(
        m.in_features + m.out_features
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )
    if count == 0:
        raise ValueError(f"no nn.Linear named any of {targets} in the model; pass other --lora-targets")
    return count


def match_lora_rank(model: nn.Module, budget: float, targets: tuple[str, ...]) -> int:
    """The LoRA rank whose parameter count is nearest to `budget` (a fraction < 1 of all parameters, or a count)."""
    budget_params = budget * total_parameter_count(model) if budget < 1 else budget
    return max(1, round(budget_params / lora_params_per_rank(model, targets)))


def prepare_method(
    model: nn.Module,
    method: str,
    *,
    target_params: int,
    rank: int,
    targets: tuple[str, ...],
    layout: str,
    seed: int,
    lora_dropout: float = 0.0,
) -> nn.Module:
    """Sets which parameters train for `method` and returns the model to train.

    Args:
        model: a causal LM with every parameter trainable.
        method: one of `METHODS`.
        target_params: trainable-parameter budget of s2ft and spft (the LoRA count, so all methods match).
        rank: LoRA / DoRA rank.
        targets: module names LoRA / DoRA adapt.
        layout: S2FT layout ("gather" or "permuted").
        seed: seed of the random unit selection of s2ft and spft.
        lora_dropout: dropout on the input of every LoRA / DoRA branch (PEFT's `lora_dropout`).
    """
    if method == "full":
        return model
    if method == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return model
    if method in ("lora", "dora"):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=lora_dropout,
            target_modules=list(targets),
            use_dora=method == "dora",
        )
        return get_peft_model(model, config)
    if method == "s2ft":
        from s2ft import S2FTConfig, apply_s2ft

        return apply_s2ft(model, S2FTConfig(target_params=target_params, layout=layout, seed=seed))
    if method == "spft":
        from s2ft.methods import prepare_model
        from s2ft.methods.spft import DEFAULTS, targeted_linears

        # SpFT trains a fraction p of every targeted weight's entries: choose p so the count matches the budget.
        numel = sum(linear.weight.numel() for _, linear in targeted_linears(model, DEFAULTS["target_modules"]))
        return prepare_model(model, "spft", {"p": target_params / numel, "seed": seed})
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def trained_parameter_count(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Parameters that really trained in the last step: a gradient was computed and the optimizer holds them."""
    if optimizer is None:
        return 0
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return sum(p.numel() for p in model.parameters() if p.grad is not None and id(p) in held)
