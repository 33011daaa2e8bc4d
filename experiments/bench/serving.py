"""Serving many adapters at once: mixed-adapter batches of S2FT against PEFT LoRA, S2FT exported to LoRA, switching.

(a) Whole model (`serving_model`): a batch of 32 prompts of 128 tokens, 64 greedy decode steps, with 1, 4,
16 and 32 distinct adapters in the batch at equal trainable parameters, for the base model alone, S2FT's mixed
batch, PEFT LoRA's mixed batch, S2FT exported to LoRA and served by PEFT, and one adapter at a time with switching.
(b) The paper's Figure 6c (`serving_layer`): one layer, 1 to 10^4 requests each with its own adapter.
Writes `results.json`, `results.md`, `results.png`.

    python -m experiments.bench.serving --note "quiet machine"   # CPU, SmolLM2-135M -> results/serving_cpu
    python -m experiments.bench.serving --quick --out /tmp/s     # tiny_llama, a few steps (tests)
"""

import argparse
from pathlib import Path

import torch

from experiments.bench.machine import add_machine_args, start_benchmark
from experiments.bench.models import DTYPES, MODELS, build_bench_model
from experiments.bench.results import serving_chart, serving_table, write_results
from experiments.bench.serving_layer import bench_layer_adapters
from experiments.bench.serving_model import bench_serving
from experiments.bench.targets import target
from s2ft.methods.peft_lora import DEFAULTS as LORA_DEFAULTS
from s2ft.methods.peft_lora import lora_param_count, rank_for_budget

# Issue 19's CPU targets, at 16 distinct adapters in the batch (or the most measured, if fewer).
TARGETS = {"adapters": 16, "base_step_ratio": 1.3, "peft_speedup": 1.5}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2_135m", choices=MODELS)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16, 32], help="distinct adapters per batch")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=128, help="prompt tokens per row")
    parser.add_argument("--decode", type=int, default=64, help="greedy decode steps")
    parser.add_argument("--budget", type=float, default=0.01, help="trainable parameters per adapter (fraction)")
    parser.add_argument("--lora-targets", nargs="+", default=list(LORA_DEFAULTS["target_modules"]))
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds over the methods")
    parser.add_argument("--layer-adapters", type=int, nargs="+", default=[1, 10, 100, 1000, 10000])
    parser.add_argument("--layer-d", type=int, default=None, help="layer width (default 1024 on CPU, 4096 on GPU)")
    parser.add_argument("--layer-columns", type=int, default=16, help="S2FT columns per adapter (LoRA rank: half)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per layer measurement (median)")
    parser.add_argument("--quick", action="store_true", help="tiny_llama, batch 4, 16 + 4 tokens, small layer")
    add_machine_args(parser, "serving", DTYPES)
    args = parser.parse_args(argv)
    gpu = torch.device(args.device).type == "cuda"
    if args.quick:
        args.model, args.adapters, args.batch, args.prefill, args.decode = "tiny_llama", [1, 2, 4], 4, 16, 4
        args.layer_adapters, args.layer_d, args.repeats = [1, 10, 100], 64, 2
    args.layer_d = args.layer_d or (4096 if gpu else 1024)
    for name in ("batch", "prefill", "decode", "rounds", "repeats", "layer_d", "layer_columns"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.adapters) < 1 or max(args.adapters) > args.batch:
        parser.error(f"--adapters must lie in [1, --batch={args.batch}] (one row or more each), got {args.adapters}")
    if min(args.layer_adapters) < 1 or args.layer_columns > args.layer_d:
        parser.error("--layer-adapters must be >= 1 and --layer-columns <= --layer-d")
    if not 0 < args.budget < 1:
        parser.error(f"--budget is a fraction of the model's parameters in (0, 1), got {args.budget}")
    if args.out is None:
        args.out = Path(__file__).resolve().parents[2] / "results" / f"serving_{'gpu' if gpu else 'cpu'}"
    return args


def check_targets(decode: list[dict]) -> list[dict]:
    """S2FT's mixed-batch decode against the base model's step time and PEFT LoRA's mixed-batch throughput."""
    measured = [row for row in decode if row["adapters"] <= TARGETS["adapters"]]
    row = max(measured or decode, key=lambda r: r["adapters"])
    base_ratio = row["base_tok_s"] / row["s2ft_tok_s"]  # S2FT's step time over the base model's
    speedup = row["s2ft_tok_s"] / row["peft_lora_tok_s"]
    adapters = f"{row['adapters']} adapters"
    return [
        target(f"S2FT mixed decode step / base step, {adapters}", base_ratio, "<=", TARGETS["base_step_ratio"]),
        target(f"S2FT mixed / PEFT LoRA mixed decode throughput, {adapters}", speedup, ">=", TARGETS["peft_speedup"]),
    ]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    machine = start_benchmark(args)
    dtype = DTYPES[args.dtype]
    base = build_bench_model(args.model, args.dtype, args.device).eval().requires_grad_(False)
    targets = tuple(args.lora_targets)
    rank = rank_for_budget(base, args.budget, list(targets))
    target_params = lora_param_count(base, rank, list(targets))
    decode, prefill, differences = bench_serving(
        base,
        args.adapters,
        args.batch,
        args.prefill,
        args.decode,
        target_params,
        rank,
        targets,
        args.rounds,
        args.device,
        args.seed,
    )
    del base
    layer = []
    for n in args.layer_adapters:
        layer.append(bench_layer_adapters(n, args.layer_d, args.layer_columns, args.repeats, args.device, dtype))
        print(f"layer, {n} adapters: S2FT {layer[-1]['s2ft_bmm_ms']:.3f} ms, LoRA {layer[-1]['lora_bmm_ms']:.3f} ms")
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    config |= {"lora_rank": rank, "budget_params": target_params}
    results = {
        "machine": machine,
        "config": config,
        "decode": decode,
        "prefill": prefill,
        "max_abs_logit_diff": differences,
        "layer": layer,
        "targets": check_targets(decode),
    }
    write_results(results, args.out, serving_table, serving_chart)
    return results


if __name__ == "__main__":
    main()
