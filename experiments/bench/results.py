"""Markdown tables and matplotlib charts of the benchmark results (`results.md`, `results.png`), and the files.

A machine without matplotlib (the lent GPU machine) writes `results.json` and `results.md`; `python -m
experiments.bench.redraw DIR...` draws the charts afterwards.
"""

import json
import statistics
from collections.abc import Callable
from pathlib import Path

from experiments.bench.targets import targets_line


def _pyplot():
    """matplotlib's pyplot on the file-only backend, imported when a chart is drawn: matplotlib is optional here, as
    the GPU machine may lack it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _machine_line(machine: dict) -> str:
    line = f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}"
    if machine.get("gpu"):
        line += f", GPU {machine['gpu']}"
    if machine.get("note"):
        line += f" ({machine['note']})"
    return line + "."


def _ratio(result: dict, key: str) -> str:
    return f"{result[key]:.2f}×" if key in result else "n/a"


def training_table(results: dict) -> str:
    """Per batch shape: trained parameters, median step time and peak memory of each method, with ratios to full."""
    config = results["config"]
    total = config["total_params"]
    parts = [
        f"### Training step: {config['model']}, {config['dtype']}, {config['device']}\n",
        _machine_line(results["machine"])
        + f" LoRA rank {config['lora_rank']} (dropout {config.get('lora_dropout', 0.0)})"
        + f" on {', '.join(config['lora_targets'])};"
        f" S2FT/SpFT budget {config['target_params']:,} parameters ({100 * config['target_params'] / total:.2f}%"
        f" of {total:,}); median of {config.get('rounds', 1)} interleaved rounds x {config['steps']} steps, each round"
        f" in a fresh process after {config['warmup']} warm-up step(s).\n",
    ]
    for setting in results["settings"]:
        rows = [
            [
                method,
                f"{r['trainable_params']:,}",
                f"{100 * r['trainable_params'] / total:.2f}%",
                f"{r['step_s']:.3f}",
                _spread(r),
                _ratio(r, "step_ratio_full"),
                _phases(r),
                f"{r['peak_mem_mb']:.0f}",
                _ratio(r, "mem_ratio_full"),
                f"{r['live_mem_mb']:.0f}" if "live_mem_mb" in r else "-",
            ]
            for method, r in setting["methods"].items()
        ]
        headers = ["method", "trained params", "% of all", "step (s)", "rounds (s)", "× full", "fwd / bwd / opt (s)"]
        headers += ["peak mem above model (MB)", "× full"]
        headers.append("live-tensor peak (MB)")
        parts.append(f"\nBatch {setting['batch_size']}, sequence {setting['seq_len']}:\n\n")
        parts.append(markdown_table(headers, rows))
        parts.append(targets_line(setting["targets"]))
    return "".join(parts)


def _spread(result: dict) -> str:
    """Lowest and highest of the per-round median step times."""
    rounds = result.get("round_step_s")
    return f"{min(rounds):.2f}-{max(rounds):.2f}" if rounds and len(rounds) > 1 else "-"


def _phases(result: dict) -> str:
    """Median seconds of the forward, backward and optimizer phases of a step."""
    if "phase_s" not in result:
        return "-"
    return " / ".join(
        f"{statistics.median(result['phase_s'][name]):.2f}" for name in ("forward", "backward", "optimizer")
    )


def training_chart(results: dict, path: Path) -> None:
    """Bar charts of step time and peak memory per method, one row per batch shape, bars labelled with × full."""
    plt = _pyplot()
    settings = results["settings"]
    fig, axes = plt.subplots(len(settings), 2, figsize=(11, 3.6 * len(settings)), squeeze=False)
    for row, setting in zip(axes, settings, strict=True):
        methods = setting["methods"]
        names = list(methods)
        for ax, key, ratio_key, label in (
            (row[0], "step_s", "step_ratio_full", "step time (s)"),
            (row[1], "peak_mem_mb", "mem_ratio_full", "peak memory above model (MB)"),
        ):
            colors = ["tab:red" if name == "s2ft" else "tab:gray" for name in names]
            bars = ax.bar(names, [methods[n][key] for n in names], color=colors)
            if "full" in methods:
                ax.bar_label(bars, labels=[f"{methods[n][ratio_key]:.2f}×" for n in names], fontsize=8)
            ax.set_ylabel(label)
            ax.set_title(f"batch {setting['batch_size']}, seq {setting['seq_len']}", fontsize=10)
    config = results["config"]
    fig.suptitle(f"Training step, {config['model']} ({config['dtype']}, {config['device']}); labels: × full FT")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def switch_table(results: dict) -> str:
    """The per-layer and whole-model switch times of S2FT and LoRA with LoRA / S2FT speedups and the targets."""
    config, model = results["config"], results["model"]
    rows = [[r["d"], f"{r['s2ft_ms']:.3f}", f"{r['lora_ms']:.3f}", f"{r['speedup']:.1f}×"] for r in results["layer"]]
    parts = [
        f"### Adapter switching ({config['dtype']}, {config['device']})\n",
        _machine_line(results["machine"]) + f" Median of {config['repeats']} switches, each run checked.\n",
        f"\nOne d × d layer: S2FT {config['rows']} rows against LoRA rank {config['rank']}:\n\n",
        markdown_table(["d", "S2FT (ms)", "LoRA (ms)", "speedup"], rows),
        f"\nWhole model {model['name']}: `s2ft.switch_adapter` against PEFT LoRA rank {model['lora_rank']}"
        f" (unmerge, set_adapter, merge), {model['budget_params']:,} parameters per adapter:\n\n",
        markdown_table(
            ["S2FT (ms)", "LoRA (ms)", "speedup"],
            [[f"{model['s2ft_ms']:.2f}", f"{model['lora_ms']:.2f}", f"{model['speedup']:.1f}×"]],
        ),
    ]
    if "s2ft_checked_ms" in model:
        parts.append(
            f"\nS2FT switches between adapters prepared once (`s2ft.prepare_adapter`); to an adapter validated on "
            f"every call: {model['s2ft_checked_ms']:.2f} ms.\n"
        )
    if "s2ft_floor_ms" in model:
        parts.append(
            f"\nThe floor, the slot writes alone on a plain copy of the model (the old slots back to the base, the new "
            f"values in): {model['s2ft_floor_ms']:.2f} ms, so the switch costs "
            f"{model['s2ft_ms'] / model['s2ft_floor_ms']:.2f}× its copies. Between two adapters of the same selection "
            f"(the same strategy and seed trained on other data) only the new values are written: "
            f"{model['s2ft_same_selection_ms']:.2f} ms, {model['same_selection_speedup']:.1f}× faster than LoRA's "
            "switch.\n"
        )
    parts.append(targets_line(results["targets"]))
    return "".join(parts)


def switch_chart(results: dict, path: Path) -> None:
    """Left: switch time against d for one layer (log-log). Right: whole-model switch time, S2FT and LoRA."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    dims = [r["d"] for r in results["layer"]]
    for key, label, color in (("s2ft_ms", "S2FT", "tab:red"), ("lora_ms", "LoRA", "tab:gray")):
        left.plot(dims, [r[key] for r in results["layer"]], "o-", label=label, color=color)
    left.set(xscale="log", yscale="log", xlabel="d (layer is d × d)", ylabel="switch time (ms)", title="one layer")
    left.set_xticks(dims, [str(d) for d in dims])
    left.xaxis.set_minor_locator(plt.NullLocator())
    left.legend()
    model = results["model"]
    bars = right.bar(["S2FT", "LoRA"], [model["s2ft_ms"], model["lora_ms"]], color=["tab:red", "tab:gray"])
    right.bar_label(bars, fmt="%.2f ms", fontsize=8)
    right.set(ylabel="switch time (ms)", title=f"whole model {model['name']} ({model['speedup']:.1f}× faster)")
    config = results["config"]
    fig.suptitle(f"Adapter switching ({config['dtype']}, {config['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SERVING_METHODS = (
    ("base", "base model (floor)", "black"),
    ("s2ft", "S2FT mixed", "tab:red"),
    ("peft_lora", "PEFT LoRA mixed", "tab:gray"),
    ("s2ft_as_lora", "S2FT as LoRA (PEFT)", "tab:orange"),
    ("switching", "S2FT switching", "tab:blue"),
)


