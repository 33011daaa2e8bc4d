"""Loggers from the `logger` group: W&B offline with a run id kept in the run directory, CSV, none."""

import csv
import logging
from pathlib import Path

import pytest
from conftest import compose_run
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from s2ft.lightning import loggers
from s2ft.lightning.loggers import WANDB_ID_FILE, ResumableCSVLogger, build_logger, wandb_info

CFG = {"name": "exp", "seed": 3, "method": {"name": "s2ft"}, "model": {"name": "tiny_llama"}}


@pytest.mark.slow  # the W&B service takes ~20 s to start here
def test_wandb_is_offline_and_a_resumed_run_keeps_its_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")  # the config, not the environment, decides
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = build_logger({"name": "wandb", "project": "s2ft-test", "mode": "offline", "tags": ["t"]}, CFG, tmp_path)
    run = first.experiment
    assert run.offline and run.group == "exp" and run.name == "exp-s2ft-seed3"
    assert set(run.tags) == {"s2ft", "tiny_llama", "t"} and run.config["seed"] == 3
    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    assert run.id == run_id and wandb_info(first) == {"id": run_id, "dir": run.dir}
    assert run.dir.startswith(str(tmp_path / "wandb"))
    run.finish()
    again = build_logger({"name": "wandb", "mode": "offline"}, CFG | {"ckpt_path": "last"}, tmp_path)
    assert again.version == run_id
    again.experiment.finish()


def recorded_wandb(monkeypatch) -> list[dict]:
    """Stands a recorder in for the W&B logger (starting the W&B service takes ~20 s here); returns the keyword
    arguments of every logger built."""
    made = []

    class Recorder:
        def __init__(self, **kwargs):
            made.append(kwargs)

        def log_hyperparams(self, params):
            pass

    monkeypatch.setattr(loggers, "QuietWandbLogger", Recorder)
    return made


def test_only_a_resume_continues_the_wandb_run_of_its_directory(tmp_path, monkeypatch):
    """ckpt_path=auto starts over in a directory whose first attempt stopped before its first checkpoint: that is a
    new run (its metrics.csv is a new file), so it must not log into the failed attempt's W&B run."""
    made = recorded_wandb(monkeypatch)
    (tmp_path / WANDB_ID_FILE).write_text("oldrun12\n")
    build_logger({"name": "wandb"}, CFG | {"ckpt_path": None}, tmp_path)
    fresh = made[-1]["id"]
    assert fresh != "oldrun12" and len(fresh) == 8
    assert (tmp_path / WANDB_ID_FILE).read_text() == f"{fresh}\n"
    build_logger({"name": "wandb"}, CFG | {"ckpt_path": "/runs/x/checkpoints/last.ckpt"}, tmp_path)
    assert made[-1]["id"] == fresh and made[-1]["resume"] == "allow"


@pytest.mark.parametrize("name", ["csv", "none"])
def test_csv_and_none(tmp_path, name):
    logger = build_logger({"name": name}, CFG, tmp_path)
    if name == "none":
        assert logger is False
        return
    logger.log_metrics({"train/loss": 1.5}, step=0)
    logger.save()
    assert "train/loss" in (tmp_path / "metrics.csv").read_text()
    assert wandb_info(logger) is None


@pytest.mark.slow  # the W&B service takes ~20 s to start here
def test_each_run_in_one_process_gets_its_own_wandb_run(tmp_path, monkeypatch):
    """A Hydra multirun runs its jobs in one process: each job must log into its own W&B run, not the first one's."""
    import wandb

    from s2ft.lightning import run_experiment

    monkeypatch.setenv("WANDB_SILENT", "true")
    summaries = []
    for job in range(2):
        # debug=smoke logs to CSV, over logger=wandb; the key override comes after it.
        cfg = compose_run("debug=smoke", "eval=none", "logger=wandb", "logger.name=wandb", f"seed={job}")
        summaries.append(run_experiment(cfg, tmp_path / str(job)))
        assert wandb.run is None  # finished, so the next run cannot adopt it
    ids = [s["wandb"]["id"] for s in summaries]
    assert ids[0] != ids[1]
    for job, summary in enumerate(summaries):
        assert summary["wandb"]["id"] == (tmp_path / str(job) / WANDB_ID_FILE).read_text().strip()
        assert summary["wandb"]["dir"].startswith(str(tmp_path / str(job) / "wandb"))


