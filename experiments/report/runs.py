"""Finished runs for the report: `summary.json` files under run or sweep directories or records, or W&B runs.

Records (`experiments.report.records`) are run directories cut down to ids and numbers, read the same way.

A `Run` pairs a summary with the resolved config it ran (the `config.yaml` beside it), which tells the report which
settings distinguish one row of a study from another, and with its predictions for item-level statistics.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from s2ft.data import UnknownNameError, resolve_train_sources
from s2ft.errors import UserError
from s2ft.lightning.summary import wandb_summaries

# Settings that distinguish repetitions rather than variants: seeds are averaged over, never separate rows.
REPETITION_KEYS = ("seed", "options.seed", "options.calibration_size")
# Config settings (section, key) beside the method's that make a variant: a row's label names them where they vary.
TRAINING_KEYS = (("trainer", "max_steps"), ("data", "limit"), ("method", "weight_decay"))
# What every summary names: the report groups and labels runs by them.
SUMMARY_KEYS = ("experiment", "model", "method")
# What the report (and a record) reads of each prediction row: ids and numbers, never prompts, outputs or answers.
ITEM_FIELDS = ("id", "correct")
HELDOUT_FIELDS = ("id", "nll", "tokens")


class ReportError(UserError, ValueError):
    """The report's input cannot be read as asked (a missing path, no finished run, a damaged summary)."""


@dataclass
class Run:
    """One finished run.

    Attributes:
        summary: The parsed `summary.json` (schema in README.md).
        config: The resolved config of the run (None when only the summary is known).
        path: The run directory (None for W&B runs).
    """

    summary: dict
    config: dict | None = None
    path: Path | None = None
    _rows: dict = field(default_factory=dict, repr=False)

    @property
    def group(self) -> tuple[str, str]:
        """(experiment, model): runs of different groups are never averaged together."""
        return self.summary["experiment"], self.summary["model"]

    @property
    def method(self) -> str:
        return self.summary["method"]

    def settings(self) -> dict[str, str]:
        """The method's settings as flat ``key -> JSON value`` (lr, options, data, length, template), no seeds."""
        if self.config is None:
            flat = {f"options.{k}": self.summary.get(k) for k in ("strategy", "order", "ratios")}
            template = self.summary.get("template")
        else:
            method = self.config.get("method") or {}
            flat = {"lr": method.get("lr"), **flatten(method.get("options") or {}, "options")}
            flat["data.train"] = (self.config.get("data") or {}).get("train")
            template = (self.config.get("data") or {}).get("template")
            # How long and on how much a run trained: runs that differ in these are variants, never seeds of one row.
            for section, key in TRAINING_KEYS:
                if (value := (self.config.get(section) or {}).get(key)) is not None:
                    flat[f"{section}.{key}"] = value
        if template is not None:  # the prompt template is a variant (results/template_smollm), not a repetition
            flat["data.template"] = template
        return {key: json.dumps(value, sort_keys=True) for key, value in flat.items() if key not in REPETITION_KEYS}

    def train_domains(self) -> set[str] | None:
        """The domains of the run's training data (`TrainSource.domain`); None when its config does not say."""
        train = ((self.config or {}).get("data") or {}).get("train")
        try:
            return {source.domain for source in resolve_train_sources(train)} if train else None
        except (UnknownNameError, TypeError):  # a user's own data (a file, or a dict) has no registered domain
            return None

    def item_correct(self, task: str) -> dict[str, bool]:
        """Item id -> correct, from `predictions/TASK.jsonl[.gz]` (empty when the run has no predictions)."""
        return {row["id"]: bool(row["correct"]) for row in self.predictions(task)}

    def item_losses(self, heldout: str) -> dict[str, tuple[float, int]]:
        """Item id -> (summed NLL, tokens) of a held-out set, from `predictions/heldout_NAME.jsonl[.gz]`."""
        return {row["id"]: (float(row["nll"]), int(row["tokens"])) for row in self.predictions(f"heldout_{heldout}")}

    def predictions(self, stem: str) -> list[dict]:
        """The rows of `predictions/STEM.jsonl[.gz]` cut to the fields the report reads ([] without the file).

        Raises:
            ReportError: A file that is not JSON lines, or a row without one of those fields (named).
        """
        if stem not in self._rows:
            fields = HELDOUT_FIELDS if stem.startswith("heldout_") else ITEM_FIELDS
            rows = read_rows(self.path / "predictions", stem) if self.path else []
            for line, row in enumerate(rows, 1):
                if not isinstance(row, dict) or any(key not in row for key in fields):
                    raise ReportError(
                        f"{self.path / 'predictions' / stem}.jsonl[.gz] line {line} lacks one of {', '.join(fields)}; "
                        "rerun the run's evaluation or leave its run out"
                    )
            self._rows[stem] = [{key: row[key] for key in fields} for row in rows]
        return self._rows[stem]

    def check_predictions(self) -> None:
        """Read every prediction file now, so a damaged one is refused before anything is written."""
        for file in sorted((self.path / "predictions").glob("*.jsonl*")) if self.path else []:
            self.predictions(file.name.removesuffix(".gz").removesuffix(".jsonl"))


