"""One run per directory: what a command may do with its run directory, decided before anything in it is written.

- A fresh run (no ``ckpt_path``) needs a directory without another run's outputs, unless ``overwrite=true``: the old
  outputs are then moved aside (``.overwritten/``), so no file of the old run ends up beside the new one's, and
  deleted once the new run has written outputs of its own; a command that fails before that puts them back
  (`settle_overwrite`).
- A resume (``ckpt_path=last``, a checkpoint file, or ``auto`` finding one) needs the same config as the run it
  continues: the directory's ``config.yaml`` and the config stored in the checkpoint are compared key by key, and the
  checkpoint is read safely (`s2ft.lightning.checkpoint.read_checkpoint`) before training starts.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from lightning.pytorch.utilities import rank_zero_only

from s2ft.adapter_format import atomic_write
from s2ft.data.sources import train_source_files
from s2ft.errors import UserError
from s2ft.evaluation.measure import eval_data
from s2ft.lightning.checkpoint import CHECKPOINT, read_checkpoint, resume_command
from s2ft.run_config import RunConfigError

# What a run writes into its directory; Hydra's record of the command (`COMMAND_RECORD`) and its job log are not a run's
# outputs.
OUTPUTS = (
    "config.yaml", "hparams.yaml", "metrics.csv", "summary.json", "wandb_id.txt", "adapter", "checkpoints", "merged",
    "lora", "predictions", "before", "wandb", "adapters", "adapters.json",
)  # fmt: skip
# What a finished run leaves last: its summary, or the index of an ``adapters=[...]`` evaluation (one summary per
# adapter, under adapters/NAME/).
FINISHED = ("summary.json", "adapters.json")
# Keys that say how to start a command, not what the run is.
COMMAND_KEYS = {"ckpt_path", "overwrite"}
# Where the checkout, its data and caches are: a resume from a moved checkout, or on a cluster node that mounts them
# elsewhere, is the same run. What they hold is checked by digest (the training files and items, the base model:
# `s2ft.lightning.checkpoint`), not by where they are.
LOCATION_KEYS = {"paths"}
# The settings whose files are checked by digest wherever a run is continued or skipped: their paths compare relative
# to ``paths.*`` (`_relative_to_paths`).
CHECKED_BY_DIGEST = {"data", "eval"}
# Where ``overwrite=true`` keeps the old run's outputs until the new run writes its own.
DISPLACED = ".overwritten"
# Hydra's record of the command (config.yaml, hydra.yaml, overrides.yaml), written by `write_command_record` once every
# check has accepted the command: Hydra's own, written before any check, made a refused command replace a run's record.
COMMAND_RECORD = ".hydra"


class RunDirError(UserError):
    """The run directory holds outputs this command would overwrite or cannot use."""


@dataclass
class RunPlan:
    """What `prepare_run_dir` decided.

    Attributes:
        cfg: The config to run (``ckpt_path`` resolved: None for a fresh start, else the checkpoint file).
        finished: The summary (or ``adapters.json`` index) of the run already finished in the directory
            (``ckpt_path=auto``): nothing to do.
        checkpoint: The checkpoint to resume from, already loaded and checked against the config.
    """

    cfg: dict
    finished: dict | None = None
    checkpoint: dict | None = None


@contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` for one command: a second command in it (a sweep started twice, a requeued job whose first
    copy still runs) is refused before it reads or writes anything, instead of resuming the same checkpoint and
    writing the same checkpoint, metrics and adapter files at once.

    The lock is an exclusive `flock` on the directory itself, so no file is added to it; the kernel releases it when
    the process ends, however it ends. A directory this creates for the lock is removed again if the command leaves
    it empty. Only rank 0 locks (DDP ranks share the directory), and a filesystem that cannot lock a directory (NFS,
    Lustre without flock) leaves the run unguarded, as before.

    Raises:
        RunDirError: Another process holds the directory.
    """
    if rank_zero_only.rank != 0:
        yield
        return
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                yield  # no directory locks on this filesystem
                return
            raise RunDirError(
                f"another process is running in {run_dir} (it holds the directory's lock); wait for it to end or stop "
                "it, then continue the run with ckpt_path=auto"
            ) from None
        yield
    finally:
        os.close(handle)
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()


