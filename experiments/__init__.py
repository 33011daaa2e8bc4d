"""The experiment suite's commands beside `run.py`, run from the repository root with `python -m`.

- `experiments.bench`: the efficiency benchmarks (`python -m experiments.bench.training`, `.switch`, `.serving`,
  `.layout`, `.redraw`).
- `experiments.report`: the comparison report of finished runs (`python -m experiments.report RUNS... --out DIR`).
- `experiments.study`: steps of a study that `run.py` does not take (`python -m experiments.study.fuse`,
  `.backfill_heldout`, `.user_example`).
"""