def read_rows(folder: Path, stem: str) -> list[dict]:
    """The JSON lines of ``folder/STEM.jsonl`` (a run's predictions) or ``STEM.jsonl.gz`` (a record's); [] without."""
    plain, packed = folder / f"{stem}.jsonl", folder / f"{stem}.jsonl.gz"
    file = plain if plain.is_file() else packed if packed.is_file() else None
    if file is None:
        return []
    try:
        text = plain.read_text(encoding="utf-8") if file is plain else gzip.decompress(packed.read_bytes()).decode()
        return [json.loads(line) for line in text.splitlines() if line]
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(
            f"{file} is not readable predictions ({err}); rerun the run's evaluation or leave its run out"
        ) from None


def flatten(tree: dict, prefix: str) -> dict:
    """``tree`` as ``prefix.key.subkey -> value`` (empty dicts are values)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}.{key}"))
        else:
            flat[f"{prefix}.{key}"] = value
    return flat


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Every run under ``paths`` (run directories, sweep directories, or `summary.json` files), sorted by path.

    Raises:
        ReportError: A path that does not exist, no `summary.json` under any of them, or a `summary.json`,
            `config.yaml` or prediction file that cannot be read as one (named).
    """
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise ReportError(f"{path} does not exist; pass run or sweep directories (or summary.json files)")
        if path.is_file():
            files.append(path)
        else:  # hidden folders hold no run of their own (an overwritten run's outputs wait in `.overwritten/`)
            files += [f for f in path.rglob("summary.json") if not _hidden(f.relative_to(path))]
    if not files:
        raise ReportError(f"no summary.json under {[str(p) for p in paths]}: have the runs finished?")
    runs = []
    for file in sorted(set(files)):
        try:
            summary = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ReportError(
                f"{file} is not a readable summary ({err}); rerun its job (ckpt_path=auto) or leave its run out"
            ) from None
        if not isinstance(summary, dict) or not all(isinstance(summary.get(k), str) for k in SUMMARY_KEYS):
            raise ReportError(
                f"{file} is not a run's summary (it needs the strings {', '.join(SUMMARY_KEYS)}); "
                "leave it out or rerun its job (ckpt_path=auto)"
            )
        config_file = file.parent / "config.yaml"
        try:
            config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else None
        except yaml.YAMLError as err:
            raise ReportError(f"{config_file} is not readable YAML ({err}); restore it or leave its run out") from None
        if config is not None and not isinstance(config, dict):
            raise ReportError(f"{config_file} is not a run's config (a mapping); restore it or leave its run out")
        run = Run(summary, config, file.parent)
        run.check_predictions()
        runs.append(run)
    return runs


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def wandb_runs(project: str) -> list[Run]:
    """The runs of a W&B project ``ENTITY/PROJECT`` rebuilt as summaries (needs a network and a W&B login).

    Each W&B run carries the resolved config and the metrics the runner logs, which
    `s2ft.lightning.summary.summary_from_metrics` turns back into a summary. Item-level predictions stay on disk, so
    single-seed rows are compared only where a t-test over seeds is possible.

    Raises:
        ReportError: The project has no s2ft run.
    """
    runs = [Run(summary, config) for summary, config in wandb_summaries(project)]
    if not runs:
        raise ReportError(f"W&B project {project!r} has no s2ft runs")
    return runs
