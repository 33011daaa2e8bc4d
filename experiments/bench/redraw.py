"""Redraws benchmark tables and charts (`results.md`, `results.png`) from the `results.json` of each folder given,
e.g. after a run on a machine without matplotlib:

    python -m experiments.bench.redraw results/training_gpu results/switch_gpu results/serving_gpu

A `results.json` whose target records lack their comparison (`op`, written before the records had one shape) gets
them recomputed from its measured numbers (`recompute_targets`) and is rewritten with them.
"""

import argparse
import json
import sys
from pathlib import Path

from experiments.bench import serving, switch, training
from experiments.bench.results import (
    layout_chart,
    layout_table,
    serving_chart,
    serving_table,
    switch_chart,
    switch_table,
    training_chart,
    training_table,
    write_results,
)


def recompute_targets(results: dict) -> dict:
    """A benchmark's results with every target record recomputed from its measured numbers by the benchmark's own
    check (against today's limits); the measured numbers are left as they are.

    Args:
        results: a training, switching or serving `results.json`, as loaded (layout results have no targets).

    Returns:
        A new dict: `results` with new `targets` (and, for training, each setting's `targets`).
    """
    results = dict(results)
    if "settings" in results:
        results["settings"] = [s | {"targets": training.check_targets(s["methods"])} for s in results["settings"]]
        results["targets"] = results["settings"][0]["targets"]
    elif "decode" in results:
        results["targets"] = serving.check_targets(results["decode"])
    else:
        results["targets"] = switch.check_targets(results["layer"], results["model"])
    return results


# The key that marks a benchmark's results (serving's also hold "layer": it is looked for first) -> table, chart.
DRAWINGS = {
    "settings": (training_table, training_chart),
    "decode": (serving_table, serving_chart),
    "layer": (switch_table, switch_chart),
    "budgets": (layout_table, layout_chart),
}


def redraw(out: Path) -> None:
    """Rewrites ``results.md`` and ``results.png`` of a benchmark directory from its ``results.json`` (and the JSON
    itself, with its target records recomputed, when they lack their comparison)."""
    path = out / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass the directory a benchmark wrote (with --out)")
    results = json.loads(path.read_text())
    kind = next((key for key in DRAWINGS if key in results), None)
    if kind is None:
        raise ValueError(
            f"{path} is not a benchmark result: none of training's settings, serving's decode, switching's layer,"
            " layout's budgets"
        )
    records = results.get("targets", []) + [t for s in results.get("settings", []) for t in s["targets"]]
    if any("op" not in record for record in records):
        results = recompute_targets(results)
    write_results(results, out, *DRAWINGS[kind])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", type=Path, nargs="+", help="directories holding a results.json")
    for directory in parser.parse_args(argv).dirs:
        try:
            redraw(directory)
        except (OSError, ValueError) as error:
            sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