def prepare_run_dir(cfg: dict, run_dir: Path) -> RunPlan:
    """Check that ``cfg`` may run in ``run_dir`` and resolve ``ckpt_path``; ``overwrite=true`` moves old outputs aside.

    Raises:
        RunConfigError: A resume under another config than the run's (the differing keys are named).
        RunDirError: A fresh run in a directory holding another run's outputs (or an interrupted run's checkpoint), or
            a resume (``ckpt_path=last`` or a file) in a directory whose run finished.
        CheckpointError: A missing, unreadable or foreign checkpoint.
    """
    settle_overwrite(run_dir)  # what an overwrite killed mid-command left aside
    ckpt = cfg.get("ckpt_path")
    if cfg.get("overwrite") and ckpt is not None:
        raise RunConfigError(
            f"overwrite=true deletes the run directory's outputs but ckpt_path={ckpt} resumes from them; drop one"
        )
    if ckpt == "auto":
        check_same_config(cfg, run_dir, "ckpt_path=auto")
        for name in FINISHED:
            if (run_dir / name).is_file():
                finished = _read_summary(run_dir / name)
                check_same_files(cfg, run_dir, finished)
                return RunPlan(cfg, finished=finished)
        if not (run_dir / CHECKPOINT).is_file():
            # Nothing to resume; what the same config's earlier attempt left (no checkpoint) is started over.
            return RunPlan({**cfg, "ckpt_path": None})
        ckpt = "last"
    if ckpt is None:
        # DDP ranks > 0 start once rank 0 has begun writing the directory: only rank 0 judges (and clears) it.
        if rank_zero_only.rank == 0:
            _check_fresh(cfg, run_dir)
        return RunPlan(cfg)
    if (run_dir / "summary.json").is_file():
        # Nothing is left to train: resuming would evaluate again and append a second copy of the final rows to
        # metrics.csv (replayed from the first session's file, then logged anew).
        raise RunDirError(
            f"ckpt_path={ckpt} but {run_dir} holds a finished run (summary.json), so there is nothing to resume; "
            f"ckpt_path=auto skips it, python run.py mode=eval run_dir={run_dir} evaluates it again in a directory of "
            "its own, and overwrite=true (without ckpt_path) trains it again"
        )
    path = run_dir / CHECKPOINT if ckpt == "last" else Path(ckpt)
    if not path.is_file():
        raise RunDirError(
            f"ckpt_path={ckpt} but {path} does not exist, so there is no interrupted run to resume there; resume in "
            "the interrupted run's directory with hydra.run.dir=<that run directory> ckpt_path=last, or drop "
            "ckpt_path to start a new run"
        )
    check_same_config(cfg, run_dir, f"ckpt_path={ckpt}")
    checkpoint = read_checkpoint(path)
    saved = checkpoint.get("run_config")
    differing = config_differences(saved, cfg) if isinstance(saved, dict) else []
    if differing:
        raise RunConfigError(
            f"checkpoint {path} was written by a run of another config (differs in {', '.join(differing)}); resume "
            "with the settings it was written with, or start this config in its own directory"
        )
    return RunPlan({**cfg, "ckpt_path": str(path)}, checkpoint=checkpoint)


def check_same_config(cfg: dict, run_dir: Path, why: str) -> None:
    """Refuse to continue the run in ``run_dir`` under a config other than the one in its ``config.yaml``.

    Raises:
        RunConfigError: Naming every differing key (``ckpt_path``, ``overwrite`` and ``paths.*`` do not count).
    """
    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        return
    try:
        saved = yaml.safe_load(saved_file.read_text())
    except yaml.YAMLError as err:
        raise RunDirError(f"{saved_file} is not valid YAML ({err}); restore it or start in a new directory") from err
    except (OSError, UnicodeDecodeError) as err:  # not text at all (garbled by a disk), or not readable
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise RunDirError(f"{saved_file} cannot be read ({reason}); restore it or start in a new directory") from err
    if not isinstance(saved, dict):
        # An empty or foreign file would compare as one nameless difference: "differs in )".
        raise RunDirError(
            f"{saved_file} holds no run config (a YAML mapping), but {str(saved)[:60]}; restore it or start in a new "
            "directory"
        )
    differing = config_differences(saved, cfg)
    if differing:
        hint = ""
        if all(key.startswith("eval.") for key in differing) and (run_dir / "adapter").is_dir():
            # Only the evaluation changed, and training saved its adapter: a final evaluation that failed under the old
            # settings (out of memory, say) is run again by mode=eval, not by training again in a new directory.
            hint = (
                "; its training is done (adapter/): evaluate it with the new eval settings in a directory of its own "
                f"with python run.py <these overrides, without ckpt_path> mode=eval run_dir={run_dir}"
            )
        raise RunConfigError(
            f"{why}: {run_dir} holds a run of another config (differs in {', '.join(differing)}); give this config "
            f"its own directory (hydra.run.dir, or hydra.sweep.dir for a multirun), or resume with the settings of "
            f"{saved_file}{hint}"
        )


