"""Experiment loggers from the `logger` config group: W&B (offline by default), CSV, or none."""

from __future__ import annotations

import csv
import logging
import os
import sys
import uuid
import warnings
from pathlib import Path

import lightning
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from s2ft.adapter_format import atomic_write

WANDB_ID_FILE = "wandb_id.txt"
log = logging.getLogger(__name__)


def build_logger(logger_cfg: dict, cfg: dict, run_dir: Path):
    """The Lightning logger for a run, or False for `logger=none`.

    W&B runs offline unless `logger.mode=online`; its run id is kept in `run_dir/wandb_id.txt` so a resumed run
    (`ckpt_path=last`) continues the same W&B run, and a resumed CSV run keeps the rows logged before its checkpoint.

    Args:
        logger_cfg: The `logger` group (`name`, and for W&B `project`, `mode`, `tags`).
        cfg: The full resolved config (logged as hyperparameters).
        run_dir: The run directory.
    """
    name = logger_cfg["name"]
    if name == "none":
        return False
    if name == "csv":
        logger = ResumableCSVLogger(run_dir, resume=bool(cfg.get("ckpt_path")))
    else:
        import wandb  # a deliberate cost: importing it takes ~0.6 s, which CSV and logger-free runs do not pay

        os.environ["WANDB_MODE"] = logger_cfg.get("mode") or "offline"
        id_file = run_dir / WANDB_ID_FILE
        # A fresh start (ckpt_path=auto starting over an attempt that left no checkpoint) is a new W&B run, as its
        # metrics.csv is a new file; only a resume continues the run of the file.
        run_id = id_file.read_text().strip() if cfg.get("ckpt_path") and id_file.is_file() else ""
        if not run_id:
            # Only a new id is written, and atomically: a resume that rewrote its own id in place and stopped there
            # left the file empty, and the next resume started a new W&B run.
            run_id = uuid.uuid4().hex[:8]
            atomic_write(id_file, lambda tmp: Path(tmp).write_text(run_id + "\n"))
        method = cfg["method"]["name"]
        logger = QuietWandbLogger(
            project=logger_cfg.get("project") or "s2ft",
            group=cfg["name"],
            name=f"{cfg['name']}-{method}-seed{cfg['seed']}",
            tags=[method, cfg["model"]["name"], *(logger_cfg.get("tags") or [])],
            save_dir=str(run_dir),
            id=run_id,
            resume="allow",
            # The run's own table is the last screen: no W&B banner, run history or summary (s2ft prints the sync
            # command of an offline run with its results).
            settings=wandb.Settings(silent=True),
        )
    logger.log_hyperparams(cfg)
    return logger


class QuietWandbLogger(WandbLogger):
    """Lightning's WandbLogger without its `anonymous` argument.

    Lightning always hands `wandb.init` an `anonymous` value (None when unset); W&B (0.31 here) warns on every run
    that the setting has no effect.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._wandb_init.pop("anonymous", None)


def end_wandb_run(failed: bool) -> None:
    """Finishes the active W&B run, if any, so that the next run in this process starts its own.

    Lightning's WandbLogger adopts a W&B run already active in the process, so without this every job of a Hydra
    multirun after the first would log into the first job's run. A failed (or interrupted) run is marked so; resuming
    it with `ckpt_path=last` continues the same W&B run.
    """
    wandb = sys.modules.get("wandb")  # imported only by a W&B run (build_logger)
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)


def wandb_info(logger) -> dict | None:
    """`{"id", "dir"}` of a W&B logger's run, else None."""
    if not isinstance(logger, WandbLogger):
        return None
    return {"id": logger.version, "dir": str(logger.experiment.dir)}


class ResumableCSVLogger(CSVLogger):
    """`metrics.csv` in the run directory that survives a resume.

    Lightning's CSV writer deletes an existing `metrics.csv` when it starts; on a resume this logger reads the file,
    leaves it in place and, once the checkpoint is restored (`ReplayCSVHistory`), replaces it (atomically) with the rows
    logged before the checkpoint's step, so the file of a resumed run matches that of an uninterrupted one, and a
    resume that stops before its checkpoint loads leaves the file as it was.

    Args:
        run_dir: The run directory.
        resume: Whether the run continues from a checkpoint (otherwise an old file is discarded, as Lightning does).
    """

    def __init__(self, run_dir: Path, resume: bool):
        super().__init__(save_dir=run_dir, name="", version="")
        file = Path(self.log_dir) / "metrics.csv"
        self.history: list[dict[str, str]] = []
        if resume and file.is_file():
            self.history = _whole_rows(file)
        # Lightning's writer warns, on creation, that the old logs "will be deleted" whenever the directory is not
        # empty, which the command's `.hydra/` record and run.log always make it: a resume writes them back
        # (`replay`), and a fresh run's directory was checked (`prepare_run_dir`) before, so the warning is never news.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Previous log files in this directory will be deleted")
            if rank_zero_only.rank == 0:  # only rank 0 writes (other ranks get Lightning's dummy experiment)
                # Until the replay the first session's rows exist only in this file: deleted here, a resume stopped
                # before its checkpoint loads (Ctrl-C, a kill while DDP waits for its ranks) would lose them for good.
                self._experiment = _RunWriter(self.log_dir, keep=bool(self.history))
            self.experiment  # noqa: B018  (creates the writer now, inside the filter)

    def replay(self, before_step: int) -> None:
        """Logs again the remembered rows of steps before `before_step` (later ones are logged anew by training), in a
        new `metrics.csv` that replaces the old one at once."""
        for row in self.history:
            step = int(row["step"])
            if step < before_step:
                self.experiment.log_metrics({k: _number(v) for k, v in row.items() if v != "" and k != "step"}, step)
        self.history = []
        writer = self.experiment
        if not (isinstance(writer, _RunWriter) and writer.keep):
            self.save()
            return
        final = Path(writer.metrics_file_path)
        if not writer.metrics:  # nothing before the checkpoint's step: the old rows all come again
            final.unlink(missing_ok=True)
            return

        def write(tmp: Path) -> None:
            # The writer's own save, into a file of its own: a header of these rows' keys, then the rows; later saves
            # append to the file that replaces the old one.
            writer.metrics_file_path = str(tmp)
            try:
                self.save()
            finally:
                writer.metrics_file_path = str(final)

        atomic_write(final, write)


