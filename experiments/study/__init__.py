"""Steps of a study that `run.py` does not take (`python -m experiments.study.NAME --help`).

- `fuse`: sum two trained S2FT adapters into the base model and evaluate it (the fusion study, paper Table 5);
- `backfill_heldout`: per-item held-out losses for finished runs that predate them;
- `user_example`: the README's "your own data" example files (`examples/user_data/`).
"""