def check_same_files(cfg: dict, run_dir: Path, finished: dict) -> None:
    """Refuse to skip a finished run (``ckpt_path=auto``) whose training or evaluation files have changed since.

    The config is the same (`check_same_config`), but ``paths.*`` may point at other data, and a file can change under
    its name: the SHA-256s the run's summary recorded are compared with the files' now. The evaluation files of a run
    finished before summaries recorded them (``eval_data``) are not checked, nor a registered hub set (no SHA-256)
    or the adapter a ``mode=eval`` run read.

    Raises:
        RunDirError: Naming every changed file, and the command that measures (or trains) on the files of now.
    """
    summary = finished
    if "adapters" in finished:  # an adapters=[...] evaluation's index: every adapter's summary records the same files
        first = next(iter(finished["adapters"].values()), None)
        summary = _read_summary(run_dir / first["results"] / "summary.json") if first else {}
    changed = []
    if cfg.get("mode") != "eval" and summary.get("training_data"):
        now = train_source_files(cfg["data"]["train"], cfg["paths"]["data_dir"])
        changed += _changed_files(summary["training_data"].get("sources") or [], now, "training")
    trained = len(changed)
    if summary.get("eval_data") is not None:
        changed += _changed_files(summary["eval_data"], eval_data(cfg), "evaluation")
    if not changed:
        return
    if trained:
        fix = "train it again on the files of now with overwrite=true (without ckpt_path), or in a directory of its own"
    elif (run_dir / "adapter").is_dir():
        fix = (
            "evaluate it on the files of now in a directory of its own with python run.py <these overrides, without "
            f"ckpt_path> mode=eval run_dir={run_dir}"
        )
    else:
        fix = "run it again on the files of now with overwrite=true (without ckpt_path), or in a directory of its own"
    raise RunDirError(
        f"ckpt_path=auto: {run_dir} holds a finished run, but of other files than this command's: "
        f"{'; '.join(changed)}. Its results stand for the files it read; restore them (or point paths.data_dir or the "
        f"tasks back at them) to keep it, or {fix}"
    )


def _changed_files(recorded: list[dict], now: list[dict], what: str) -> list[str]:
    """``what`` files (`train_source_files` / `eval_data` entries) whose SHA-256 differs from the recorded one,
    named with both digests; an entry recorded without a digest (a registered hub set) is not compared.

    Entries pair by role, name and place among the entries of that role and name: ``commonsense_test`` is one
    held-out name for seven files, which paired by name alone were each compared with the last one's digest.
    """
    before = dict(zip(_entry_keys(recorded), recorded, strict=True))
    changed = []
    for key, entry in zip(_entry_keys(now), now, strict=True):
        old = before.get(key)
        if old is None or not old.get("sha256") or not entry.get("sha256") or old["sha256"] == entry["sha256"]:
            continue
        changed.append(
            f"{what} file {entry['name']} ({entry.get('resolved', entry['file'])}: SHA-256 {entry['sha256'][:12]}... "
            f"now, {old['sha256'][:12]}... when the run read {old.get('resolved', old['file'])})"
        )
    return changed


def _entry_keys(entries: list[dict]) -> list[tuple]:
    """``(role, name, n)`` of each entry: its role, its name, and how many entries of that role and name come first."""
    seen: dict[tuple, int] = {}
    keys = []
    for entry in entries:
        key = (entry.get("role"), entry.get("name"))
        keys.append((*key, seen.get(key, 0)))
        seen[key] = seen.get(key, 0) + 1
    return keys


