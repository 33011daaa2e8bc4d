"""The run's `summary.json` (schema in README.md): built from a run, flattened into the metrics the experiment logger
gets, read back from those metrics (W&B), with its provenance fields and the console table."""

from __future__ import annotations

import json
import subprocess
from importlib import metadata
from pathlib import Path

from rich.console import Console
from rich.table import Table

from s2ft.adapter_format import atomic_write
from s2ft.evaluation.mtbench import mtbench_metrics

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


def code_record(cfg: dict) -> dict:
    """The code a session runs: the checkout's commit (`git_commit`) and the package versions (`package_versions`)."""
    return {"git_commit": git_commit(Path(cfg["paths"]["root"])), "versions": package_versions()}


def build_summary(cfg: dict, counts: dict, train: dict | None, evaluation: dict | None, **extra) -> dict:
    """Assemble `summary.json` from the config, the trainable counts, training stats and evaluation results.

    Args:
        cfg: The resolved config.
        counts: `{"trainable_params", "total_params", "trainable_pct"}` (`s2ft.methods.trainable_summary`).
        train: `{"steps", "tokens", "wall_s", "median_tokens_per_s", "peak_mem_mb", "final_loss", "loss_curve"}`
            (and `val_loss`, `val_curve` with a validation split, `best_val_loss` with checkpoint selection), None
            for eval-only runs.
        evaluation: The result of `s2ft.evaluation.evaluate`, None when no task was evaluated.
        **extra: Further top-level fields (`eval_before`, `heldout`, `measure_wall_s`, `wandb`, `ddp`, ...).
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


TASK_KEYS = ("accuracy", "n", "mode", "tokens_per_s", "wall_s", "accuracy_mean", "accuracy_sum", "primary")


def task_record(result: dict) -> dict:
    """The per-task fields a summary keeps: accuracy, size, mode, throughput, time and, for loglik, both scorings."""
    return {key: result[key] for key in TASK_KEYS if key in result}


def flat_metrics(summary: dict) -> dict[str, float]:
    """The final results logged to the experiment logger (what `wandb_summaries` reads back)."""
    metrics = {f"eval/{task}/accuracy": r["accuracy"] for task, r in summary["eval"].items()}
    if summary.get("avg_accuracy") is not None:
        metrics["eval/avg_accuracy"] = summary["avg_accuracy"]
    metrics |= {f"groups/{group}": acc for group, acc in (summary.get("groups") or {}).items()}
    metrics |= {f"heldout/{name}": v["after"] for name, v in summary.get("heldout", {}).items()}
    metrics |= mtbench_metrics(summary.get("mtbench"))
    train = summary.get("train") or {}
    metrics |= {
        f"train/{key}": train[key]
        for key in ("wall_s", "val_loss", "median_tokens_per_s")
        if train.get(key) is not None
    }
    return metrics


def summary_from_metrics(config: dict, metrics: dict, history: list[dict], run_id: str) -> dict:
    """A summary rebuilt from what a run logged to W&B: the inverse of `flat_metrics` for what the report reads.

    Args:
        config: The run's resolved config (W&B's run config).
        metrics: Its final logged metrics: `flat_metrics` and the module's `trainable_params`, `trainable_pct` and
            `train/peak_mem_mb` (`_runtime`, W&B's wall time, stands in for `train/wall_s` where it is missing).
        history: Logged rows with `train/loss` against `trainer/global_step` (Lightning's step; W&B's `_step`
            counts log calls).
        run_id: The W&B run id.
    """
    tasks = {k.split("/")[1]: v for k, v in metrics.items() if k.startswith("eval/") and k.endswith("/accuracy")}
    return {
        "experiment": config["name"],
        "method": config["method"]["name"],
        "model": config["model"]["name"],
        "seed": config.get("seed"),
        "trainable_params": metrics.get("trainable_params"),
        "trainable_pct": metrics.get("trainable_pct"),
        "eval": {task: {"accuracy": acc, "n": None, "mode": None} for task, acc in tasks.items()},
        "avg_accuracy": metrics.get("eval/avg_accuracy"),
        "groups": {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("groups/")},
        "heldout": {k.split("/", 1)[1]: {"after": v} for k, v in metrics.items() if k.startswith("heldout/")},
        "train": {
            "wall_s": metrics.get("train/wall_s", metrics.get("_runtime")),
            "val_loss": metrics.get("train/val_loss"),
            "peak_mem_mb": metrics.get("train/peak_mem_mb"),
            "median_tokens_per_s": metrics.get("train/median_tokens_per_s"),
            "loss_curve": [
                [int(row["trainer/global_step"]), row["train/loss"]]
                for row in history
                if row.get("train/loss") is not None and row.get("trainer/global_step") is not None
            ],
        },
        "wandb": {"id": run_id, "dir": None},
    }


def wandb_summaries(project: str) -> list[tuple[dict, dict]]:
    """(summary, config) of every s2ft run of the W&B project ``ENTITY/PROJECT`` (needs a network and a login)."""
    import wandb  # only reading W&B pays for importing it

    found = []
    for remote in wandb.Api().runs(project):
        config, metrics = dict(remote.config), dict(remote.summary)
        if "method" not in config or "name" not in config:
            continue  # not an s2ft run
        history = remote.history(keys=["train/loss", "trainer/global_step"], pandas=False)
        found.append((summary_from_metrics(config, metrics, history, remote.id), config))
    return found


def write_json(data: dict, path: Path) -> None:
    """Write JSON atomically (temp file + rename), so readers never see half a summary."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


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
