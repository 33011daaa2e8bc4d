"""Per-item held-out losses for finished runs that predate them (`predictions/heldout_NAME.jsonl`).

Runs now write these files when they evaluate; older runs only have the mean in `summary.json`. This reloads a run's
base model and trained weights, scores its held-out sets exactly as the run did (same items, seed and max_length),
checks that the mean reproduces the summary's, and writes the per-item files beside the run's other predictions, so
the report can test held-out loss differences item by item.

    python -m experiments.study.backfill_heldout outputs/commonsense_smollm/seed0_s2ft [RUN_DIR...]
"""

import argparse
import json
import math
import sys
from pathlib import Path

import yaml

from s2ft.errors import UserError
from s2ft.evaluation.measure import heldout_losses
from s2ft.methods import load_trained
from s2ft.models import build_run_model

# A rerun on the same machine and library versions reproduces the mean to float rounding.
TOLERANCE = 1e-5


class BackfillError(UserError):
    """Not a finished run directory, or a run whose held-out losses do not reproduce."""


def backfill(run_dir: Path, force: bool = False) -> dict[str, float]:
    """Writes the per-item held-out files of one finished run; returns the recomputed means.

    Raises:
        BackfillError: Not a finished run directory (no summary.json, config.yaml or adapter/), or the recomputed
            mean differs from the summary's (different data, model or code): nothing is kept.
    """
    for name in ("summary.json", "config.yaml", "adapter"):
        if not (run_dir / name).exists():
            raise BackfillError(f"{run_dir / name} does not exist: pass a finished training run's directory")
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    recorded = {name: entry["after"] for name, entry in (summary.get("heldout") or {}).items()}
    files = {name: run_dir / "predictions" / f"heldout_{name}.jsonl" for name in recorded}
    if not recorded or (not force and all(file.is_file() for file in files.values())):
        return {}
    model, tokenizer = build_run_model(cfg["model"], cfg["paths"].get("cache_dir"))
    model = load_trained(model, summary["method"], run_dir / "adapter")
    model.requires_grad_(False)
    losses = heldout_losses(model, tokenizer, cfg, run_dir)
    wrong = {
        n: (losses[n], recorded[n]) for n in recorded if not math.isclose(losses[n], recorded[n], rel_tol=TOLERANCE)
    }
    if wrong:
        for file in files.values():
            file.unlink(missing_ok=True)
        raise BackfillError(f"{run_dir}: recomputed held-out losses differ from summary.json (new, recorded): {wrong}")
    return losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="finished run directories")
    parser.add_argument("--force", action="store_true", help="recompute even where the files exist")
    args = parser.parse_args(argv)
    for run_dir in args.runs:
        try:
            losses = backfill(run_dir, args.force)
        except UserError as err:
            sys.exit(f"error: {err}")
        print(f"{run_dir}: " + (", ".join(f"{n} {v:.4f}" for n, v in losses.items()) or "nothing to do"))


if __name__ == "__main__":
    main()