def _whole_rows(file: Path) -> list[dict[str, str]]:
    """The rows of a metrics.csv that read back whole.

    The writer appends every logged row: a session killed while it wrote (or a machine that went down before the disk
    had the file's tail) leaves a last line without its line end, missing fields (None, which stopped the replay) or
    holding a number cut short; a disk fault inside the file leaves bytes that are not text or a field that is no
    number. Those rows are dropped with a warning, so the resume replays the others instead of stopping on them.
    """
    with file.open(newline="", errors="replace") as handle:  # a byte that is not UTF-8 spoils its row, not the file
        text = handle.read()
    rows = list(csv.DictReader(text.splitlines(keepends=True)))
    if rows and not text.endswith("\n"):
        log.warning(
            "%s ends in a row cut short (a session stopped while writing it): dropped that row (step %s)",
            file,
            rows[-1].get("step"),
        )
        rows = rows[:-1]
    whole = [row for row in rows if _reads_back(row)]
    if len(whole) < len(rows):
        damaged = [str(row.get("step")) for row in rows if not _reads_back(row)]
        log.warning("%s: %d damaged row(s) dropped (steps %s)", file, len(damaged), ", ".join(damaged))
    return whole


def _reads_back(row: dict) -> bool:
    """Whether a metrics.csv row has every field (no None, no extra) and each one a number (or empty)."""
    if None in row or None in row.values():
        return False
    try:
        int(row["step"])
        for key, value in row.items():
            if value != "" and key != "step":
                _number(value)
    except (KeyError, ValueError):
        return False
    return True


class _RunWriter(ExperimentWriter):
    """Lightning's CSV writer, made safe for a run's `metrics.csv`: the file is rewritten under a wider header (a key
    logged for the first time) atomically, and a resumed session leaves the file it finds in place (``keep``) until
    its replay replaces it.

    Lightning truncated the file and wrote it again in place: a session stopped in between left it without the rows
    logged before, which a resume could then not replay.
    """

    # Lightning's private hooks this writer replaces: renamed by an upgrade, they would be bypassed without an error and
    # a resume would lose the rows logged before it.
    HOOKS = ("_check_log_dir_exists", "_rewrite_with_new_header")

    def __init__(self, log_dir: str, keep: bool):
        missing = [name for name in self.HOOKS if not callable(getattr(ExperimentWriter, name, None))]
        if missing:
            raise RuntimeError(
                f"lightning {lightning.__version__}'s CSV writer has no {', '.join(missing)}, which s2ft's resume-safe "
                "metrics.csv replaces (tested with lightning 2.6): pip install 'lightning>=2.4,<2.7', or log with "
                "logger=wandb or logger=none"
            )
        self.keep = keep
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self.keep:
            super()._check_log_dir_exists()  # deletes the file: a fresh run's directory was checked before

    def save(self) -> None:
        keys = list(self.metrics_keys)
        try:
            super().save()
        except BaseException:
            # The file still has the header of these keys: the next save sees the new keys again and rewrites it.
            self.metrics_keys = keys
            raise

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        final = Path(self.metrics_file_path)

        def write(tmp: Path) -> None:
            with final.open(newline="") as old, tmp.open("w", newline="") as new:
                writer = csv.DictWriter(new, fieldnames=fieldnames)
                writer.writeheader()
                writer.writerows(csv.DictReader(old))

        atomic_write(final, write)


def _number(text: str) -> int | float:
    """A value read back from metrics.csv, as it was logged: "0" (an epoch, a count) stays an int, not "0.0"."""
    return int(text) if text.lstrip("-").isdigit() else float(text)


class ReplayCSVHistory(Callback):
    """Restores the pre-checkpoint rows of every `ResumableCSVLogger` as the checkpoint is loaded.

    Not at the start of training: a run resumed from a checkpoint of its last step (stopped during its final
    evaluation) trains no more, and Lightning then calls no training hook at all.
    """

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # Lightning's log step counts the batches that stepped the optimizer: the global step, with one optimizer.
        step = checkpoint["global_step"]
        for logger in trainer.loggers:
            if isinstance(logger, ResumableCSVLogger) and logger.history:
                logger.replay(step)
