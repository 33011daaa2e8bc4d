"""Training-step time and peak memory of S2FT against LoRA, DoRA, full fine-tuning, SpFT and the frozen floor.

Every method trains on the same random token batches with a matched trainable budget (the LoRA rank nearest to
`--budget`; S2FT and SpFT get exactly that LoRA's parameter count), each in its own fresh process. The methods run in
interleaved rounds (every method once per round), so that a slow spell of a shared machine spreads over all methods
instead of inflating one. Writes `results.json`, `results.md` and `results.png` to the output directory.

    python -m experiments.bench.training                        # SmolLM2-135M, fp32, batch 4, seq 256, CPU
    python -m experiments.bench.training --quick --out /tmp/b   # tiny model, 2 steps (tests)
    python -m experiments.bench.training --model llama2_7b_shape --dtype bfloat16 \
        --batch-sizes 1 2 --seq-lens 512 1024 --device cuda     # the paper's settings on a GPU
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from experiments.bench.machine import add_machine_args, start_benchmark
from experiments.bench.models import DTYPES, MODELS
from experiments.bench.results import training_chart, training_table, write_results
from experiments.bench.targets import target
from experiments.bench.train_worker import METHODS, measure
from s2ft.methods.peft_lora import DEFAULTS as LORA_DEFAULTS

ROOT = Path(__file__).resolve().parents[2]
# Timing and `peak_mem_mb` (the peak resident set a user sees) run with glibc's default allocator. A second, short run
# per method fixes glibc's mmap threshold at 128 KiB, so tensors of that size and more get their own mappings and go
# back to the OS when freed: its peak (`live_mem_mb`) follows the live tensors rather than heap fragmentation, which
# moved the default peak by up to hundreds of MB between methods holding the same tensors. That setting makes every
# large allocation a fresh mapping, which costs seconds of page faults per step, so it is never used for timing.
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
# (metric, other method, op, limit): S2FT's value over the other method's, held to the limit by op (issue 7, CPU).
TARGETS = (
    ("step_s", "full", "<=", 0.55),
    ("step_s", "lora", "<=", 0.90),
    ("step_s", "floor", "<=", 1.10),
    ("peak_mem_mb", "full", "<=", 0.70),
    ("peak_mem_mb", "lora", "<=", 0.85),
)
METRIC_NAMES = {"step_s": "step time", "peak_mem_mb": "peak memory"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2_135m", choices=MODELS)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--budget", type=float, default=0.01, help="trainable fraction (< 1) or count of parameters")
    parser.add_argument("--lora-targets", nargs="+", default=list(LORA_DEFAULTS["target_modules"]))
    parser.add_argument(
        "--lora-dropout",
        type=float,
        default=0.05,
        help="LoRA/DoRA dropout: 0.05 as the study configs train them (conf/method/lora.yaml); 0 drops its cost",
    )
    parser.add_argument("--s2ft-layout", default="gather", choices=("gather", "permuted"))
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds; the median of all timed steps of all rounds counts"
    )
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--quick", action="store_true", help="tiny_llama, batch 2, seq 32, 2 rounds of 1 warm-up + 2 timed steps"
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure every method in this process: fast, but a method's peak memory can hide in allocator caches "
        "left by the one before (for tests, not for results)",
    )
    add_machine_args(parser, "training", DTYPES)
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.batch_sizes, args.seq_lens = "tiny_llama", [2], [32]
        args.warmup, args.steps, args.rounds = 1, 2, 2
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error(
            f"--steps and --rounds must be >= 1 and --warmup >= 0 (got {args.steps}, {args.rounds}, {args.warmup})"
        )
    if min(args.batch_sizes + args.seq_lens) < 1:
        parser.error("--batch-sizes and --seq-lens must be positive")
    if not 0 <= args.lora_dropout < 1:
        parser.error(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.budget <= 0:
        parser.error(f"--budget must be positive, got {args.budget}")
    if args.out is None:
        kind = "gpu" if torch.device(args.device).type == "cuda" else "cpu"
        args.out = ROOT / "results" / f"training_{kind}"
    return args


def run_worker(spec: dict, env: dict[str, str] | None = None) -> dict:
    """Measures one method in a fresh Python process; a failure names the method and shows the worker's error."""
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench.train_worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=os.environ | (env or {}),
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"benchmark of method {spec['method']!r} (batch {spec['batch_size']}, seq {spec['seq_len']}) failed:\n"
            f"{proc.stderr[-4000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_method(spec: dict, in_process: bool) -> dict:
    """Step time and peak memory of one method in one round (a fresh process unless `in_process`)."""
    return measure(spec) if in_process else run_worker(spec)


