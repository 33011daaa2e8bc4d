"""The run's `summary.json` (schema in README.md), its provenance fields, and the console table."""

from __future__ import annotations

import json
import os
import subprocess
from importlib import metadata
from pathlib import Path

from rich.console import Console
from rich.table import Table

PACKAGES = ("s2ft", "torch", "transformers", "lightning", "peft", "datasets", "hydra-core", "wandb", "lm_eval")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a result depends on (None when absent)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(root: Path) -> str | None:
    """The checked-out commit of `root`, with "-dirty" when tracked files changed; None outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=root, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty.stdout.strip() else "")


def build_summary(cfg: dict, counts: dict, train: dict | None, evaluation: dict | None, **extra) -> dict:
    """Assemble `summary.json` from the config, the trainable counts, training stats and evaluation results.

    Args:
        cfg: The resolved config.
        counts: `{"trainable_params", "total_params", "trainable_pct"}` (`s2ft.methods.trainable_summary`).
        train: `{"steps", "tokens", "wall_s", "median_tokens_per_s", "peak_mem_mb", "final_loss", "loss_curve"}`
            (and `val_loss`, `val_curve` with a validation split, `best_val_loss` with checkpoint selection), None
            for eval-only runs.
        evaluation: The result of `s2ft.evaluation.evaluate`, None when no task was evaluated.
        **extra: Further top-level fields (`eval_before`, `heldout`, `wandb`, `ddp`, ...).
    """
    options = cfg["method"].get("options") or {}
    tasks = (evaluation or {}).get("tasks", {})
    summary = {
        "experiment": cfg["name"],
        "method": cfg["method"]["name"],
        "model": cfg["model"]["name"],
        "strategy": options.get("strategy"),
        "order": options.get("order"),
        "ratios": options.get("ratios"),
        "seed": cfg["seed"],
        "template": cfg["data"].get("template", "alpaca"),
        **counts,
        "train": train,
        "eval": {name: task_record(r) for name, r in tasks.items()},
        "avg_accuracy": (evaluation or {}).get("avg_accuracy"),
        "groups": (evaluation or {}).get("groups", {}),
        "git_commit": git_commit(Path(cfg["paths"]["root"])),
        "versions": package_versions(),
        "wandb": None,
    }
    summary.update(extra)
    return summary


TASK_KEYS = ("accuracy", "n", "mode", "tokens_per_s", "accuracy_mean", "accuracy_sum", "primary")


def task_record(result: dict) -> dict:
    """The per-task fields a summary keeps: accuracy, size, mode, throughput and, for loglik, both scorings."""
    return {key: result[key] for key in TASK_KEYS if key in result}


def write_json(data: dict, path: Path) -> None:
    """Write JSON atomically (temp file + rename), so readers never see half a summary."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def print_summary(summary: dict, run_dir: Path) -> None:
    """The last screen of a run: a short rich table (training loss first -> last step, accuracy per task and held-out
    loss, before -> after), then where the outputs are (the run directory, the `wandb sync` command of offline W&B)."""
    table = Table(title=f"{summary['experiment']}: {summary['method']} on {summary['model']}")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    curve = (summary.get("train") or {}).get("loss_curve") or []
    if curve:
        table.add_row(f"train loss ({curve[-1][0]} steps)", f"{curve[0][1]:.4f}", f"{curve[-1][1]:.4f}")
    before = summary.get("eval_before") or {}
    for task, result in summary["eval"].items():
        prior = before.get(task, {}).get("accuracy")
        table.add_row(f"{task} accuracy", "-" if prior is None else f"{prior:.1%}", f"{result['accuracy']:.1%}")
    if summary.get("avg_accuracy") is not None:
        prior = summary.get("avg_accuracy_before")
        table.add_row("average accuracy", "-" if prior is None else f"{prior:.1%}", f"{summary['avg_accuracy']:.1%}")
    for name, losses in (summary.get("heldout") or {}).items():
        fmt = lambda v: "-" if v is None else f"{v:.4f}"
        table.add_row(f"{name} held-out loss", fmt(losses.get("before")), fmt(losses.get("after")))
    if summary.get("mtbench"):
        mtbench, prior = summary["mtbench"], (summary.get("mtbench_before") or {}).get("score")
        rating = lambda v: "-" if v is None else f"{v:.2f}"
        table.add_row(f"MT-Bench-style score ({mtbench['n_rated']} rated)", rating(prior), rating(mtbench["score"]))
    console = Console()
    console.print(table)
    console.print(f"outputs: {run_dir}", highlight=False, soft_wrap=True)
    wandb_dir = Path((summary.get("wandb") or {}).get("dir") or "").parent  # the run folder holds files/
    if wandb_dir.name.startswith("offline-run-"):
        console.print(f"W&B run saved offline; upload it with: wandb sync {wandb_dir}", highlight=False, soft_wrap=True)
