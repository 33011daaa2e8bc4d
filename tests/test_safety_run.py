"""Bad input against the runner's run directory: every refused command names the problem and the fix and leaves the
directory (checkpoints, metrics.csv, config.yaml) byte-identical; a later correct command still gives the result of an
uninterrupted run. Also: the stop on a non-finite loss, overwrite=true, and the training-data provenance."""

import csv
import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DATA, ROOT, adapter_tensors, logged, smoke_config

from s2ft.config import S2FTConfigError
from s2ft.data.overlap import DataOverlapError
from s2ft.data.records import DataError
from s2ft.data.sources import describe_train_sources
from s2ft.lightning import FineTuneModule, callbacks, run_experiment, runner
from s2ft.lightning import evaluation as lightning_evaluation
from s2ft.lightning.callbacks import RunInterrupted, TrainingDiverged
from s2ft.lightning.checkpoint import CheckpointError, read_checkpoint
from s2ft.lightning.loggers import ResumableCSVLogger
from s2ft.lightning.provenance import check_eval_overlap
from s2ft.lightning.run_dir import DISPLACED, RunDirError
from s2ft.run_config import RunConfigError

# 40 training items in batches of 4; checkpoints every 2 steps, validation every 3 (so once at a checkpoint's step).
OVERRIDES = ("trainer.max_steps=6", "trainer.checkpoint_every_n_steps=2", "trainer.val_check_interval=3")
COMMONSENSE_MIX = ["boolq", "arc_easy", "arc_challenge", "openbookqa"]