def merge_rounds(rounds: list[dict]) -> dict:
    """One method's result over its rounds: every timed step counts; the peak is the highest of the rounds."""
    merged = dict(rounds[0])
    merged["step_s_all"] = [t for r in rounds for t in r["step_s_all"]]
    merged["phase_s"] = {k: [t for r in rounds for t in r["phase_s"][k]] for k in rounds[0]["phase_s"]}
    merged["step_s"] = statistics.median(merged["step_s_all"])
    merged["round_step_s"] = [r["step_s"] for r in rounds]
    merged["peak_mem_mb"] = max(r["peak_mem_mb"] for r in rounds)
    merged["final_loss"] = rounds[-1]["final_loss"]
    return merged


def add_ratios(methods: dict[str, dict]) -> None:
    """Adds each method's step-time and memory ratios to full fine-tuning (when full was measured)."""
    if "full" not in methods:
        return
    full = methods["full"]
    for result in methods.values():
        result["step_ratio_full"] = result["step_s"] / full["step_s"]
        result["mem_ratio_full"] = result["peak_mem_mb"] / full["peak_mem_mb"]


def check_targets(methods: dict[str, dict]) -> list[dict]:
    """S2FT's ratios against the targets whose methods were measured."""
    if "s2ft" not in methods:
        return []
    return [
        target(f"{METRIC_NAMES[metric]} / {other}", methods["s2ft"][metric] / methods[other][metric], op, limit)
        for metric, other, op, limit in TARGETS
        if other in methods
    ]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    machine = start_benchmark(args)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings = []
    for batch_size in args.batch_sizes:
        for seq_len in args.seq_lens:
            specs = {
                method: {
                    "model": args.model,
                    "dtype": args.dtype,
                    "device": args.device,
                    "method": method,
                    "batch_size": batch_size,
                    "seq_len": seq_len,
                    "warmup": args.warmup,
                    "steps": args.steps,
                    "seed": args.seed,
                    "budget": args.budget,
                    "targets": args.lora_targets,
                    "lora_dropout": args.lora_dropout,
                    "layout": args.s2ft_layout,
                    "lr": args.lr,
                    "threads": args.threads,
                }
                for method in args.methods
            }
            rounds = {method: [] for method in args.methods}
            for round_index in range(args.rounds):
                for method, spec in specs.items():
                    rounds[method].append(result := measure_method(spec, args.in_process))
                    print(
                        f"b={batch_size} s={seq_len} round {round_index + 1}/{args.rounds} {method:>5}: "
                        f"{result['step_s']:.3f} s/step, {result['peak_mem_mb']:.0f} MB",
                        flush=True,
                    )
            methods = {method: merge_rounds(results) for method, results in rounds.items()}
            if args.device == "cpu" and not args.in_process:
                for method, spec in specs.items():
                    live = run_worker(spec | {"warmup": 1, "steps": 1}, LIVE_MEMORY_ENV)
                    methods[method]["live_mem_mb"] = live["peak_mem_mb"]
            add_ratios(methods)
            settings.append(
                {"batch_size": batch_size, "seq_len": seq_len, "methods": methods, "targets": check_targets(methods)}
            )
    first = next(iter(settings[0]["methods"].values()))
    config.update(
        total_params=first["total_params"],
        lora_rank=first["lora_rank"],
        target_params=first["target_params"],
        optimizer="torch.optim.AdamW (default betas, eps, weight decay)",
    )
    # "methods" and "targets" repeat the first setting: the layout issue 7 fixes for a single batch shape.
    results = {
        "machine": machine,
        "config": config,
        "methods": settings[0]["methods"],
        "targets": settings[0]["targets"],
        "settings": settings,
    }
    write_results(results, args.out, training_table, training_chart)
    return results


if __name__ == "__main__":
    main()
