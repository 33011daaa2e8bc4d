"""Redraws benchmark tables and charts (`results.md`, `results.png`) from the `results.json` of each folder given,
e.g. after a run on a machine without matplotlib:

    python -m experiments.bench.redraw results/training_gpu results/switch_gpu results/serving_gpu
"""

import argparse
import sys
from pathlib import Path

from experiments.bench.results import redraw


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
