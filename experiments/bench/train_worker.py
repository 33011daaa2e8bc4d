"""One training-benchmark measurement (one method, one batch shape) in a fresh process.

Run by `experiments.bench.training` as `python -m experiments.bench.train_worker '<json spec>'`; prints one JSON
line. A fresh process per method keeps the peak memory of one method from hiding in the allocator caches of another.

The methods are `s2ft.methods`' (each set up with the same trainable budget) and `floor`: every weight frozen with
the backward pass still run to the embeddings (the embedding output is made to require grad, as `transformers` does
for adapters with gradient checkpointing), the cost of a step that updates nothing, which no method that trains
weights inside the network can go below.
"""

import json
import statistics
import sys

import torch
from torch import nn

from experiments.bench.models import build_bench_model
from experiments.bench.timing import time_call
from s2ft.memory import PeakMemory
from s2ft.methods import prepare_model, trainable_summary
from s2ft.methods.peft_lora import lora_param_count, rank_for_budget
from s2ft.methods.spft import entry_count

METHODS = ("s2ft", "lora", "dora", "full", "spft", "floor")


def prepare(
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
    """Sets which parameters train for `method` (through `s2ft.methods.prepare_model`) and returns the model to train.

    Args:
        model: a causal LM with every parameter trainable.
        method: one of `METHODS`.
        target_params: trainable-parameter budget of s2ft and spft (the LoRA count, so all methods match).
        rank: LoRA / DoRA rank (alpha = 2 x rank, as the study configs set it).
        targets: module names LoRA / DoRA adapt.
        layout: S2FT layout ("gather" or "permuted").
        seed: seed of the random unit selection of s2ft and spft.
        lora_dropout: dropout on the input of every LoRA / DoRA branch (PEFT's `lora_dropout`).
    """
    if method == "floor":
        model = prepare_model(model, "none")
        model.enable_input_require_grads()
        return model
    lora = {"r": rank, "lora_alpha": 2 * rank, "lora_dropout": lora_dropout, "target_modules": list(targets)}
    options = {
        "s2ft": {"ratios": None, "target_params": target_params, "layout": layout, "seed": seed},
        "lora": lora,
        "dora": lora,
        "full": {},
        # SpFT trains a fraction p of every targeted weight's entries: p is chosen so the count matches the budget.
        "spft": {"p": target_params / entry_count(model), "seed": seed},
    }
    if method not in options:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return prepare_model(model, method, options[method])


def trained_parameter_count(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Parameters that really trained in the last step: a gradient was computed and the optimizer holds them."""
    if optimizer is None:
        return 0
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return sum(p.numel() for p in model.parameters() if p.grad is not None and id(p) in held)


def train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, input_ids: torch.Tensor, device: str
) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward, backward and AdamW step on one batch of random tokens (the tokens are their own labels).

    Returns:
        The loss and the seconds of each phase: `forward` (loss included), `backward`, `optimizer` (0 without one).
    """
    if optimizer is not None:
        # Gradients are released at the start rather than the end of a step so that they can be counted after it.
        optimizer.zero_grad(set_to_none=True)
    out = {}
    phases = {"forward": time_call(lambda: out.update(loss=model(input_ids=input_ids, labels=input_ids).loss), device)}
    phases["backward"] = time_call(out["loss"].backward, device)
    phases["optimizer"] = time_call(optimizer.step, device) if optimizer is not None else 0.0
    return out["loss"].detach(), phases


def measure(spec: dict) -> dict:
    """Times `spec["steps"]` training steps after `spec["warmup"]` untimed ones and measures their peak memory.

    Args:
        spec: model, dtype, device, method, batch_size, seq_len, warmup, steps, seed, budget, targets, lora_dropout,
            layout, lr and threads (null: torch's default).

    Returns:
        step_s (median of the timed steps), step_s_all, phase_s (forward / backward / optimizer seconds of each
        timed step), peak_mem_mb (above the loaded model), baseline_mem_mb,
        trainable_params (actually trained), intended_params (requires_grad), total_params, lora_rank,
        target_params and final_loss.
    """
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    device = spec["device"]
    model = build_bench_model(spec["model"], spec["dtype"], device)
    targets = tuple(spec["targets"])
    total = trainable_summary(model)["total_params"]
    rank = rank_for_budget(model, spec["budget"], list(targets))
    target_params = lora_param_count(model, rank, list(targets))
    generator = torch.Generator().manual_seed(spec["seed"])
    shape = (spec["warmup"] + spec["steps"], spec["batch_size"], spec["seq_len"])
    batches = torch.randint(model.config.vocab_size, shape, generator=generator).to(device)

    meter = PeakMemory(device)
    meter.start_baseline()
    model = prepare(
        model,
        spec["method"],
        target_params=target_params,
        rank=rank,
        targets=targets,
        lora_dropout=spec.get("lora_dropout", 0.0),
        layout=spec["layout"],
        seed=spec["seed"],
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"]) if params else None
    meter.reset_peak()
    steps = [train_step(model, optimizer, input_ids, device) for input_ids in batches]
    peak = meter.peak_mb()
    timed = [phases for _, phases in steps[spec["warmup"] :]]
    step_s_all = [sum(phases.values()) for phases in timed]
    return {
        "step_s": statistics.median(step_s_all),
        "step_s_all": step_s_all,
        "phase_s": {name: [phases[name] for phases in timed] for name in ("forward", "backward", "optimizer")},
        "peak_mem_mb": peak,
        "baseline_mem_mb": meter.baseline_mb,
        "trainable_params": trained_parameter_count(model, optimizer),
        "intended_params": sum(p.numel() for p in params),
        "total_params": total,
        "lora_rank": rank,
        "target_params": target_params,
        "final_loss": steps[-1][0].item(),
    }


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