def config(*overrides: str) -> dict:
    return smoke_config(*OVERRIDES, *overrides, logger="csv")


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file under `run_dir` (path -> bytes)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def step_of(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted run ("finished") and the same run stopped by SIGTERM during step 3 ("interrupted")."""
    base = tmp_path_factory.mktemp("runs")
    run_experiment(config(), base / "finished")
    original = FineTuneModule.on_train_batch_end

    def on_train_batch_end(self, outputs, batch, batch_idx):
        original(self, outputs, batch, batch_idx)
        if self.trainer.global_step == 2:  # the signal arrives while step 3 runs: it finishes, then the run stops
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FineTuneModule, "on_train_batch_end", on_train_batch_end)
        with pytest.raises(RunInterrupted):
            run_experiment(config(), base / "interrupted")
    checkpoints = base / "interrupted" / "checkpoints"
    assert (step_of(checkpoints / "last.ckpt"), step_of(checkpoints / "previous.ckpt")) == (3, 2)
    return {"finished": base / "finished", "interrupted": base / "interrupted"}


@pytest.fixture
def copy_of(runs, tmp_path):
    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(runs[name], target)
        return target

    return copy


def truncate(ckpt: Path) -> None:
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])


def empty(ckpt: Path) -> None:
    ckpt.write_bytes(b"")


def random_bytes(ckpt: Path) -> None:
    ckpt.write_bytes(random.Random(0).randbytes(4096))


class Payload:
    """Unpickling this runs a shell command (the marker file proves whether it ran)."""

    marker: Path

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious(ckpt: Path) -> None:
    Payload.marker = ckpt.parent / "pwned"
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "s2ft": Payload()}, ckpt)


def not_a_checkpoint(ckpt: Path) -> None:
    torch.save({"state_dict": [1, 2], "global_step": 3, "loops": {}, "optimizer_states": []}, ckpt)


def legacy(ckpt: Path) -> None:
    """A checkpoint without the stored run config, in a directory that lost its config.yaml."""
    state = torch.load(ckpt, weights_only=True)
    del state["run_config"]
    torch.save(state, ckpt)
    (ckpt.parent.parent / "config.yaml").unlink()


def torn_summary(ckpt: Path) -> None:
    """summary.json cut short (it is written atomically: a disk or a user tore it)."""
    summary = ckpt.parent.parent / "summary.json"
    summary.write_text(summary.read_text()[:100])


def emptied_config(ckpt: Path) -> None:
    (ckpt.parent.parent / "config.yaml").write_text("")


def garbled_config(ckpt: Path) -> None:
    (ckpt.parent.parent / "config.yaml").write_bytes(random.Random(0).randbytes(256))


PREVIOUS_FIX = r"resume from it with python run\.py <same overrides> hydra\.run\.dir=\S+ ckpt_path=\S+previous\.ckpt"
UNREADABLE = r"last\.ckpt cannot be loaded safely .*" + PREVIOUS_FIX
OTHER = RunConfigError
# (run directory, change made to its last.ckpt first, overrides, error, message)
CASES = {
    "seed": ("interrupted", None, ["seed=1", "ckpt_path=last"], OTHER, r"differs in method\.options\.seed, seed\)"),
    "lr": ("interrupted", None, ["method.lr=0.0005", "ckpt_path=last"], OTHER, r"differs in method\.lr\); give"),
    "batch_size": ("interrupted", None, ["data.batch_size=2", "ckpt_path=last"], OTHER, r"differs in data\.batch_size"),
    "method": ("interrupted", None, ["method=lora", "ckpt_path=last"], OTHER, r"differs in method\.lr, method\.name"),
    "auto_other_config": ("interrupted", None, ["seed=1", "ckpt_path=auto"], OTHER, r"auto: \S+ holds a run of"),
    "truncated": ("interrupted", truncate, ["ckpt_path=last"], CheckpointError, UNREADABLE),
    "empty": ("interrupted", empty, ["ckpt_path=last"], CheckpointError, UNREADABLE),
    "random_bytes": ("interrupted", random_bytes, ["ckpt_path=last"], CheckpointError, UNREADABLE),
    "malicious_pickle": (
        "interrupted", malicious, ["ckpt_path=last"], CheckpointError,
        r"holds objects other than tensors and plain values, which are never unpickled",
    ),
    "not_a_checkpoint": (
        "interrupted", not_a_checkpoint, ["ckpt_path=last"], CheckpointError,
        r"last\.ckpt is not a checkpoint of this runner \(bad state_dict or loops\)\. .*" + PREVIOUS_FIX,
    ),
    "legacy_other_method": (
        "interrupted", legacy, ["method=lora", "ckpt_path=last"], CheckpointError,
        r"does not fit this run's trained tensors \(missing .*lora.*another method or selection",
    ),
    "legacy_other_batch_size": (
        "interrupted", legacy, ["data.batch_size=16", "ckpt_path=last"], CheckpointError,
        r"stopped after batch 3 of an epoch, but an epoch of this run has only 2 batches: .*data\.batch_size",
    ),
    "fresh_over_interrupted": (
        "interrupted", None, [], RunDirError,
        r"holds an interrupted run .*Resume it with: python run\.py <same overrides> hydra\.run\.dir=\S+ ckpt_path=la",
    ),
    "fresh_over_finished": (
        "finished", None, ["method=lora"], RunDirError,
        r"already holds a run's outputs \(config\.yaml, .*adapter.*\); .*overwrite=true",
    ),
    "eval_over_finished": ("finished", None, ["mode=eval", "method=none"], RunDirError, r"already holds a run's"),
    "resume_finished": (
        "finished", None, ["ckpt_path=last"], RunDirError,
        r"ckpt_path=last but \S+ holds a finished run \(summary\.json\), so there is nothing to resume; ckpt_path=auto",
    ),
    "auto_torn_summary": (
        "finished", torn_summary, ["ckpt_path=auto"], RunDirError,
        r"summary\.json cannot be read \(.*\): it is damaged\. Restore it, evaluate the run again in a directory of "
        r"its own with python run\.py mode=eval run_dir=\S+, or train it again with overwrite=true",
    ),
    "emptied_config": (
        "interrupted", emptied_config, ["ckpt_path=last"], RunDirError,
        r"config\.yaml holds no run config \(a YAML mapping\), but None; restore it or start in a new directory",
    ),
    "garbled_config": (
        "interrupted", garbled_config, ["ckpt_path=auto"], RunDirError,
        r"config\.yaml cannot be read \(.*\); restore it or start in a new directory",
    ),
    "overwrite_and_resume": (
        "interrupted", None, ["overwrite=true", "ckpt_path=last"], RunConfigError,
        r"overwrite=true deletes .* but ckpt_path=last resumes",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_refused_command_names_the_fix_and_leaves_the_run_directory_as_it_was(case, copy_of):
    source, change, overrides, error, message = CASES[case]
    run_dir = copy_of(source)
    if change is not None:
        change(run_dir / "checkpoints" / "last.ckpt")
    before = snapshot(run_dir)
    with pytest.raises(error, match=message):
        run_experiment(config(*overrides), run_dir)
    assert snapshot(run_dir) == before
    assert not (run_dir / "checkpoints" / "pwned").exists()  # the malicious checkpoint's payload never ran


def test_a_checkpoint_refused_after_the_before_evaluation_leaves_the_directory_as_it_was(copy_of):
    """The checkpoint's tensors are checked against the prepared model, after eval.before measured the untrained one;
    that measurement must not land in the directory of a refused resume."""
    run_dir = copy_of("interrupted")
    legacy(run_dir / "checkpoints" / "last.ckpt")
    before = snapshot(run_dir)
    evaluated = ["eval.tasks=[boolq]", "eval.limit=2", "eval.before=true", "eval.heldout=[]"]
    with pytest.raises(CheckpointError, match=r"does not fit this run's trained tensors \(missing .*lora"):
        run_experiment(config("method=lora", "ckpt_path=last", *evaluated), run_dir)
    assert snapshot(run_dir) == before and not (run_dir / "before").exists()


def test_a_training_set_smaller_than_one_batch_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """Before, a user's file of 10 items (2 left after data.val_size=8, for batches of 4) passed the config check, which
    counts items only under data.limit=48: the model loaded, the untrained one was evaluated, config.yaml, metrics.csv
    and before/ were written, and only then did fit refuse it, advising to raise data.limit."""
    train = tmp_path / "small.jsonl"
    train.write_text("".join(json.dumps({"instruction": f"Q{i}?", "output": f"A{i}."}) + "\n" for i in range(10)))
    monkeypatch.setattr(runner, "build_run_model", lambda *args: pytest.fail("the model was loaded"))
    run_dir = tmp_path / "run"
    message = (
        r"^2 training items \(of 10, data.val_size=8 held out\) cannot fill one batch of data.batch_size=4 on 1 "
        r"process\(es\); lower data.batch_size or data.val_size, or train on more items$"
    )
    with pytest.raises(DataError, match=message):
        run_experiment(config(f"data.train=[{train}]", "eval.before=true", "eval.tasks=[boolq]"), run_dir)
    assert not run_dir.exists() or snapshot(run_dir) == {}


def test_a_fractional_val_interval_inside_an_optimizer_step_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """The config check refuses an int val_check_interval that is no multiple of accumulate_grad_batches; a fraction
    passed, and Lightning validated every int(fraction * batches) batches, inside an accumulation."""
    train = tmp_path / "items.jsonl"
    train.write_text("".join(json.dumps({"instruction": f"Q{i}?", "output": f"A{i}."}) + "\n" for i in range(40)))
    monkeypatch.setattr(runner, "build_run_model", lambda *args: pytest.fail("the model was loaded"))
    run_dir = tmp_path / "run"
    trained = (f"data.train=[{train}]", "data.val_size=8", "data.batch_size=2", "trainer.accumulate_grad_batches=4")
    message = (
        r"^trainer.val_check_interval=0.4 is 6 of an epoch's 16 training batches, not a multiple of "
        r"trainer.accumulate_grad_batches=4: validation would run inside an optimizer step; give it as a batch count, "
        r"trainer.val_check_interval=4 or 8$"
    )
    with pytest.raises(RunConfigError, match=message):
        run_experiment(config(*trained, "trainer.val_check_interval=0.4"), run_dir)
    assert not run_dir.exists() or snapshot(run_dir) == {}
    # Whole optimizer steps between validations, validation only at an epoch's end, or no accumulation: accepted.
    for interval, accumulate, per_epoch in [(0.5, 4, 16), (1.0, 4, 15), (0.3, 4, 40), (0.4, 1, 16)]:
        runner.check_val_fraction({"val_check_interval": interval, "accumulate_grad_batches": accumulate}, per_epoch)
    runner.check_val_fraction({"val_check_interval": 6, "accumulate_grad_batches": 4}, 16)  # the config check's own


def test_training_text_holding_a_special_token_is_refused_before_anything_is_written(tmp_path):
    """Only the tokenizer knows its special tokens, so the check runs once the model loads: before the untrained model
    is measured, the run directory is made or any file is written, for the training items and every evaluated set."""
    train = tmp_path / "train.jsonl"
    rows = [{"instruction": f"Q{i}?", "output": f"A{i}."} for i in range(40)]
    rows[7]["output"] = "A7.</s> More after the end."
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"instruction": "<s>Why?", "output": "Because."}) + "\n")
    definition = tmp_path / "mine.yaml"
    definition.write_text(json.dumps({"name": "mine", "path": str(heldout), "answer": "text"}))
    run_dir = tmp_path / "run"
    overrides = (f"data.train=[{train}]", f"eval.heldout=[{definition}]", "eval.before=true", "eval.tasks=[boolq]")
    message = (
        r"^data.train: 1 item\(s\) hold the tokenizer's special token\(s\) </s> in their text: \S+ \(output\)\. .*\n"
        r"eval.heldout mine: 1 item\(s\) hold the tokenizer's special token\(s\) <s> in their text: "
    )
    with pytest.raises(DataError, match=message):
        run_experiment(config(*overrides), run_dir)
    assert not run_dir.exists()


def test_evaluated_text_holding_a_special_token_is_refused_before_training(tmp_path):
    """Before, the runner checked the overlap sets (data.overlap_tasks), not eval.tasks, and no task's options: with
    eval.before=false a loglik option holding "</s>" was refused only by evaluate, once training had run."""
    options = tmp_path / "mc.jsonl"
    options.write_text(json.dumps({"instruction": "Which?", "options": ["blue", "red</s>"], "answer": "A"}) + "\n")
    task = tmp_path / "mc.yaml"
    task.write_text(json.dumps({"name": "mc", "path": str(options), "answer": "letter", "mode": "loglik"}))
    run_dir = tmp_path / "run"
    overrides = (f"eval.tasks=[{task}]", "data.overlap_tasks=[boolq]", "eval.before=false", "eval.heldout=[]")
    message = (
        r"^eval task mc: 1 item\(s\) hold the tokenizer's special token\(s\) </s> in their text: mc-0 \(option B\)\. "
    )
    with pytest.raises(DataError, match=message):
        run_experiment(config(*overrides), run_dir)
    assert not run_dir.exists()


def test_eval_mode_refuses_a_special_token_before_writing_or_evaluating(tmp_path, monkeypatch):
    """Before, mode=eval wrote config.yaml and evaluated every task before the held-out set's "<s>" was refused: the
    directory then held a run's outputs, so the corrected command needed overwrite=true."""
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"instruction": "<s>Why?", "output": "Because."}) + "\n")
    definition = tmp_path / "mine.yaml"
    definition.write_text(json.dumps({"name": "mine", "path": str(heldout), "answer": "text"}))
    measured, measure = [], lightning_evaluation.measure_model
    monkeypatch.setattr(lightning_evaluation, "measure_model", lambda *args: measured.append(args) or measure(*args))
    run_dir = tmp_path / "eval"
    overrides = ("mode=eval", "method=none", "eval.tasks=[boolq]", "eval.limit=2", f"eval.heldout=[{definition}]")
    with pytest.raises(
        DataError, match=r"^eval.heldout mine: 1 item\(s\) hold the tokenizer's special token\(s\) <s> "
    ):
        run_experiment(config(*overrides), run_dir)
    assert not run_dir.exists() and measured == []


