"""The comparison report of finished runs: `python -m experiments.report RUNS... --out DIR` (`--help` for more).

`runs` reads finished runs (run directories, records or W&B), `records` writes their compact records, `table`
groups them into rows, `stats` compares rows, `figures` draws them and `markdown` writes `report.md`.
"""