def test_resumed_csv_logger_keeps_history_without_the_deletion_warning(tmp_path):
    import warnings

    first = build_logger({"name": "csv"}, CFG, tmp_path)
    for step in range(3):
        first.log_metrics({"train/loss": 2.0 - step}, step=step)
    first.save()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = build_logger({"name": "csv"}, CFG | {"ckpt_path": "last"}, tmp_path)
    assert not [w for w in caught if "will be deleted" in str(w.message)]
    assert [row["train/loss"] for row in resumed.history] == ["2.0", "1.0", "0.0"]
    resumed.replay(before_step=2)  # the checkpoint was at step 2: later rows are logged anew by training
    resumed.log_metrics({"train/loss": 0.5}, step=2)
    resumed.save()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[1:] == ["0,2.0", "1,1.0", "2,0.5"] and "train/loss" in rows[0]


def test_a_metrics_file_cut_short_loses_only_its_torn_row_on_resume(tmp_path, caplog):
    """A session killed while the CSV writer appended (or a machine that went down before the disk had the file's
    tail) leaves a last line cut short: reading it back stopped every resume with an AttributeError (a missing field
    is None), or would have replayed a number cut short as if it had been logged."""
    first = build_logger({"name": "csv"}, CFG, tmp_path)
    for step in range(3):
        first.log_metrics({"train/loss": 2.0 - step, "train/lr": 0.125}, step=step)
    first.save()
    metrics = tmp_path / "metrics.csv"
    whole = metrics.read_bytes()
    assert whole.endswith(b"2,0.0,0.125\r\n")
    metrics.write_bytes(whole[: -len(b".0,0.125\r\n")])  # "2,0": step 2's row, torn inside its loss
    with caplog.at_level(logging.WARNING):
        resumed = build_logger({"name": "csv"}, CFG | {"ckpt_path": "last"}, tmp_path)
    assert f"{metrics} ends in a row cut short (a session stopped while writing it): dropped" in caplog.text
    assert [row["step"] for row in resumed.history] == ["0", "1"]
    resumed.replay(before_step=3)
    resumed.log_metrics({"train/loss": 0.5, "train/lr": 0.125}, step=3)
    resumed.save()
    rows = metrics.read_text().splitlines()
    assert rows == ["step,train/loss,train/lr", "0,2.0,0.125", "1,1.0,0.125", "3,0.5,0.125"]


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resumed"])
def test_a_session_stopped_while_the_csv_header_grows_keeps_every_row(tmp_path, monkeypatch, resume):
    """A key logged for the first time (the first validation's val/loss, the final results) makes the writer rewrite
    metrics.csv under a wider header: it truncated the file in place and wrote it again, so a session stopped in
    between (killed, Ctrl-C) left a file without the rows logged before, which a resume then could not replay."""
    logger = build_logger({"name": "csv"}, CFG, tmp_path)
    for step in range(3):
        logger.log_metrics({"train/loss": 2.0 - step}, step=step)
    logger.save()
    if resume:  # the resumed session's replay wrote the file, then it logs a new key
        logger = build_logger({"name": "csv"}, CFG | {"ckpt_path": "last"}, tmp_path)
        logger.replay(before_step=3)
    metrics = tmp_path / "metrics.csv"
    written = metrics.read_bytes()
    logger.log_metrics({"val/loss": 1.5}, step=3)
    rows = csv.DictWriter.writerows

    def killed(self, rowdicts):
        raise KeyboardInterrupt  # the session stops while the rewrite writes the rows

    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    with pytest.raises(KeyboardInterrupt):
        logger.save()
    assert metrics.read_bytes() == written
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    monkeypatch.setattr(csv.DictWriter, "writerows", rows)
    logger.save()
    assert metrics.read_text().splitlines() == [
        "step,train/loss,val/loss", "0,2.0,", "1,1.0,", "2,0.0,", "3,,1.5"
    ]  # fmt: skip


