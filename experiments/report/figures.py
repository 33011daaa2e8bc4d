"""Figures of a study (PNG, matplotlib): accuracy vs trainable %, in-distribution vs far-OOD, training loss curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from experiments.report.table import Row, avg_accuracy, heldout_after, task_accuracy, trainable_pct


def accuracy_vs_trainable(rows: list[Row], title: str, path: Path) -> Path | None:
    """Average accuracy (mean and 95% CI over seeds) against the trainable share of parameters (log scale)."""
    points = [(row, row.estimate(trainable_pct), row.estimate(avg_accuracy)) for row in rows]
    points = [(row, x, y) for row, x, y in points if x is not None and y is not None and x.mean > 0]
    if not points:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for row, x, y in points:
        ax.errorbar(x.mean, 100 * y.mean, yerr=100 * (y.ci or 0), fmt="o", capsize=3, label=row.label)
    ax.set(xscale="log", xlabel="trainable parameters (%)", ylabel="average accuracy (%)", title=title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def id_vs_ood(
    rows: list[Row],
    id_tasks: list[str],
    ood_tasks: list[str],
    heldout: tuple[str, str] | None,
    title: str,
    path: Path,
) -> Path | None:
    """Two panels where the data exist: mean ID vs far-OOD accuracy, and ID vs far-OOD held-out loss.

    ``heldout``: the (in-domain, out-of-domain) held-out sets for the rows' training data (`heldout_roles`).
    """
    panels = []
    if id_tasks and ood_tasks:
        panels.append(("accuracy (%)", "accuracy (%)", _mean_of(id_tasks, 100), _mean_of(ood_tasks, 100)))
    if heldout is not None:
        inside, outside = heldout
        panels.append((f"loss {inside}", f"loss {outside}", heldout_after(inside), heldout_after(outside)))
    panels = [p for p in panels if any(row.values(p[2]) and row.values(p[3]) for row in rows)]
    if not panels:
        return None
    fig = Figure(figsize=(6 * len(panels), 4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (x_unit, y_unit, x_metric, y_metric) in zip(axes[0], panels, strict=True):
        for row in rows:
            x, y = row.estimate(x_metric), row.estimate(y_metric)
            if x is not None and y is not None:
                ax.errorbar(x.mean, y.mean, xerr=x.ci or 0, yerr=y.ci or 0, fmt="o", capsize=3, label=row.label)
        ax.set(xlabel=f"in-distribution {x_unit}", ylabel=f"far-OOD {y_unit}", title=title)
        ax.legend(fontsize=7)
    return _save(fig, path)


def loss_curves(rows: list[Row], title: str, path: Path) -> Path | None:
    """Training loss against step, the mean over each row's seeds (steps every seed logged)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    drawn = False
    for row in rows:
        curves = [
            dict((int(s), float(v)) for s, v in (r.summary.get("train") or {}).get("loss_curve") or [])
            for r in row.runs
        ]
        curves = [c for c in curves if c]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        ax.plot(steps, [np.mean([c[s] for c in curves]) for s in steps], label=f"{row.label} (n={len(curves)})")
        drawn = True
    if not drawn:
        return None
    ax.set(xlabel="step", ylabel="training loss", title=title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _mean_of(tasks: list[str], scale: float):
    def metric(summary: dict) -> float | None:
        values = [task_accuracy(task)(summary) for task in tasks]
        values = [v for v in values if v is not None]
        return scale * float(np.mean(values)) if values else None

    return metric


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