def serving_table(results: dict) -> str:
    """Decode and prefill throughput per number of adapters in the batch, the layer micro-benchmark, the targets."""
    config = results["config"]
    headers = ["adapters"] + [label for _, label, _ in SERVING_METHODS]
    parts = [
        f"### Serving many adapters ({config['model']}, {config['dtype']}, {config['device']})\n",
        _machine_line(results["machine"])
        + f" Batch {config['batch']}, {config['prefill']} prompt tokens, {config['decode']} greedy decode steps;"
        f" {config['budget_params']:,} trainable parameters per adapter (LoRA rank {config['lora_rank']}).\n",
    ]
    for phase, unit in (("decode", "generated tokens/s"), ("prefill", "prompt tokens/s")):
        rows = [[r["adapters"]] + [f"{r[f'{key}_tok_s']:.0f}" for key, _, _ in SERVING_METHODS] for r in results[phase]]
        parts += [f"\n{phase.capitalize()} ({unit}):\n\n", markdown_table(headers, rows)]
    differences = results["max_abs_logit_diff"]
    export = ", ".join(f"{k}: {v['s2ft_vs_export']:.1e}" for k, v in differences.items())
    moved = ", ".join(f"{k}: {v['s2ft_vs_base']:.1e}" for k, v in differences.items())
    parts.append(
        f"\nLargest prefill-logit difference of S2FT's mixed batch from its LoRA export, by adapters: {export} "
        f"(from the base model: {moved}).\n"
    )
    layer_rows = [
        [
            r["adapters"],
            *(f"{r[f'{v}_ms']:.3f}" for v in ("base", "s2ft_bmm", "lora_bmm", "s2ft_loop", "lora_loop")),
            f"{r['lora_over_s2ft_bmm']:.2f}×",
        ]
        for r in results["layer"]
    ]
    parts += [
        f"\nOne {config['layer_d']} × {config['layer_d']} layer, one token per request, each request its own adapter"
        f" (S2FT {config['layer_columns']} columns, LoRA rank {max(1, config['layer_columns'] // 2)}), ms:\n\n",
        markdown_table(
            ["adapters", "base", "S2FT bmm", "LoRA bmm", "S2FT loop", "LoRA loop", "LoRA / S2FT (bmm)"], layer_rows
        ),
    ]
    parts.append(targets_line(results["targets"]))
    return "".join(parts)


