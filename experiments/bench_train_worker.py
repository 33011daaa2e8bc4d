"""One training-benchmark measurement (one method, one batch shape) in a fresh process.

Run by `benchmark_training.py` as `python experiments/bench_train_worker.py '<json spec>'`; prints one JSON line.
A fresh process per method keeps the peak memory of one method from hiding in the allocator caches of another.
"""

import json
import statistics
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.bench_memory import PeakMemory
from experiments.bench_methods import (
    lora_params_per_rank,
    match_lora_rank,
    prepare_method,
    total_parameter_count,
    trained_parameter_count,
)
from experiments.bench_models import build_bench_model
from experiments.bench_timing import time_call


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
    total = total_parameter_count(model)
    rank = match_lora_rank(model, spec["budget"], targets)
    target_params = rank * lora_params_per_rank(model, targets)
    generator = torch.Generator().manual_seed(spec["seed"])
    shape = (spec["warmup"] + spec["steps"], spec["batch_size"], spec["seq_len"])
    batches = torch.randint(model.config.vocab_size, shape, generator=generator).to(device)

    meter = PeakMemory(device)
    meter.start_baseline()
    model = prepare_method(
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