def _read_summary(summary_file: Path) -> dict:
    """The summary (or index) of a finished run (``ckpt_path=auto`` returns it instead of running again).

    Raises:
        RunDirError: The file is not a JSON object (torn by a disk or edited: it is written atomically); the message
            says how to get it again.
    """
    try:
        summary = json.loads(summary_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
    else:
        if isinstance(summary, dict):
            return summary
        reason = f"a JSON {type(summary).__name__}, not an object"
    # Not "delete it and resume": the finished run's metrics.csv holds its final rows, which a resume would replay.
    run_dir = summary_file.parent
    if (run_dir / "adapter").is_dir():  # a trained run
        fix = (
            f"Restore it, evaluate the run again in a directory of its own with python run.py mode=eval run_dir="
            f"{run_dir}, or train it again with overwrite=true (without ckpt_path)"
        )
    else:
        fix = "Restore it, or run it again with overwrite=true (without ckpt_path)"
    raise RunDirError(f"{summary_file} cannot be read ({reason}): it is damaged. {fix}")


def config_differences(saved, current, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs (`COMMAND_KEYS` and `LOCATION_KEYS` at the top level are
    ignored; a path under one of a config's ``paths.*`` compares as relative to it: `_relative_to_paths`)."""
    if not prefix:
        saved, current = _relative_to_paths(saved), _relative_to_paths(current)
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(set(saved) | set(current), key=str)
        return [
            diff
            for key in keys
            if prefix or key not in COMMAND_KEYS | LOCATION_KEYS
            for diff in config_differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        ]
    return [] if saved == current else [prefix.removesuffix(".")]


def _relative_to_paths(cfg):
    """``cfg`` with every string of its data and evaluation settings (`CHECKED_BY_DIGEST`) that is one of its own
    ``paths.*`` values, or a path under one, spelled as the interpolation it came from
    (``/old/checkout/examples/x.json`` -> ``${paths.root}/examples/x.json``): a task's ``path: ${paths.root}/...`` is
    resolved before the config is saved, and made a moved checkout another run.

    Only there: what those files hold is checked by digest (the checkpoint's training sources and items, the finished
    run's summary: `check_same_files`), while ``run_dir``, ``adapter``, ``adapters`` or a model path under
    ``paths.output_dir`` of another value name other weights, which nothing compares. A ``paths.*`` value of ``/``
    (nothing once its trailing slash is dropped) is no base: every absolute path is under it.
    """
    if not isinstance(cfg, dict) or not isinstance(cfg.get("paths"), dict):
        return cfg
    # Longest first: data_dir (root/data) before root, so both configs spell a file the same way.
    values = {key: value.rstrip("/") for key, value in cfg["paths"].items() if isinstance(value, str)}
    bases = sorted(((value, key) for key, value in values.items() if value), key=lambda pair: -len(pair[0]))

    def spelled(value):
        if isinstance(value, dict):
            return {key: spelled(item) for key, item in value.items()}
        if isinstance(value, list):
            return [spelled(item) for item in value]
        if isinstance(value, str):
            for base, key in bases:
                if value == base or value.startswith(base + "/"):
                    return "${paths." + key + "}" + value[len(base) :]
        return value

    return {key: spelled(value) if key in CHECKED_BY_DIGEST else value for key, value in cfg.items()}


def _check_fresh(cfg: dict, run_dir: Path) -> None:
    present = _outputs(run_dir)
    if not present:
        return
    if cfg.get("overwrite"):
        aside = run_dir / DISPLACED
        aside.mkdir()  # `prepare_run_dir` settled any earlier one first
        for name in [*present, COMMAND_RECORD] if (run_dir / COMMAND_RECORD).is_dir() else present:
            os.replace(run_dir / name, aside / name)
        return
    if (run_dir / CHECKPOINT).is_file() and not (run_dir / "summary.json").is_file():
        raise RunDirError(
            f"{run_dir} holds an interrupted run ({CHECKPOINT}); starting over would discard it. Resume it with: "
            f"{resume_command(run_dir)} (or pass overwrite=true to delete it and start over)"
        )
    raise RunDirError(
        f"{run_dir} already holds a run's outputs ({', '.join(present)}); give this run its own directory "
        "(hydra.run.dir=...), resume it with ckpt_path=auto, or pass overwrite=true to replace them"
    )


def settle_overwrite(run_dir: Path) -> None:
    """After a command, and before the next (for one killed mid-command): deletes the outputs ``overwrite=true``
    moved aside once the new run has written outputs of its own (finished, failed or interrupted, it replaced the old
    run), and puts them back when it wrote none (refused by a later check: a budget that gives no unit, overlapping
    data, a model that does not load)."""
    aside = run_dir / DISPLACED
    if rank_zero_only.rank != 0 or not aside.is_dir():
        return
    if _outputs(run_dir):
        shutil.rmtree(aside)
        return
    # A record here now is the refused command's (the old run's, if it had one, is aside): it makes way.
    shutil.rmtree(run_dir / COMMAND_RECORD, ignore_errors=True)
    for entry in aside.iterdir():
        os.replace(entry, run_dir / entry.name)
    aside.rmdir()


def write_command_record(run_dir: Path, record: Mapping[str, str]) -> None:
    """Write Hydra's record of the accepted command (file name -> YAML text) into ``run_dir/.hydra/``, atomically
    file by file; DDP ranks other than 0 write nothing."""
    if rank_zero_only.rank != 0:
        return
    folder = run_dir / COMMAND_RECORD
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in record.items():
        atomic_write(folder / name, lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8"))


def _outputs(run_dir: Path) -> list[str]:
    """The run outputs present in ``run_dir`` (`OUTPUTS`), in that order."""
    return [name for name in OUTPUTS if (run_dir / name).exists()]


def honour_umask(folder: Path) -> None:
    """Give the files under ``folder`` the mode a plain ``open()`` would (0666 less the umask).

    safetensors writes its files as 0600, which would keep a saved adapter or merged model from a group sharing runs.
    """
    umask = os.umask(0)
    os.umask(umask)
    for file in folder.rglob("*"):
        if file.is_file():
            file.chmod(0o666 & ~umask)
