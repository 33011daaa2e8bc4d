"""Finished runs for the report: `summary.json` files under run or sweep directories or records, or W&B runs.

Records (`experiments.report.records`) are run directories cut down to ids and numbers, read the same way. Run
directories without a `summary.json` (crashed, killed, still running) are no row, but `find_unfinished` names them, so
the report can say which runs its table lacks.

A `Run` pairs a summary with the resolved config it ran (the `config.yaml` beside it), which tells the report which
settings distinguish one row of a study from another, and with its predictions for item-level statistics.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from s2ft.data import UnknownNameError, resolve_train_sources
from s2ft.errors import UserError
from s2ft.lightning.checkpoint import CHECKPOINT
from s2ft.lightning.summary import wandb_summaries

# Settings that distinguish repetitions rather than variants: seeds are averaged over, never separate rows. (S2FT's
# and SpFT's options.seed is the seed of their random selection, `${seed}` in conf/.)
REPETITION_KEYS = ("seed", "options.seed")
# Config settings (section, key) beside the method's that change what a run trained or what its numbers measure, so
# runs that differ in them are variants: a row's label names them where they vary. Left out: paths, logging and
# checkpoint cadence, eval.batch_size, trainer.accelerator / strategy (how, not what), data.allow_overlap (a check).
TRAINING_KEYS = (
    *(("trainer", key) for key in ("max_steps", "max_epochs", "accumulate_grad_batches", "gradient_clip_val")),
    *(("trainer", key) for key in ("precision", "devices", "num_nodes", "warmup_steps", "scheduler", "select_best")),
    *(("data", key) for key in ("limit", "val_size", "max_length", "batch_size")),
    ("method", "weight_decay"),
    ("method", "betas"),
    ("model", "dtype"),
    # Which tasks and how many items: seeds scored on other tasks average other things into Avg.
    *(("eval", key) for key in ("tasks", "groups", "limit", "heldout_limit", "backend")),
    *(("eval", key) for key in ("mode", "num_beams", "max_new_tokens")),
)
# Settings of optional evaluations, as `Run.settings` names them, which change numbers only where that evaluation
# ran: lm-evaluation-harness (eval.lm_eval, with eval.backend=lm_eval) and MT-Bench (which questions, which judge).
OPTIONAL_EVALS = ("eval.lm_eval.", "eval.mtbench.")
# Optional config keys and what the code runs without them (`s2ft.lightning.runner`: `method.get("betas") or ...`;
# eval.backend came with lm_eval, before which every run scored with s2ft's own evaluation; eval.groups with user
# groups, before which a run averaged none).
ABSENT_MEANS = {("method", "betas"): None, ("eval", "backend"): "s2ft", ("eval", "groups"): None}
# What a run directory holds before its summary: the runner's resolved config, or only Hydra's (started, not yet
# training), and the checkpoint an interrupted run resumes from.
RUN_CONFIGS = (Path("config.yaml"), Path(".hydra") / "config.yaml")
# What every summary names: the report groups and labels runs by them.
SUMMARY_KEYS = ("experiment", "model", "method")
# Summary fields the report reads as numbers (or null).
NUMBER_FIELDS = ("avg_accuracy", "trainable_pct")
# What the report (and a record) reads of each prediction row: ids and numbers, never prompts, outputs or answers.
ITEM_FIELDS = ("id", "correct")
HELDOUT_FIELDS = ("id", "nll", "tokens")
# How far a held-out file's per-token loss may be from its summary's (experiments.study.backfill_heldout keeps files
# within 1e-5 relative of the recorded mean).
HELDOUT_TOLERANCE = 1e-4


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
        """The method's settings as flat ``key -> JSON value`` (lr, options, data, length, template, ...), no seeds.

        A key the run's config lacks (an option its code did not have yet) is left out: `lacks` tells it from a
        component a dict setting does not have (``target_split`` without ``q``).
        """
        if self.config is None:
            flat = {f"options.{k}": self.summary.get(k) for k in ("strategy", "order", "ratios")}
        else:
            method = self.config.get("method") or {}
            data = self.config.get("data") or {}
            flat = {"lr": method["lr"]} if "lr" in method else {}
            flat |= flatten(method.get("options") or {}, "options")
            if "train" in data:
                flat["data.train"] = data["train"]
            # How long, on what and how a run trained, and what its numbers measure: runs that differ in these are
            # variants, never seeds of one row.
            for section, key in TRAINING_KEYS:
                values = self.config.get(section) or {}
                if key in values or (section, key) in ABSENT_MEANS:
                    flat[f"{section}.{key}"] = values.get(key, ABSENT_MEANS.get((section, key)))
            evaluation = self.config.get("eval") or {}
            if evaluation.get("backend") == "lm_eval":
                flat |= flatten(evaluation.get("lm_eval") or {}, "eval.lm_eval")
            if mtbench := evaluation.get("mtbench"):
                # What was asked and who judged; not how (timeouts, retries, batch size, the key's variable).
                judge = mtbench.get("judge") or {}
                kind = judge.get("kind")
                flat |= {f"eval.mtbench.{key}": mtbench.get(key) for key in ("questions", "references")}
                flat |= {"eval.mtbench.judge": kind, "eval.mtbench.judge_model": (judge.get(kind) or {}).get("model")}
        # The prompt template is a variant (results/template_smollm), not a repetition; the summary records the one
        # the run used where its config is older than the option.
        template = ((self.config or {}).get("data") or {}).get("template", self.summary.get("template"))
        if template is not None:
            flat["data.template"] = template
        return {key: json.dumps(value, sort_keys=True) for key, value in flat.items() if key not in REPETITION_KEYS}

    def lacks(self, key: str) -> bool:
        """Whether the run cannot say its value of the setting ``key`` (a `settings` key of another run): its config
        has no such setting, where a dict setting without that component (``options.target_split.q``) and a setting
        of an optional evaluation the run did not run (``eval.lm_eval.limit`` with backend s2ft) say "none"."""
        if key in self.settings():
            return False
        if self.config is not None and key.startswith(OPTIONAL_EVALS):
            return False
        if self.config is None or not key.startswith("options."):
            return True
        options = (self.config.get("method") or {}).get("options") or {}
        return key.split(".")[1] not in options

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
            present = self.path is not None and any(
                (self.path / "predictions" / f"{stem}{ext}").is_file() for ext in (".jsonl", ".jsonl.gz")
            )
            for line, row in enumerate(rows, 1):
                if not isinstance(row, dict) or any(key not in row for key in fields):
                    raise ReportError(
                        f"{self.path / 'predictions' / stem}.jsonl[.gz] line {line} lacks one of {', '.join(fields)}; "
                        "rerun the run's evaluation or leave its run out"
                    )
            self._rows[stem] = [{key: row[key] for key in fields} for row in rows]
            if present:  # an empty file too: one cut short before its first line
                self._check_against_summary(stem, self._rows[stem])
        return self._rows[stem]

    def _check_against_summary(self, stem: str, rows: list[dict]) -> None:
        """Refuse a prediction file whose items do not give the summary's numbers: a file cut short at a line (a
        killed backfill, a broken copy) or of another evaluation was paired item by item beside the table's means.

        Raises:
            ReportError: Naming the file, what it gives and what the summary says.
        """
        file = f"{self.path / 'predictions' / stem}.jsonl[.gz]"
        fix = "(cut short, or of another evaluation); rerun the run's evaluation or leave its run out"
        if stem.startswith("heldout_"):
            name = stem.removeprefix("heldout_")
            after = ((self.summary.get("heldout") or {}).get(name) or {}).get("after")
            tokens = sum(int(row["tokens"]) for row in rows)
            loss = sum(float(row["nll"]) for row in rows) / tokens if tokens else math.nan
            if isinstance(after, int | float) and math.isfinite(after):
                # A backfilled file may differ from the recorded mean by its tolerance (1e-5 relative); an empty file
                # gives no loss (NaN), never the summary's.
                if not math.isclose(loss, after, rel_tol=HELDOUT_TOLERANCE):
                    raise ReportError(
                        f"{file} gives a per-token loss of {loss:.6f} over {len(rows)} items where summary.json's "
                        f"heldout.{name}.after is {after:.6f} {fix}"
                    )
            return
        result = (self.summary.get("eval") or {}).get(stem) or {}
        n, accuracy = result.get("n"), result.get("accuracy")
        right = sum(bool(row["correct"]) for row in rows)
        if isinstance(n, int | float) and len(rows) != n:
            raise ReportError(f"{file} has {len(rows)} items where summary.json's eval.{stem}.n is {n:g} {fix}")
        if rows and isinstance(accuracy, int | float) and abs(right / len(rows) - accuracy) > 1e-9:
            raise ReportError(
                f"{file} has {right} of {len(rows)} items correct where summary.json's eval.{stem}.accuracy is "
                f"{accuracy:g} {fix}"
            )

    def prediction_stems(self) -> list[str]:
        """The prediction files the report reads: those of the summary's tasks and held-out sets that the run has.

        Others are no item scores (MT-Bench's `predictions/mtbench.jsonl` holds answers and ratings).
        """
        stems = [*(self.summary.get("eval") or {}), *(f"heldout_{name}" for name in self.summary.get("heldout") or {})]
        folder = self.path / "predictions" if self.path else None
        return [s for s in stems if folder and any((folder / f"{s}{ext}").is_file() for ext in (".jsonl", ".jsonl.gz"))]

    def check_predictions(self) -> None:
        """Read every prediction file the report reads now, so a damaged one is refused before anything is written."""
        for stem in self.prediction_stems():
            self.predictions(stem)


def summary_problems(summary: dict) -> list[str]:
    """Every field the report reads that a summary holds with the wrong type (a hand-edited or foreign file): each
    was a TypeError or AttributeError from deep inside a table or a figure, after earlier output was written."""

    def number(value) -> bool:
        return value is None or (isinstance(value, int | float) and not isinstance(value, bool))

    def mapping_of(key: str, check, what: str) -> list[str]:
        value = summary.get(key)
        if value is None:
            return []
        if not isinstance(value, dict):
            return [f"{key} is {type(value).__name__}, not a mapping"]
        return [f"{key}.{name} is {entry!r}, not {what}" for name, entry in value.items() if not check(entry)]

    problems = [f"{key} is {summary[key]!r}, not a number" for key in NUMBER_FIELDS if not number(summary.get(key))]
    if not (
        summary.get("seed") is None or (isinstance(summary["seed"], int) and not isinstance(summary["seed"], bool))
    ):
        problems.append(f"seed is {summary['seed']!r}, not an integer")
    problems += mapping_of("groups", number, "a number")
    problems += mapping_of(
        "eval",
        lambda task: isinstance(task, dict) and all(number(task.get(k)) for k in ("accuracy", "n")),
        "a mapping with numbers accuracy and n",
    )
    problems += mapping_of(
        "heldout",
        lambda loss: isinstance(loss, dict) and all(number(loss.get(k)) for k in ("before", "after")),
        "a mapping with numbers before and after",
    )
    problems += mapping_of(
        "train", lambda value: number(value) or isinstance(value, list), "a number or a list (a curve)"
    )
    mtbench = summary.get("mtbench")
    if mtbench is not None:
        ratings = mtbench.get("ratings") if isinstance(mtbench, dict) else None
        if not isinstance(mtbench, dict) or not number(mtbench.get("score")):
            problems.append("mtbench is not a mapping with a number score")
        elif ratings is not None and not (
            isinstance(ratings, dict)
            and all(isinstance(turns, list) and all(map(number, turns)) for turns in ratings.values())
        ):
            problems.append("mtbench.ratings is not a mapping of question ids to lists of ratings")
    files = summary.get("eval_data")
    if files is not None and not (
        isinstance(files, list)
        and all(
            isinstance(f, dict)
            and isinstance(f.get("name"), str)
            and isinstance(f.get("role"), str)
            and (f.get("sha256") is None or isinstance(f.get("sha256"), str))
            for f in files
        )
    ):
        problems.append("eval_data is not a list of {name, role, file, sha256} entries")
    curve = (summary.get("train") or {}).get("loss_curve") if isinstance(summary.get("train"), dict) else None
    if curve is not None and not (
        isinstance(curve, list) and all(isinstance(p, list) and len(p) == 2 and all(map(number, p)) for p in curve)
    ):
        problems.append("train.loss_curve is not a list of [step, loss] pairs")
    return problems


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
        else:
            files += _find(path, "summary.json")
    if not files:
        if unfinished := find_unfinished(paths):
            raise ReportError(
                f"no summary.json under {[str(p) for p in paths]}: {len(unfinished)} run director"
                f"{'ies have' if len(unfinished) > 1 else 'y has'} none (crashed, killed or still running): "
                + "; ".join(f"{run.path} ({run.state})" for run in unfinished)
            )
        raise ReportError(f"no summary.json under {[str(p) for p in paths]}: have the runs finished?")
    # One run named twice (a sweep directory and a run in it, a relative and an absolute path) is one run.
    unique = {}
    for file in sorted(set(files)):
        unique.setdefault(file.resolve(), file)
    runs = []
    for file in unique.values():
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
        if problems := summary_problems(summary):
            raise ReportError(
                f"{file} has fields of the wrong type: {'; '.join(problems)}; restore it, rerun its job "
                "(ckpt_path=auto) or leave its run out"
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


@dataclass(frozen=True)
class Unfinished:
    """A run directory without a `summary.json`: a run that crashed, was killed or is still running.

    Attributes:
        path: The run directory, as found under the path given.
        group: (experiment, model) as its config names them; None where it names no strings.
        state: How far it got, as a report shows it (an interrupted run's checkpoint, or none).
    """

    path: Path
    group: tuple[str, str] | None
    state: str


def find_unfinished(paths: list[str | Path]) -> list[Unfinished]:
    """The run directories under the directories among ``paths`` that have a run's config but no `summary.json`.

    A run directory is a folder with the runner's `config.yaml` or Hydra's `.hydra/config.yaml`; folders inside
    one (W&B's `wandb/run-*/files/config.yaml`) and hidden ones are none. Sorted by path; missing paths and files
    give none (`find_runs` names those).
    """
    run_dirs: set[Path] = set()
    for path in (Path(p) for p in paths if Path(p).is_dir()):
        run_dirs.update(file.parent for file in _find(path, "summary.json"))
        run_dirs.update(file.parent for file in _find(path, "config.yaml"))
        run_dirs.update(file.parent.parent for file in _find(path, "config.yaml", hydra=True))
    return [
        _unfinished(run_dir)
        for run_dir in sorted(run_dirs)
        if not (run_dir / "summary.json").is_file() and not any(parent in run_dirs for parent in run_dir.parents)
    ]


def _unfinished(run_dir: Path) -> Unfinished:
    """What an unfinished run's config and files say: its study, and whether it can resume."""
    config_file = next(run_dir / name for name in RUN_CONFIGS if (run_dir / name).is_file())
    try:
        config = yaml.safe_load(config_file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):  # a damaged config still names an unfinished run, of no study
        config = None
    config = config if isinstance(config, dict) else {}
    model = config.get("model")
    group = (config.get("name"), model.get("name") if isinstance(model, dict) else None)
    if (run_dir / CHECKPOINT).is_file():
        state = f"{CHECKPOINT.as_posix()}: resumable with ckpt_path=auto, unless still running"
    elif config_file == run_dir / RUN_CONFIGS[0]:
        state = "no checkpoint: stopped or still running before its first"
    else:  # the runner writes config.yaml once the model and method are set up
        state = "only .hydra/config.yaml: stopped or still starting before training"
    return Unfinished(run_dir, group if all(isinstance(v, str) for v in group) else None, state)


def _find(root: Path, name: str, hydra: bool = False) -> list[Path]:
    """The files ``name`` under ``root`` (``.hydra/NAME`` with ``hydra``), symbolic links to folders followed.

    A comparison folder of links to run directories is a sweep directory too (`Path.rglob` does not follow them, and
    linked runs were dropped unsaid); a link back up the tree is walked once. Hidden folders hold no run of their
    own (an overwritten run's outputs wait in `.overwritten/`), except Hydra's `.hydra/` with ``hydra``.
    """
    found, seen = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        if hydra and os.path.isfile(os.path.join(folder, ".hydra", name)):
            found.append(Path(folder) / ".hydra" / name)
        elif not hydra and name in files:
            found.append(Path(folder) / name)
    return found


def wandb_runs(project: str) -> list[Run]:
    """The runs of a W&B project ``ENTITY/PROJECT`` rebuilt as summaries (needs a network and a W&B login).

    Each W&B run carries the resolved config and the metrics the runner logs, which
    `s2ft.lightning.summary.summary_from_metrics` turns back into a summary. Item-level predictions stay on disk, so
    single-seed rows are compared only where a t-test over seeds is possible.

    Raises:
        ReportError: The project has no s2ft run, or W&B cannot be read (no login, no network, no such project).
    """
    import wandb.errors  # only reading W&B pays for importing it

    try:
        found = wandb_summaries(project)
    except wandb.errors.Error as err:
        raise ReportError(
            f"W&B project {project!r} cannot be read ({err}); log in (`wandb login`) on a machine with a network, or "
            "report the run directories instead (the report reads their summary.json, offline W&B runs' too)"
        ) from None
    runs = [Run(summary, config) for summary, config in found]
    if not runs:
        raise ReportError(f"W&B project {project!r} has no s2ft runs")
    return runs