def serving_chart(results: dict, path: Path) -> None:
    """Left: decode throughput against adapters in the batch. Middle: prefill. Right: the layer benchmark (log-log)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, phase in zip(axes[:2], ("decode", "prefill"), strict=True):
        counts = [r["adapters"] for r in results[phase]]
        for key, label, color in SERVING_METHODS:
            ax.plot(counts, [r[f"{key}_tok_s"] for r in results[phase]], "o-", label=label, color=color)
        ax.set(xscale="log", xlabel="distinct adapters in the batch", ylabel="tokens/s", title=phase)
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    counts = [r["adapters"] for r in results["layer"]]
    for key, label, color in (
        ("base_ms", "base", "black"),
        ("s2ft_bmm_ms", "S2FT (bmm)", "tab:red"),
        ("lora_bmm_ms", "LoRA (bmm)", "tab:gray"),
        ("s2ft_loop_ms", "S2FT (loop)", "salmon"),
        ("lora_loop_ms", "LoRA (loop)", "silver"),
    ):
        axes[2].plot(counts, [r[key] for r in results["layer"]], "o-", label=label, color=color)
    axes[2].set(xscale="log", yscale="log", xlabel="adapters (one request each)", ylabel="ms", title="one layer")
    axes[2].legend(fontsize=8)
    config = results["config"]
    fig.suptitle(f"Serving many adapters ({config['model']}, {config['dtype']}, {config['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


LAYOUTS = (
    ("gather", "gather (index-gathered units)", "tab:red"),
    ("permuted", "permuted (co-permuted blocks)", "tab:gray"),
)


def layout_table(results: dict) -> str:
    """Per budget: S2FT's trained parameters and the median and min step time of each layout, permuted / gather."""
    config = results["config"]
    headers = ["budget", "ratios", "trained params"]
    headers += [f"{layout} {stat} (s)" for layout, _, _ in LAYOUTS for stat in ("median", "min")]
    rows = [
        [
            budget,
            ", ".join(f"{unit} {ratio:g}" for unit, ratio in row["ratios"].items()),
            f"{row['trainable_params']:,}",
            *(f"{row[layout][key]:.3f}" for layout, _, _ in LAYOUTS for key in ("median_s", "min_s")),
            f"{row['permuted_over_gather']:.2f}×",
        ]
        for budget, row in results["budgets"].items()
    ]
    return "".join(
        [
            "### S2FT training step: index-gathered units (gather) against co-permuted blocks (permuted)\n",
            _machine_line(results["machine"])
            + f" A random Llama of SmolLM2-135M's layer shapes, {config['layers']} decoder layer(s), vocabulary"
            f" {config['vocab']:,}; batch {config['batch']}, sequence {config['seq']}; forward + backward + AdamW,"
            f" median and min of {config['steps']} steps per layout after one warm-up step, the layouts alternating"
            " step by step.\n\n",
            markdown_table(headers + ["permuted / gather (median)"], rows),
        ]
    )


def layout_chart(results: dict, path: Path) -> None:
    """Median step time of each layout per budget (bars; the min as a dot), labelled with the median."""
    plt = _pyplot()
    budgets = results["budgets"]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(LAYOUTS)
    for i, (layout, label, color) in enumerate(LAYOUTS):
        positions = [b + (i - (len(LAYOUTS) - 1) / 2) * width for b in range(len(budgets))]
        bars = ax.bar(positions, [row[layout]["median_s"] for row in budgets.values()], width, label=label, color=color)
        ax.bar_label(bars, fmt="%.3f s", fontsize=8)
        ax.plot(positions, [row[layout]["min_s"] for row in budgets.values()], "k.")
    ax.set_xticks(range(len(budgets)), list(budgets))
    ax.set(xlabel="S2FT budget", ylabel="step time (s; dot: min)")
    ax.legend(fontsize=8)
    config = results["config"]
    fig.suptitle(
        f"S2FT layouts, SmolLM2-135M shapes ({config['layers']} layer(s), batch {config['batch']} x {config['seq']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(results: dict, out: Path, table: Callable[[dict], str], chart: Callable[[dict, Path], None]) -> None:
    """Writes a benchmark's ``results.json``, its markdown table ``results.md`` and its chart ``results.png``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(table(results))
    try:
        chart(results, out / "results.png")
    except ImportError as error:
        print(
            f"wrote {out}/results.{{json,md}}; no chart ({error}): `python -m experiments.bench.redraw {out}` draws it"
        )
        return
    print(f"wrote {out}/results.{{json,md,png}}")
