"""Micro-benchmark: S2FT training step time with index-gathered units vs co-permuted contiguous blocks.

Builds a random Llama with SmolLM2-135M's layer shapes (hidden 576, 9 query / 3 KV heads of dim 64, intermediate
1536; fewer layers and a smaller vocabulary by default so the decoder layers dominate), applies the same selection
with ``layout="gather"`` and ``layout="permuted"`` and times forward + backward + AdamW steps, alternating the
layouts step by step so that load from other processes hits both alike. Reports the median (and min) step time per
layout. Run from the repository root:

    python -m experiments.bench.layout --layers 4 --batch 4 --seq 256 --steps 8   # -> results/layout_cpu
    python -m experiments.bench.layout --quick --out /tmp/l                        # 1 layer, a few steps (tests)

Writes `results.json`, `results.md` and `results.png` to `--out` (a directory, as for the other benchmarks).
"""

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import s2ft
from experiments.bench.machine import machine_info
from experiments.bench.models import SHAPES
from experiments.bench.results import layout_chart, layout_table, write_results

BUDGETS = {
    "o+down": {"o": 0.12, "down": 0.02},
    "all": {"q": 0.12, "k": 0.34, "v": 0.34, "o": 0.12, "gate": 0.02, "up": 0.02, "down": 0.02},
}


def smollm2_shaped(layers: int, vocab: int) -> LlamaForCausalLM:
    """A random Llama with SmolLM2-135M's layer shapes."""
    torch.manual_seed(0)
    fields = SHAPES["smollm2_135m_shape"] | {"num_hidden_layers": layers, "vocab_size": vocab}
    config = LlamaConfig(**fields, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def timed_step(model, optimizer, batch) -> float:
    start = time.perf_counter()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def run(args) -> dict:
    base = smollm2_shaped(args.layers, args.vocab)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": input_ids, "labels": input_ids}
    results = {}
    for budget, ratios in BUDGETS.items():
        cfg = s2ft.S2FTConfig(ratios=ratios, seed=0)
        setups = {}
        for layout in ("gather", "permuted"):
            model = s2ft.apply_s2ft(copy.deepcopy(base), cfg, layout=layout).train()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
            timed_step(model, optimizer, batch)  # warm-up
            setups[layout] = (model, optimizer, [])
        for _ in range(args.steps):
            for model, optimizer, times in setups.values():
                times.append(timed_step(model, optimizer, batch))
        trainable = s2ft.trainable_parameter_count(setups["gather"][0])
        row = {"ratios": ratios, "trainable_params": trainable}
        for layout, (_, _, times) in setups.items():
            row[layout] = {"median_s": statistics.median(times), "min_s": min(times)}
        row["permuted_over_gather"] = row["permuted"]["median_s"] / row["gather"]["median_s"]
        results[budget] = row
        timings = "  ".join(
            f"{layout} median {row[layout]['median_s']:.3f} s (min {row[layout]['min_s']:.3f})" for layout in setups
        )
        print(f"{budget:7s} trainable {trainable:>9,d}  {timings}  permuted/gather {row['permuted_over_gather']:.3f}")
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per layout (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="1 layer, vocabulary 512, batch 1, sequence 32, 2 steps")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default results/layout_cpu)")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.vocab, args.batch, args.seq, args.steps = 1, 512, 1, 32, 2
    for name in ("layers", "vocab", "batch", "seq", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.out is None:
        args.out = Path(__file__).resolve().parents[2] / "results" / "layout_cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info("cpu")
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results = {"machine": machine, "config": config, "budgets": run(args)}
    write_results(results, args.out, layout_table, layout_chart)
    return results


if __name__ == "__main__":
    main()