def test_resume_without_a_checkpoint_names_the_path_and_writes_nothing(tmp_path):
    with pytest.raises(RunDirError, match=r"ckpt_path=last but \S+last\.ckpt does not exist.*hydra\.run\.dir="):
        run_experiment(config("ckpt_path=last"), tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_resumes_after_refused_ones_match_the_uninterrupted_run(runs, copy_of):
    run_dir = copy_of("interrupted")
    for refused in (["seed=1", "ckpt_path=last"], ["data.batch_size=2", "ckpt_path=last"], []):
        with pytest.raises((RunConfigError, RunDirError)):
            run_experiment(config(*refused), run_dir)
    resumed = run_experiment(config("ckpt_path=last"), run_dir)
    full = json.loads((runs["finished"] / "summary.json").read_text())
    assert resumed["train"]["loss_curve"] == full["train"]["loss_curve"] and len(full["train"]["loss_curve"]) == 6
    assert logged(run_dir) == pytest.approx(logged(runs["finished"]))
    # The whole metrics.csv, timings aside: no row twice (the session's first row), values written as logged.
    assert csv_rows(run_dir) == csv_rows(runs["finished"])
    expected = adapter_tensors(runs["finished"])
    assert all(torch.equal(expected[key], tensor) for key, tensor in adapter_tensors(run_dir).items())


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    """The rows of a run's metrics.csv without the columns that vary between sessions (pace, memory, wall time)."""
    with (run_dir / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    timing = ("tokens_per_s", "peak_mem_mb", "wall_s")
    return [{k: v for k, v in row.items() if v != "" and not k.endswith(timing)} for row in rows]


def test_a_torn_last_checkpoint_costs_only_the_steps_after_the_previous_one(runs, copy_of):
    run_dir = copy_of("interrupted")
    truncate(run_dir / "checkpoints" / "last.ckpt")
    with pytest.raises(CheckpointError, match=PREVIOUS_FIX):
        run_experiment(config("ckpt_path=last"), run_dir)
    previous = run_dir / "checkpoints" / "previous.ckpt"
    resumed = run_experiment(config(f"ckpt_path={previous}"), run_dir)
    full = json.loads((runs["finished"] / "summary.json").read_text())
    assert resumed["train"]["loss_curve"] == full["train"]["loss_curve"]
    assert logged(run_dir) == pytest.approx(logged(runs["finished"]))
    expected = adapter_tensors(runs["finished"])
    assert all(torch.equal(expected[key], tensor) for key, tensor in adapter_tensors(run_dir).items())
    assert step_of(run_dir / "checkpoints" / "last.ckpt") == 6


def test_a_resume_on_an_edited_training_file_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """Before, the resumed run trained on the edited file's items from the old position: neither the same data nor
    a fresh run, and its summary recorded only the new file's digest."""
    data = tmp_path / "mine.jsonl"
    records = [json.dumps({"instruction": f"What is {i} + 1?", "output": str(i + 1)}) for i in range(40)]
    data.write_text("\n".join(records) + "\n")
    overrides = [f"data.train=[{data}]"]
    original = FineTuneModule.on_train_batch_end

    def on_train_batch_end(self, outputs, batch, batch_idx):
        original(self, outputs, batch, batch_idx)
        if self.trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(FineTuneModule, "on_train_batch_end", on_train_batch_end)
    run_dir = tmp_path / "run"
    with pytest.raises(RunInterrupted):
        run_experiment(config(*overrides), run_dir)
    monkeypatch.setattr(FineTuneModule, "on_train_batch_end", original)
    data.write_text("\n".join([records[1], records[0], *records[2:]]) + "\n")  # the same items, another order
    before = snapshot(run_dir)
    with pytest.raises(
        CheckpointError, match=rf"written while {data} had other contents \(SHA-256 \w{{12}}\.\.\., now"
    ):
        run_experiment(config(*overrides, "ckpt_path=last"), run_dir)
    assert snapshot(run_dir) == before
    data.write_text("\n".join(records) + "\n")
    assert run_experiment(config(*overrides, "ckpt_path=last"), run_dir)["train"]["steps"] == 6


def test_overwrite_clears_the_old_run_first(copy_of):
    run_dir = copy_of("finished")
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("old: true\n")
    record = {"overrides.yaml": "- method=lora\n"}
    summary = run_experiment(config("method=lora", "overwrite=true", "trainer.max_steps=2"), run_dir, record)
    assert summary["method"] == "lora" and summary["train"]["steps"] == 2
    adapter = sorted(p.name for p in (run_dir / "adapter").iterdir())
    assert adapter == ["README.md", "adapter_config.json", "adapter_model.safetensors", "training_data.json"]
    peft_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert peft_config["base_model_name_or_path"] == "tiny_llama"
    # The old run's checkpoints went with it: previous.ckpt, if any, is the new run's.
    assert all(step_of(f) <= 2 for f in (run_dir / "checkpoints").glob("*.ckpt"))
    assert {step for _, step in logged(run_dir)} == {0, 1}  # two steps, logged from 0
    # Hydra's record of the old run's command went with the old run; the new command's replaced it.
    assert [p.name for p in (run_dir / ".hydra").iterdir()] == ["overrides.yaml"]
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == "- method=lora\n"
    assert not (run_dir / DISPLACED).exists()  # the old outputs are gone once the new run has written its own


def test_hydras_record_is_the_accepted_commands(copy_of):
    """`.hydra/` records the command that last ran in the directory: an accepted resume writes its own; a finished
    run skipped by ckpt_path=auto keeps the one that trained it."""
    record = {"config.yaml": "seed: 0\n", "overrides.yaml": "- ckpt_path=auto\n"}
    finished = copy_of("finished")
    (finished / ".hydra").mkdir()
    (finished / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    run_experiment(config("ckpt_path=auto"), finished, record)
    assert [p.name for p in (finished / ".hydra").iterdir()] == ["overrides.yaml"]
    assert (finished / ".hydra" / "overrides.yaml").read_text() == "- seed=0\n"
    interrupted = copy_of("interrupted")
    (interrupted / ".hydra").mkdir()
    (interrupted / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    # A resume refused after the directory's checks (the checkpoint of a GPU session, here a CPU) keeps it too.
    path = interrupted / "checkpoints" / "last.ckpt"
    good = path.read_bytes()
    ckpt = torch.load(path, weights_only=True)
    ckpt["s2ft"]["device_type"] = "cuda"
    torch.save(ckpt, path)
    before = snapshot(interrupted)
    with pytest.raises(CheckpointError, match="written on cuda"):
        run_experiment(config("ckpt_path=auto"), interrupted, record)
    assert snapshot(interrupted) == before
    path.write_bytes(good)
    run_experiment(config("ckpt_path=auto"), interrupted, record)
    assert {p.name: p.read_text() for p in (interrupted / ".hydra").iterdir()} == record
    evaluated = interrupted.parent / "evaluated"
    run_experiment(config("mode=eval", f"run_dir={interrupted}"), evaluated, record)
    assert {p.name: p.read_text() for p in (evaluated / ".hydra").iterdir()} == record


@pytest.mark.parametrize("refusal", ["no unit", "no record", "killed"])
def test_an_overwrite_refused_after_the_directory_check_leaves_the_old_run_as_it_was(copy_of, refusal, monkeypatch):
    """overwrite=true moves the old outputs aside; a command refused before the new run writes anything (a budget
    that gives no unit) puts them back, and so does the next command after one killed in that window."""
    run_dir = copy_of("finished")
    if refusal != "no record":
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "overrides.yaml").write_text("- seed=0\n")  # the old run's command
    before = snapshot(run_dir)
    cfg = config("overwrite=true", "method.options.ratios={o: 0.01}")
    cfg["method"]["options"]["match_lora"] = None
    if refusal == "killed":  # SIGKILL: no handler runs, the old outputs stay aside until the next command
        monkeypatch.setattr(runner, "settle_overwrite", lambda run_dir: None)
    with pytest.raises(S2FTConfigError, match="gives 0 of 20 units per layer"):
        run_experiment(cfg, run_dir, {"overrides.yaml": "- overwrite=true\n", "config.yaml": "new: true\n"})
    if refusal == "killed":
        assert sorted(p.name for p in run_dir.iterdir()) == [DISPLACED]
        with pytest.raises(RunDirError, match="already holds a run's outputs"):
            run_experiment(config(), run_dir)
    assert snapshot(run_dir) == before
    assert run_experiment(config(), run_dir / "elsewhere")  # and the run itself is fine in a directory of its own


@pytest.mark.parametrize("poisoned", ["loss", "update"])
def test_a_non_finite_state_stops_the_run_and_keeps_the_last_good_checkpoint(poisoned, tmp_path, monkeypatch):
    original = FineTuneModule.training_step

    def training_step(self, batch, batch_idx):  # step 3 goes wrong: a NaN loss, or a finite one with NaN gradients
        loss = original(self, batch, batch_idx)
        if self.trainer.global_step != 2:
            return loss
        if poisoned == "loss":
            self.last_loss = float("nan")
        return loss * float("nan")

    monkeypatch.setattr(FineTuneModule, "training_step", training_step)
    run_dir = tmp_path / "diverged"
    what = "the training loss is nan" if poisoned == "loss" else r"the trained tensor \S+ holds NaN/inf after"
    with pytest.raises(TrainingDiverged, match=rf"training diverged at step 3: {what}.*model\.dtype float32.*Lower"):
        run_experiment(config(), run_dir)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and all(t.isfinite().all() for t in ckpt["state_dict"].values())
    assert not (run_dir / "adapter").exists() and not (run_dir / "summary.json").exists()


def test_a_run_records_its_training_data_and_base_model(runs, caplog):
    summary = json.loads((runs["finished"] / "summary.json").read_text())
    record = summary["training_data"]
    assert [s["name"] for s in record["sources"]] == COMMONSENSE_MIX
    for source in record["sources"]:
        file = ROOT / "data" / source["file"]
        assert source["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert sum(s["items"] for s in record["sources"]) == record["train_items"] == 40 and record["val_items"] == 8
    assert (record["train"], record["limit"], record["seed"]) == (["commonsense_mix"], 48, 0)
    assert record["overlap_checked"] == []  # eval=none and no data.overlap_tasks: no guard ran (a warning says so)
    adapter_config = json.loads((runs["finished"] / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["training_data"] == record and adapter_config["base_model"] == "tiny_llama"
    umask = os.umask(0)
    os.umask(umask)
    for file in (runs["finished"] / "adapter").iterdir():
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file


def test_the_overlap_guard_warns_when_it_cannot_run_and_checks_the_named_tasks(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        run_experiment(config("trainer.max_steps=2"), tmp_path / "unguarded")
    assert "no train/test overlap guard ran" in caplog.text
    # eval=none does not switch the guard off when the tasks to guard are named.
    with pytest.raises(DataOverlapError, match=r"questions of the evaluation sets \(.*gsm8k"):
        run_experiment(config("data.train=[math_data]", "data.overlap_tasks=[arithmetic]"), tmp_path / "math")
    assert not (tmp_path / "math").exists()


def test_evaluating_on_the_training_questions_is_refused_like_training_on_them(tmp_path):
    trained = tmp_path / "math"
    run_experiment(config("data.train=[math_data]", "trainer.max_steps=2"), trained)
    evaluate = ["mode=eval", f"run_dir={trained}", "eval=arithmetic", "eval.heldout=[]"]
    with pytest.raises(DataOverlapError, match=rf"{trained}/adapter was trained on math_data, .*allow_overlap=true"):
        run_experiment(config(*evaluate), tmp_path / "eval")
    assert not (tmp_path / "eval").exists()
    summary = run_experiment(config(*evaluate, "data.allow_overlap=true", "eval.limit=1"), tmp_path / "eval")
    assert summary["training_data"]["sources"][0]["name"] == "math_data" and len(summary["eval"]) == 7


def test_a_held_out_set_sharing_training_items_is_refused_before_anything_is_written(tmp_path, caplog):
    """Before, eval.heldout was not checked against the training data (training and evaluation went ahead, the
    held-out loss measured on training items); now it is refused as an evaluation task sharing them is."""
    records = [{"instruction": f"What is {i} + {i}?", "output": str(2 * i)} for i in range(12)]
    train, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    heldout.write_text(
        "".join(json.dumps(r) + "\n" for r in [{"instruction": "Name a colour.", "output": "red"}, *records[3:5]])
    )
    overrides = [
        f"data.train=[{train}]",
        "data.val_size=0",
        f"eval.heldout=[{{name: mine, path: {heldout}, answer: text}}]",
    ]
    with pytest.raises(DataOverlapError) as err:
        run_experiment(config(*overrides), tmp_path / "run")
    assert "held-out sets (mine 2/3; e.g. mine-1 = training train-3, mine-2 = training train-4), whose loss" in str(
        err.value
    )
    assert not (tmp_path / "run").exists()
    # The same opt-in as for evaluation tasks, and the record names the held-out sets the guard checked.
    with caplog.at_level(logging.WARNING):
        summary = run_experiment(config(*overrides, "data.allow_overlap=true", "trainer.max_steps=2"), tmp_path / "run")
    assert (
        "held-out sets (mine 2/3; e.g." in caplog.text
        and "the train/test overlap guard checked only eval.heldout" in caplog.text
    )
    assert summary["training_data"]["overlap_checked"] == ["heldout:mine"]
    # mode=eval checks the adapter's training items against eval.heldout too, with no eval.tasks.
    evaluate = ["mode=eval", f"run_dir={tmp_path / 'run'}", overrides[2]]
    with pytest.raises(
        DataOverlapError,
        match=r"adapter was trained on train, which contains questions of the held-out sets \(mine 2/3; ",
    ):
        run_experiment(config(*evaluate), tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_a_user_file_edited_since_training_is_named_when_its_path_is_relative(tmp_path, monkeypatch, caplog):
    """Before, the recorded file was looked up under paths.data_dir only, so a user's file given relative to the
    working directory (the README's data.train=[examples/user_data/train.jsonl]) was never found there and its
    edits since training went unreported."""
    monkeypatch.chdir(tmp_path)
    train = Path("train.jsonl")
    train.write_text(json.dumps({"instruction": "What is 2 + 2?", "output": "4"}) + "\n")
    record = {"train": [str(train)], "limit": None, "seed": 0, "sources": describe_train_sources([str(train)], DATA)}
    assert record["sources"][0]["file"] == "train.jsonl"
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"instruction": "Name a colour.", "output": "red"}) + "\n")
    cfg = {"eval": {"tasks": [{"name": "t", "path": str(test), "answer": "text"}]}, "paths": {"data_dir": str(DATA)}}
    cfg["data"] = {}
    with caplog.at_level(logging.WARNING):
        check_eval_overlap(record, tmp_path / "adapter", cfg)
    assert "changed since" not in caplog.text
    train.write_text(json.dumps({"instruction": "What is 3 + 3?", "output": "6"}) + "\n")
    with caplog.at_level(logging.WARNING):
        check_eval_overlap(record, tmp_path / "adapter", cfg)
    assert f"train.jsonl changed since {tmp_path / 'adapter'} was trained on it" in caplog.text


def test_an_adapter_trained_on_a_relative_path_is_guarded_from_another_working_directory(tmp_path, monkeypatch):
    """Before, the guard rebuilt the training items from data.train as given: evaluated from another working
    directory, train.jsonl was not found, a warning said the guard could not run, and the adapter was scored on the
    questions it was trained on."""
    (tmp_path / "project").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    Path("train.jsonl").write_text(json.dumps({"instruction": "What is 2 + 2?", "output": "4"}) + "\n")
    spec = ["train.jsonl", {"path": "train.jsonl", "name": "again"}]
    record = {"train": spec, "limit": None, "seed": 0, "sources": describe_train_sources(spec, DATA)}
    assert [s["resolved"] for s in record["sources"]] == [str(tmp_path / "project" / "train.jsonl")] * 2
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"instruction": "what is 2+2", "output": "4"}) + "\n")
    cfg = {"eval": {"tasks": [{"name": "t", "path": str(test), "answer": "text"}]}, "paths": {"data_dir": str(DATA)}}
    cfg["data"] = {}
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(DataOverlapError, match=r"adapter was trained on train, again, which contains questions of "):
        check_eval_overlap(record, tmp_path / "adapter", cfg)


def run_py(*overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "run.py", "debug=smoke", "eval=none", "logger=csv", *OVERRIDES, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


# Each run.py start takes 10-45 s on a shared CPU: one case runs by default, the others (and the signal stops below,
# whose in-process twins are in test_lightning_resume.py) with -m slow.
@pytest.mark.parametrize(
    ("change", "overrides", "message"),
    [
        pytest.param(
            None, ["seed=1", "ckpt_path=last"], r"error: ckpt_path=last: \S+ holds a run of another config \(differ",
            id="other_config", marks=pytest.mark.slow,
        ),
        pytest.param(
            truncate, ["ckpt_path=last"], r"error: checkpoint \S+last\.ckpt cannot be loaded safely", id="truncated",
        ),
        pytest.param(
            None, [], r"error: \S+ holds an interrupted run .*Resume it with: python run\.py <same overrides>",
            id="fresh_over_interrupted", marks=pytest.mark.slow,
        ),
    ],
)  # fmt: skip
def test_run_py_prints_one_error_and_exits_1(change, overrides, message, copy_of):
    run_dir = copy_of("interrupted")
    if change is not None:
        change(run_dir / "checkpoints" / "last.ckpt")
    (run_dir / ".hydra").mkdir()  # what run.py leaves beside a run: Hydra's record of its command, its job log
    (run_dir / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    (run_dir / "run.log").write_text("[...][s2ft.lightning.runner][INFO] - the first session\n")
    before = snapshot(run_dir)
    done = run_py(*overrides, f"hydra.run.dir={run_dir}")
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and re.search(message, error_lines[0]), done.stderr[-3000:]
    assert snapshot(run_dir) == before  # Hydra's record and the job log too: the refused command wrote nothing


@pytest.mark.parametrize(
    ("signum", "name"),
    [
        pytest.param(signal.SIGINT, r"Ctrl-C \(SIGINT\)", id="SIGINT", marks=pytest.mark.slow),
        pytest.param(signal.SIGTERM, "SIGTERM", id="SIGTERM", marks=pytest.mark.slow),
    ],
)
def test_run_py_stopped_by_a_signal_prints_the_resume_command_and_exits_1(signum, name, tmp_path):
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "run.py", "debug=smoke", "eval=none", "logger=csv", "trainer.max_steps=1000",
        "trainer.checkpoint_every_n_steps=1", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoints" / "last.ckpt").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.2)
    process.send_signal(signum)  # training runs: the first checkpoint is written
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    resume = rf"python run\.py <same overrides> hydra\.run\.dir={re.escape(str(run_dir))} ckpt_path=last"
    assert re.search(rf"^error: stopped by {name}; the checkpoint is saved, resume with: {resume}$", stderr, re.M)
    assert 1 <= step_of(run_dir / "checkpoints" / "last.ckpt") < 1000
    assert not (run_dir / "summary.json").exists()


def test_ctrl_c_outside_training_prints_the_command_that_continues_not_a_traceback(tmp_path):
    """Ctrl-C while the run evaluates (after training, its checkpoint written) reached Python's traceback; run.py
    names the command that continues instead, and that command finishes the run."""
    run_dir = tmp_path / "run"
    script = (
        "import runpy, sys\nfrom s2ft.lightning import runner\n"
        "def pressed(*args):\n    raise KeyboardInterrupt\n"
        "runner.measure_model = pressed\nsys.argv[0] = 'run.py'\nrunpy.run_path('run.py', run_name='__main__')\n"
    )
    overrides = ["debug=smoke", "eval=none", "logger=none", "trainer.max_steps=2"]
    command = [sys.executable, "-c", script, *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    resume = rf"python run\.py <same overrides> hydra\.run\.dir={re.escape(str(run_dir))} ckpt_path=auto"
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert re.fullmatch(rf"error: stopped by Ctrl-C \(SIGINT\); continue with: {resume}", errors[0])
    summary = run_experiment(smoke_config("trainer.max_steps=2", "ckpt_path=auto"), run_dir)
    assert summary["train"]["steps"] == 2 and (run_dir / "summary.json").is_file()


def test_the_csv_logger_does_not_warn_of_deleting_logs_in_a_checked_directory(tmp_path, recwarn):
    """Hydra's `.hydra/` makes every run directory non-empty; Lightning's "Previous log files ... will be deleted!"
    would then open every fresh run's first screen with a false alarm."""
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("{}\n")
    ResumableCSVLogger(tmp_path, resume=False).experiment  # noqa: B018  (the trainer creates the writer so)
    assert [str(w.message) for w in recwarn if "will be deleted" in str(w.message)] == []


@pytest.mark.parametrize("damage", ["truncated", "random", "legacy_torn", "pickle_torn"])
def test_a_damaged_checkpoint_message_quotes_only_what_failed_not_torchs_unsafe_advice(damage, tmp_path):
    """torch's error for a damaged file goes on to advise `weights_only=False` (the unsafe load the runner refuses);
    the message keeps its first sentence only. A file of torch's legacy format torn short, or a pickle torn after its
    first byte, failed in torch's reader with a struct.error or IndexError, a traceback."""
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": {"w": torch.zeros(64, 64)}}, ckpt, _use_new_zipfile_serialization=damage != "legacy_torn")
    if damage == "truncated":
        truncate(ckpt)
    elif damage == "random":
        ckpt.write_bytes(random.Random(0).randbytes(ckpt.stat().st_size))
    elif damage == "legacy_torn":
        ckpt.write_bytes(ckpt.read_bytes()[:18])
    else:
        ckpt.write_bytes(b"\x80")
    with pytest.raises(CheckpointError) as refused:
        read_checkpoint(ckpt)
    message = str(refused.value)
    reason = {"random": r"Weights only load failed"}.get(damage, r"[^.()]+")
    assert re.search(
        rf"^checkpoint {re.escape(str(ckpt))} cannot be loaded safely \({reason}\): it is truncated", message
    )
    assert "weights_only" not in message and "Start the run again in a new directory" in message


def test_a_run_that_fails_after_its_before_evaluation_leaves_nothing_that_blocks_its_retry(tmp_path):
    """A budget that gives no unit fails after the untrained model was evaluated: no before/ is left behind, so the
    same command in the same directory fails with the same clean error instead of refusing the directory."""
    cfg = config("eval.tasks=[boolq]", "eval.before=true", "eval.limit=2", "method.options.ratios={o: 0.01}")
    cfg["method"]["options"]["match_lora"] = None
    run_dir = tmp_path / "run"
    for _ in range(2):
        with pytest.raises(S2FTConfigError, match="gives 0 of 20 units per layer"):
            run_experiment(cfg, run_dir)
        assert not (run_dir / "before").exists() and not (run_dir / ".before.partial").exists()


def test_a_second_command_in_a_run_directory_in_use_is_refused_before_it_touches_it(copy_of):
    """Two commands in one directory (a sweep started twice, a requeued job whose first copy still runs) would resume
    the same checkpoint and write one `.last.ckpt.tmp`, metrics.csv and adapter at once."""
    run_dir = copy_of("interrupted")
    before = snapshot(run_dir)
    holder = os.open(run_dir, os.O_RDONLY)  # the running command's lock (its own open file, as another process's)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(RunDirError, match=r"another process is running in \S+interrupted .*ckpt_path=auto$"):
            run_experiment(config("ckpt_path=auto"), run_dir)
        assert snapshot(run_dir) == before
    finally:
        os.close(holder)
    run_experiment(config("ckpt_path=auto"), run_dir)  # the lock went with the command that held it
    assert step_of(run_dir / "checkpoints" / "last.ckpt") == 6 and (run_dir / "summary.json").is_file()


def test_a_full_disk_while_checkpointing_keeps_the_one_before_and_names_the_fix(runs, tmp_path, monkeypatch):
    save, saves = torch.save, []

    def full_disk(obj, handle, *args, **kwargs):
        saves.append(obj["global_step"])
        if len(saves) == 2:  # the checkpoint of step 4: part of it is written, then the disk is full
            handle.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(callbacks.torch, "save", full_disk)
    run_dir = tmp_path / "job"
    message = (
        r"could not write checkpoint \S+last\.ckpt \(No space left on device\); the one before it is intact\. Free "
        r"space on that disk, then continue with: python run\.py <same overrides> hydra\.run\.dir=\S+ ckpt_path=auto$"
    )
    with pytest.raises(CheckpointError, match=message):
        run_experiment(config(), run_dir)
    monkeypatch.setattr(callbacks.torch, "save", save)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]  # no partial copy left
    assert step_of(run_dir / "checkpoints" / "last.ckpt") == 2
    run_experiment(config("ckpt_path=auto"), run_dir)
    assert logged(run_dir) == pytest.approx(logged(runs["finished"]))
    expected = adapter_tensors(runs["finished"])
    assert all(torch.equal(expected[key], tensor) for key, tensor in adapter_tensors(run_dir).items())