def test_a_resume_leaves_the_wandb_id_file_as_it_was(tmp_path, monkeypatch):
    """Every session wrote wandb_id.txt again, in place, even a resume that only reads it: one stopped while writing
    left it empty, and the next resume then started a new W&B run instead of continuing the run's own."""
    made = recorded_wandb(monkeypatch)
    id_file = tmp_path / WANDB_ID_FILE
    build_logger({"name": "wandb"}, CFG | {"ckpt_path": None}, tmp_path)
    written = id_file.read_bytes()
    write_text = Path.write_text

    def stopped(self, text, *args, **kwargs):
        if WANDB_ID_FILE in self.name:  # the file (or its temporary twin) is opened, then the session stops
            write_text(self, "", *args, **kwargs)
            raise KeyboardInterrupt
        return write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", stopped)
    try:
        build_logger({"name": "wandb"}, CFG | {"ckpt_path": "last"}, tmp_path)
    except KeyboardInterrupt:
        pass
    assert id_file.read_bytes() == written
    assert made[-1]["id"] == written.decode().strip() and made[-1]["resume"] == "allow"
    with pytest.raises(KeyboardInterrupt):  # a fresh start writes a new id: stopped, it leaves the old file whole
        build_logger({"name": "wandb"}, CFG | {"ckpt_path": None}, tmp_path)
    assert id_file.read_bytes() == written and [p.name for p in tmp_path.iterdir()] == [WANDB_ID_FILE]


def test_rows_of_metrics_csv_damaged_inside_are_dropped_not_a_traceback(tmp_path, caplog):
    """A disk fault inside metrics.csv (bytes that are not UTF-8, a field that is no number) stopped every resume with
    a UnicodeDecodeError or ValueError traceback; the rows that read back are replayed, the others named."""
    first = build_logger({"name": "csv"}, CFG, tmp_path)
    for step in range(4):
        first.log_metrics({"train/loss": 2.0 - step, "train/lr": 0.125}, step=step)
    first.save()
    metrics = tmp_path / "metrics.csv"
    lines = metrics.read_bytes().split(b"\r\n")
    assert lines[2:4] == [b"1,1.0,0.125", b"2,0.0,0.125"]
    lines[2], lines[3] = b"1,1.0,0.1\xff5", b"2,0.0,0.1x5"
    metrics.write_bytes(b"\r\n".join(lines))
    with caplog.at_level(logging.WARNING):
        resumed = build_logger({"name": "csv"}, CFG | {"ckpt_path": "last"}, tmp_path)
    assert f"{metrics}: 2 damaged row(s) dropped (steps 1, 2)" in caplog.text
    resumed.replay(before_step=4)
    resumed.save()
    assert metrics.read_text().splitlines() == ["step,train/loss,train/lr", "0,2.0,0.125", "3,-1.0,0.125"]


@pytest.mark.parametrize("hook", ["_check_log_dir_exists", "_rewrite_with_new_header"])
def test_a_lightning_without_the_csv_writers_hooks_is_refused_not_bypassed(tmp_path, monkeypatch, hook):
    """The resume-safe metrics.csv replaces two private hooks of Lightning's writer: renamed by an upgrade, they would
    be skipped silently (the old in-place rewrite, and the deletion of a resumed run's rows, back)."""
    owner = next(cls for cls in ExperimentWriter.__mro__ if hook in vars(cls))  # fabric's writer, which it extends
    monkeypatch.delattr(owner, hook)
    with pytest.raises(RuntimeError, match=rf"CSV writer has no {hook}, .*pip install 'lightning>=2.4,<2.7'"):
        ResumableCSVLogger(tmp_path, resume=False)
