"""Exact resume: a run stopped by SIGTERM mid-epoch and resumed with ckpt_path=last ends with the same weights."""

import csv
import os
import re
import shutil
import signal
import statistics
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DATA, ROOT, adapter_tensors, compose_run, logged, smoke_config
from safetensors.torch import load_file

from s2ft.lightning import FineTuneModule, run_experiment, runner, summary
from s2ft.lightning.callbacks import RunInterrupted
from s2ft.lightning.checkpoint import CheckpointError
from s2ft.lightning.run_dir import RunDirError, config_differences
from s2ft.run_config import RunConfigError


@pytest.fixture
def stop_at_step(monkeypatch):
    """Make the run send itself a signal after optimizer step `n` (SIGTERM: a cluster preemption; SIGINT: Ctrl-C)."""

    def arm(n: int, signum: int = signal.SIGTERM):
        original = FineTuneModule.on_train_batch_end

        def on_train_batch_end(self, outputs, batch, batch_idx):
            original(self, outputs, batch, batch_idx)
            if self.trainer.global_step == n:
                os.kill(os.getpid(), signum)

        monkeypatch.setattr(FineTuneModule, "on_train_batch_end", on_train_batch_end)
        return monkeypatch

    return arm


def test_sigterm_checkpoint_then_resume_matches_uninterrupted_run(tmp_path, stop_at_step, recwarn):
    # 40 training items in batches of 4: 10 batches per epoch, so 13 steps cross an epoch boundary after the resume.
    overrides = ["trainer.max_steps=13", "trainer.checkpoint_every_n_steps=100", "trainer.val_check_interval=4"]
    full = run_experiment(smoke_config(*overrides, logger="csv"), tmp_path / "full")

    patch = stop_at_step(6)
    with pytest.raises(
        RunInterrupted, match=r"stopped by SIGTERM; the checkpoint is saved, resume with: .*ckpt_path=last"
    ):
        run_experiment(smoke_config(*overrides, logger="csv"), tmp_path / "resumed")
    patch.undo()
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 7  # the batch in flight when the signal came (step 7) finishes first
    assert ckpt["s2ft"]["wall_s"] > 0
    # Only what trains is stored (S2FT values and the small buffers of their layers), never a frozen base weight.
    stored = ckpt["state_dict"]
    assert any(k.endswith(".values") for k in stored) and not any(k.endswith("weight") for k in stored), list(stored)
    trainable = sum(v.numel() for k, v in stored.items() if k.endswith(".values"))
    assert sum(v.numel() for v in stored.values()) < 3 * trainable
    assert ckpt["optimizer_states"][0]["state"]
    assert not (tmp_path / "resumed" / "summary.json").exists()

    start = time.perf_counter()
    resumed = run_experiment(smoke_config(*overrides, "ckpt_path=last", logger="csv"), tmp_path / "resumed")
    session = time.perf_counter() - start
    assert resumed["train"]["steps"] == full["train"]["steps"] == 13
    assert "code_history" not in resumed  # both sessions ran this code
    # The resume is exact (below), so Lightning's "dataloader is not resumable" alarm must not be shown.
    assert [str(w.message) for w in recwarn if "not resumable" in str(w.message)] == []
    # Training time counts the interrupted session up to its checkpoint and the resumed one.
    assert ckpt["s2ft"]["wall_s"] < resumed["train"]["wall_s"] <= ckpt["s2ft"]["wall_s"] + session + 0.01
    # metrics.csv keeps the rows logged before the interruption, and no step twice.
    assert logged(tmp_path / "resumed") == pytest.approx(logged(tmp_path / "full"))
    expected, actual = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "resumed")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert resumed["train"]["loss_curve"] == full["train"]["loss_curve"]
    assert resumed["train"]["val_curve"] == full["train"]["val_curve"] and len(full["train"]["val_curve"]) == 3
    assert resumed["train"]["tokens"] == full["train"]["tokens"]
    # The pace is the median over every batch of both sessions, as logged (the checkpoint carries the first six).
    assert len(ckpt["s2ft"]["pace"]) == 7
    paces = [
        value for (key, _), value in logged(tmp_path / "resumed", timings=True).items() if key == "train/tokens_per_s"
    ]
    assert len(paces) == 13
    assert resumed["train"]["median_tokens_per_s"] == round(statistics.median(paces), 1)

    # Ctrl-C: the batch in flight finishes, the checkpoint is written after it, then the run stops.
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under a shell's background job
    patch = stop_at_step(9, signal.SIGINT)
    with pytest.raises(RunInterrupted, match=r"stopped by Ctrl-C \(SIGINT\); the checkpoint is saved, resume with: "):
        run_experiment(smoke_config(*overrides), tmp_path / "ctrl_c")
    patch.undo()
    assert torch.load(tmp_path / "ctrl_c" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10
    assert signal.getsignal(signal.SIGINT) is before  # the run's handler is gone again
    run_experiment(smoke_config(*overrides, "ckpt_path=auto"), tmp_path / "ctrl_c")  # auto finds the checkpoint
    for key, tensor in adapter_tensors(tmp_path / "ctrl_c").items():
        assert torch.equal(expected[key], tensor), key


def test_a_run_resumes_exactly_from_a_moved_checkout(tmp_path, stop_at_step):
    """paths.* say where the checkout and its data are, not what the run is: a resume from a moved checkout (or on a
    node that mounts it elsewhere) was refused as "another config (differs in paths.data_dir, paths.root, ...)"."""
    overrides = ["trainer.max_steps=5", "trainer.checkpoint_every_n_steps=100"]
    # A task file spelled ${paths.root}/examples/...: resolved in the saved config, it was compared as another path.
    overrides += ["eval=user_example", "eval.limit=2", "eval.before=false"]
    full = run_experiment(smoke_config(*overrides), tmp_path / "full")
    patch = stop_at_step(2)
    with pytest.raises(RunInterrupted):
        run_experiment(smoke_config(*overrides), tmp_path / "job")
    patch.undo()
    moved = tmp_path / "moved"
    shutil.copytree(DATA, moved / "data")
    shutil.copytree(ROOT / "examples", moved / "examples")
    elsewhere = [f"paths.root={moved}", f"paths.data_dir={moved / 'data'}", f"paths.output_dir={moved / 'outputs'}"]
    resumed = run_experiment(smoke_config(*overrides, *elsewhere, "ckpt_path=last"), tmp_path / "job")
    assert resumed["train"]["loss_curve"] == full["train"]["loss_curve"] and resumed["train"]["steps"] == 5
    for key, tensor in adapter_tensors(tmp_path / "full").items():
        assert torch.equal(adapter_tensors(tmp_path / "job")[key], tensor), key
    saved = yaml.safe_load((tmp_path / "job" / "config.yaml").read_text())
    assert saved["paths"]["data_dir"] == str(moved / "data")
    assert saved["eval"]["tasks"][0]["path"] == str(moved / "examples" / "user_data" / "test.json")
    assert set(full["eval"]) == {"arc_letters", "arc_letters_mc"}
    for task, result in full["eval"].items():
        assert resumed["eval"][task]["accuracy"] == result["accuracy"] and resumed["eval"][task]["n"] == 2
    # A key of the run itself still refuses the resume, however the paths are spelled.
    with pytest.raises(RunConfigError, match=r"differs in method\.lr\)"):
        run_experiment(smoke_config(*overrides, "method.lr=2e-3", "ckpt_path=auto"), tmp_path / "job")


def test_paths_compare_relative_to_the_checkout_they_are_under():
    def run(root: str, task: str, data_dir: str | None = None) -> dict:
        paths = {"root": root, "data_dir": data_dir or f"{root}/data"}
        return {"paths": paths, "seed": 0, "eval": {"tasks": [{"name": "mine", "path": task}]}}

    assert config_differences(run("/a", "/a/x.json"), run("/b/c", "/b/c/x.json")) == []
    assert config_differences(run("/a", "/a/data/x.json"), run("/b", "/b/data/x.json")) == []
    assert config_differences(run("/a", "/a/x.json"), run("/b", "/b/y.json")) == ["eval.tasks"]
    assert config_differences(run("/a", "/a/x.json"), run("/b", "/a/x.json")) == ["eval.tasks"]  # not under /b
    assert config_differences(run("/a", "/ab/x.json"), run("/b", "/bb/x.json")) == ["eval.tasks"]  # not a prefix
    # The same file named through another base: data_dir moved off the checkout in one of them.
    assert config_differences(run("/a", "/a/data/x.json"), run("/b", "/b/data/x.json", "/d")) == ["eval.tasks"]


def test_paths_compare_relative_only_where_the_files_are_checked_by_digest():
    """A mode=eval source under paths.output_dir of another value names other weights, which no digest compares: a
    finished evaluation of /o1/exp/A was skipped for run_dir=/o2/exp/A (paths.output_dir=/o2). And a paths.* value of
    "/" made every absolute path one under it (model.path=/m/a and /x/m/a compared the same)."""

    def run(output_dir: str, **settings) -> dict:
        return {"paths": {"root": "/r", "output_dir": output_dir}, "mode": "eval", **settings}

    assert config_differences(run("/o1", run_dir="/o1/exp/A"), run("/o2", run_dir="/o2/exp/A")) == ["run_dir"]
    assert config_differences(run("/o1", adapters=["/o1/a"]), run("/o2", adapters=["/o2/a"])) == ["adapters"]
    assert config_differences(run("/o1", eval={"p": "/o1/t.json"}), run("/o2", eval={"p": "/o2/t.json"})) == []
    slash, moved = (
        {"paths": {"root": "/"}, "model": {"path": "/m/a"}},
        {"paths": {"root": "/x"}, "model": {"path": "/x/m/a"}},
    )
    assert config_differences(slash, moved) == ["model.path"]
    slash, moved = {"paths": {"root": "/"}, "data": {"p": "/m/a"}}, {"paths": {"root": "/x"}, "data": {"p": "/x/m/a"}}
    assert config_differences(slash, moved) == ["data.p"]


def test_resume_without_a_checkpoint_names_the_fix(tmp_path):
    with pytest.raises(RunDirError, match="hydra.run.dir=<that run directory> ckpt_path=last"):
        run_experiment(smoke_config("ckpt_path=last"), tmp_path / "fresh")


def test_auto_starts_fresh_skips_a_finished_run_and_refuses_another_config(tmp_path, monkeypatch):
    overrides = ["ckpt_path=auto", "trainer.max_steps=2"]
    first = run_experiment(smoke_config(*overrides), tmp_path / "job")  # nothing there: a fresh start
    assert first["train"]["steps"] == 2 and (tmp_path / "job" / "adapter").is_dir()

    def train_again(*args):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runner, "_train", train_again)
    assert run_experiment(smoke_config(*overrides), tmp_path / "job") == first
    # A changed sweep renumbers its jobs: a directory holding another config is an error, not a silent skip.
    with pytest.raises(
        RunConfigError,
        match=r"differs in method\.lr, method\.options\.seed, seed\); give this config its own directory",
    ):
        run_experiment(smoke_config(*overrides, "method.lr=0.5", "seed=3"), tmp_path / "job")


def test_auto_refuses_to_skip_a_finished_run_whose_files_changed(tmp_path, monkeypatch):
    """paths.* are not compared (a moved checkout is the same run), so ``ckpt_path=auto`` with paths.data_dir at other
    files returned the finished run's summary as if measured on them: the recorded SHA-256s are checked now."""
    data = tmp_path / "data"
    shutil.copytree(DATA, data)
    overrides = ["ckpt_path=auto", "trainer.max_steps=2", "eval=commonsense_demo", "eval.tasks=[boolq]", "eval.limit=2"]
    overrides += ["eval.before=false", "eval.heldout=[]", f"paths.data_dir={data}"]
    job = tmp_path / "job"
    first = run_experiment(smoke_config(*overrides), job)
    (evaluated,) = first["eval_data"]
    trained = first["training_data"]["sources"][0]

    def train_again(*args):
        raise AssertionError("the finished run was trained again")

    monkeypatch.setattr(runner, "_train", train_again)
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    assert run_experiment(smoke_config(*overrides, f"paths.data_dir={moved}"), job) == first  # same files elsewhere

    before = {p: p.read_bytes() for p in sorted(job.rglob("*")) if p.is_file()}
    test_file = moved / Path(evaluated["file"]).relative_to(data)
    test_file.write_text(test_file.read_text().replace("true", "false", 1))
    with pytest.raises(RunDirError) as refused:
        run_experiment(smoke_config(*overrides, f"paths.data_dir={moved}"), job)
    message = str(refused.value)
    assert f"evaluation file boolq ({test_file}: SHA-256 " in message and evaluated["sha256"][:12] in message
    assert f"mode=eval run_dir={job}" in message and "training file" not in message
    train_file = moved / Path(trained["file"]).relative_to(data)
    train_file.write_text(train_file.read_text() + "\n")
    with pytest.raises(RunDirError) as refused:
        run_experiment(smoke_config(*overrides, f"paths.data_dir={moved}"), job)
    message = str(refused.value)
    assert f"training file {trained['name']} ({train_file}: SHA-256 " in message and "evaluation file boolq" in message
    assert "train it again on the files of now with overwrite=true" in message
    assert {p: p.read_bytes() for p in sorted(job.rglob("*")) if p.is_file()} == before  # refused: nothing written


def test_auto_skips_a_finished_run_held_out_on_commonsense_test(tmp_path, monkeypatch):
    """commonsense_test is one held-out name for seven files: paired by name alone, each file was compared with the
    last one's digest, and every finished run of a commonsense_test experiment was refused as "of other files"."""
    data = tmp_path / "data"
    shutil.copytree(DATA, data)
    overrides = ["ckpt_path=auto", "trainer.max_steps=2", "eval.tasks=[]", "eval.heldout=[commonsense_test]"]
    overrides += ["eval.before=false", f"paths.data_dir={data}"]
    job = tmp_path / "job"
    first = run_experiment(smoke_config(*overrides), job)
    assert len(first["eval_data"]) == 7
    monkeypatch.setattr(runner, "_train", lambda *args: pytest.fail("the finished run was trained again"))
    assert run_experiment(smoke_config(*overrides), job) == first
    # One of the seven edited: named by its own file and digests.
    piqa = next(entry for entry in first["eval_data"] if "piqa" in entry["file"])
    Path(piqa["file"]).write_text(Path(piqa["file"]).read_text().replace("a", "b", 1))
    with pytest.raises(RunDirError) as refused:
        run_experiment(smoke_config(*overrides), job)
    message = str(refused.value)
    assert message.count("evaluation file commonsense_test") == 1
    assert f"({piqa['file']}: SHA-256 " in message and f"{piqa['sha256'][:12]}... when the run read" in message
    assert "restore them (or point paths.data_dir or the tasks back at them) to keep it" in message


def stopped_in(monkeypatch, owner, name: str, cfg: dict, run_dir) -> None:
    """Runs ``cfg`` in ``run_dir`` with ``owner.name`` raising KeyboardInterrupt (the job stopped there); the original
    is back afterwards."""

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(owner, name, stop)
        with pytest.raises(KeyboardInterrupt):
            run_experiment(cfg, run_dir)


def test_auto_after_a_run_stopped_during_its_final_evaluation_trains_nothing_more(tmp_path, monkeypatch):
    overrides = ["ckpt_path=auto", "trainer.max_steps=3", "trainer.checkpoint_every_n_steps=100"]
    full = run_experiment(smoke_config(*overrides, logger="csv"), tmp_path / "full")

    # The job was stopped after training, while it evaluated.
    stopped_in(monkeypatch, runner, "measure_model", smoke_config(*overrides, logger="csv"), tmp_path / "job")
    path = tmp_path / "job" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["global_step"] == 3 and not (tmp_path / "job" / "summary.json").exists()
    # The training session's peak, not the peak of a session that only reloads and evaluates, is the run's memory.
    ckpt["s2ft"]["peak_mem_mb"] = 10.0**7
    torch.save(ckpt, path)

    steps = []
    original = FineTuneModule.training_step
    monkeypatch.setattr(FineTuneModule, "training_step", lambda self, *a: steps.append(1) or original(self, *a))
    resumed = run_experiment(smoke_config(*overrides, logger="csv"), tmp_path / "job")
    assert not steps
    # metrics.csv keeps the training rows: Lightning runs no training hook for a fit that has nothing left to train.
    assert logged(tmp_path / "job") == pytest.approx(logged(tmp_path / "full")) and len(logged(tmp_path / "full")) == 10
    assert resumed["train"]["peak_mem_mb"] == 10.0**7
    # Training time is the training session's (rounded to 0.01 s), plus the moment the resumed fit took to stop.
    assert ckpt["s2ft"]["wall_s"] - 0.01 <= resumed["train"]["wall_s"] < ckpt["s2ft"]["wall_s"] + 2
    for key in ("steps", "tokens", "loss_curve", "final_loss"):
        assert resumed["train"][key] == full["train"][key], key
    for key, tensor in adapter_tensors(tmp_path / "full").items():
        assert torch.equal(adapter_tensors(tmp_path / "job")[key], tensor), key


def test_a_run_stopped_after_logging_its_results_logs_them_once_at_its_last_step(tmp_path, monkeypatch):
    """The final results went to metrics.csv at step 0: a job stopped after logging them (writing its summary) was
    resumed from its last checkpoint, replayed every row before step 3 (theirs too) and logged them again."""
    cfg = smoke_config("ckpt_path=auto", "trainer.max_steps=3", "trainer.checkpoint_every_n_steps=100", logger="csv")
    stopped_in(monkeypatch, runner, "finish", cfg, tmp_path / "job")
    run_experiment(cfg, tmp_path / "job")
    with (tmp_path / "job" / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["step"] for row in rows if row["train/wall_s"]] == ["3"]  # one copy of the final rows, at step 3
    assert max(int(row["step"]) for row in rows) == 3


def test_a_run_evaluated_before_training_resumes(tmp_path, stop_at_step):
    """eval.before=true (the demo's setting) writes before/ ahead of training; the resumed session measures the same
    untrained model again, and its before/ must replace the first session's, not fail on it."""
    overrides = ["debug=smoke", "logger=none", "eval.tasks=[boolq]", "eval.limit=2", "eval.before=true"]
    overrides += ["eval.heldout=[]", "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=100"]
    full = run_experiment(compose_run(*overrides), tmp_path / "full")
    patch = stop_at_step(1)
    with pytest.raises(RunInterrupted):
        run_experiment(compose_run(*overrides), tmp_path / "resumed")
    patch.undo()
    assert (tmp_path / "resumed" / "before" / "predictions" / "boolq.jsonl").is_file()
    resumed = run_experiment(compose_run(*overrides, "ckpt_path=last"), tmp_path / "resumed")
    for key in ("eval_before", "eval"):
        untimed = [
            {task: {k: v for k, v in r.items() if k not in ("tokens_per_s", "wall_s")} for task, r in s[key].items()}
            for s in (resumed, full)
        ]
        assert untimed[0] == untimed[1] and set(untimed[0]) == {"boolq"}, key
    assert resumed["train"]["loss_curve"] == full["train"]["loss_curve"]
    for name in ("before/predictions/boolq.jsonl", "predictions/boolq.jsonl"):
        assert (tmp_path / "resumed" / name).read_text() == (tmp_path / "full" / name).read_text(), name
    assert not (tmp_path / "resumed" / ".before.partial").exists()


def test_a_run_stopped_while_saving_its_merged_model_finishes_on_resume(tmp_path, monkeypatch):
    """save_lora=true writes lora/ before merged/: a run stopped in between has a lora/ when it resumes, which the
    resumed session exports again (the export refuses a non-empty folder of its own accord)."""
    overrides = ["ckpt_path=auto", "trainer.max_steps=2", "save_lora=true", "save_merged=true"]
    run_experiment(smoke_config(*overrides), tmp_path / "full")

    stopped_in(monkeypatch, runner, "_save_merged", smoke_config(*overrides), tmp_path / "job")
    assert (tmp_path / "job" / "lora").is_dir() and not (tmp_path / "job" / "summary.json").exists()
    run_experiment(smoke_config(*overrides), tmp_path / "job")
    for folder in ("lora", "merged"):
        files = sorted(p.name for p in (tmp_path / "full" / folder).iterdir())
        assert sorted(p.name for p in (tmp_path / "job" / folder).iterdir()) == files, folder
        for name in files:
            if name.endswith(".safetensors"):
                expected, actual = (
                    load_file(tmp_path / "full" / folder / name),
                    load_file(tmp_path / "job" / folder / name),
                )
                assert expected.keys() == actual.keys()
                assert all(torch.equal(expected[k], actual[k]) for k in expected), (folder, name)


@pytest.mark.parametrize("stop", [2, 8], ids=["mid_epoch", "epoch_end"])
def test_a_resumed_lora_run_draws_the_dropout_masks_of_an_uninterrupted_one(tmp_path, stop_at_step, stop):
    """LoRA trains with lora_dropout=0.05: the random state travels in the checkpoint. 36 training items in batches of
    4 make 9-batch epochs, so stopping after step 8 checkpoints at step 9, the end of the first epoch."""
    overrides = ["method=lora", "trainer.max_steps=11", "trainer.checkpoint_every_n_steps=100"]
    full = run_experiment(smoke_config(*overrides), tmp_path / "full")
    patch = stop_at_step(stop)
    with pytest.raises(RunInterrupted):
        run_experiment(smoke_config(*overrides), tmp_path / "resumed")
    patch.undo()
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == stop + 1
    resumed = run_experiment(smoke_config(*overrides, "ckpt_path=last"), tmp_path / "resumed")
    assert resumed["train"]["loss_curve"] == full["train"]["loss_curve"]
    expected, actual = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "resumed")
    assert expected.keys() == actual.keys() and any("lora" in key for key in expected)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_a_run_resumed_under_other_code_says_so_and_lists_each_sessions_code(tmp_path, stop_at_step, caplog):
    overrides = ["trainer.max_steps=4", "trainer.checkpoint_every_n_steps=100"]
    patch = stop_at_step(1)
    with pytest.raises(RunInterrupted):
        run_experiment(smoke_config(*overrides), tmp_path / "job")
    patch.undo()
    first = torch.load(tmp_path / "job" / "checkpoints" / "last.ckpt", weights_only=True)["code_history"]
    assert first == [{"git_commit": first[0]["git_commit"], "versions": summary.package_versions()}]
    upgraded = {**summary.package_versions(), "torch": "9.9.9"}
    patch.setattr(summary, "package_versions", lambda: upgraded)
    resumed = run_experiment(smoke_config(*overrides, "ckpt_path=last"), tmp_path / "job")
    torch_version = first[0]["versions"]["torch"]
    assert f"written under other code (torch {torch_version} -> 9.9.9)" in caplog.text
    assert resumed["code_history"] == [*first, {"git_commit": first[0]["git_commit"], "versions": upgraded}]
    assert resumed["versions"] == upgraded


def test_ctrl_c_inside_fit_before_training_stays_a_keyboard_interrupt(tmp_path, monkeypatch):
    """Lightning turns a KeyboardInterrupt inside fit (here while the optimizer is built; also a second Ctrl-C) into
    SystemExit(1) and ignores SIGINT from then on; run.py names the ckpt_path=auto command for a KeyboardInterrupt."""

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(FineTuneModule, "configure_optimizers", interrupted)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(smoke_config("trainer.max_steps=2"), tmp_path / "job")
    assert signal.getsignal(signal.SIGINT) is before
    monkeypatch.undo()
    done = run_experiment(smoke_config("trainer.max_steps=2", "ckpt_path=auto"), tmp_path / "job")
    assert done["train"]["steps"] == 2


def test_a_second_sigterm_inside_an_accumulation_keeps_the_checkpoint_of_the_last_step(tmp_path, monkeypatch):
    """The second signal stops at the end of the batch in flight (Lightning's SIGTERMException): a checkpoint there,
    within a window of 3 micro-batches, would resume without the gradients gathered before it."""
    overrides = ["trainer.max_steps=4", "trainer.checkpoint_every_n_steps=1", "trainer.accumulate_grad_batches=3"]
    overrides += ["trainer.val_check_interval=3"]  # a validation at each step end, as the config check asks
    full = run_experiment(smoke_config(*overrides), tmp_path / "full")
    original = FineTuneModule.on_train_batch_end

    def on_train_batch_end(self, outputs, batch, batch_idx):
        original(self, outputs, batch, batch_idx)
        if batch_idx in (3, 4):  # the first two micro-batches of step 2
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(FineTuneModule, "on_train_batch_end", on_train_batch_end)
    with pytest.raises(RunInterrupted, match="stopped by SIGTERM"):
        run_experiment(smoke_config(*overrides), tmp_path / "resumed")
    monkeypatch.undo()
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert (ckpt["global_step"], ckpt["SFTDataModule"]) == (1, {"epoch": 0, "consumed": 3})
    resumed = run_experiment(smoke_config(*overrides, "ckpt_path=last"), tmp_path / "resumed")
    assert resumed["train"]["loss_curve"] == full["train"]["loss_curve"]
    for key, tensor in adapter_tensors(tmp_path / "full").items():
        assert torch.equal(adapter_tensors(tmp_path / "resumed")[key], tensor), key


@pytest.mark.parametrize(
    ("interval", "every", "saved"), [(3, 2, 2), (4, 100, 3)], ids=["validation_after_it", "no_validation"]
)
def test_a_second_sigterm_during_a_step_resumes_exactly(tmp_path, monkeypatch, interval, every, saved):
    """The first SIGTERM comes after step 2, the second during step 3: the run stops at the end of step 3, saving it,
    or, when a validation is due after it, in that validation (Lightning's SIGTERMException), keeping the checkpoint
    before it; either resumes exactly. Without any checkpoint before it, the message says to start again."""
    overrides = ["trainer.max_steps=6", f"trainer.checkpoint_every_n_steps={every}"]
    overrides += [f"trainer.val_check_interval={interval}"]
    full = run_experiment(smoke_config(*overrides, logger="csv"), tmp_path / "full")
    batch_end, training_step = FineTuneModule.on_train_batch_end, FineTuneModule.training_step

    def on_train_batch_end(self, outputs, batch, batch_idx):
        batch_end(self, outputs, batch, batch_idx)
        if self.trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    def step(self, batch, batch_idx):
        if self.trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(FineTuneModule, "on_train_batch_end", on_train_batch_end)
    monkeypatch.setattr(FineTuneModule, "training_step", step)
    with pytest.raises(RunInterrupted, match="stopped by SIGTERM; the checkpoint is saved, resume with: "):
        run_experiment(smoke_config(*overrides, logger="csv"), tmp_path / "resumed")
    if interval == 3:
        first = [*overrides[:1], "trainer.checkpoint_every_n_steps=100", *overrides[2:]]
        with pytest.raises(RunInterrupted, match=r"before its first checkpoint; start it again with: .*ckpt_path=auto"):
            run_experiment(smoke_config(*first), tmp_path / "unsaved")
        assert not (tmp_path / "unsaved" / "checkpoints").exists()
    monkeypatch.undo()
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == saved
    resumed = run_experiment(smoke_config(*overrides, "ckpt_path=last", logger="csv"), tmp_path / "resumed")
    for key in ("steps", "loss_curve", "val_curve", "tokens"):
        assert resumed["train"][key] == full["train"][key], key
    assert logged(tmp_path / "resumed") == pytest.approx(logged(tmp_path / "full"))
    for key, tensor in adapter_tensors(tmp_path / "full").items():
        assert torch.equal(adapter_tensors(tmp_path / "resumed")[key], tensor), key


def test_the_token_count_stays_exact_past_float32_precision(tmp_path, monkeypatch):
    """A run of more than 2**24 tokens (a few epochs of a commonsense set): summing the ranks' counts in float32 gave
    a rounded total. The count starts high here, as a resumed session's does."""
    start = FineTuneModule.on_fit_start

    def on_fit_start(self):
        start(self)
        self.tokens_seen = 2**26 + 1

    monkeypatch.setattr(FineTuneModule, "on_fit_start", on_fit_start)
    done = run_experiment(smoke_config("trainer.max_steps=2"), tmp_path)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert done["train"]["tokens"] == ckpt["s2ft"]["tokens_seen"] > 2**26 + 1


@pytest.mark.parametrize("every", [3, 100], ids=["save_due", "no_save_due"])
def test_a_sigterm_during_a_validation_resumes_exactly(tmp_path, monkeypatch, every):
    """LoRA (dropout draws) with a validation after steps 3 and 6, SIGTERM during the first one: when a checkpoint is
    due at step 3 it is written after that validation and the run stops there, else the run stops after step 4."""
    overrides = ["method=lora", "trainer.max_steps=6", f"trainer.checkpoint_every_n_steps={every}"]
    overrides += ["trainer.val_check_interval=3"]
    full = run_experiment(smoke_config(*overrides, logger="csv"), tmp_path / "full")
    validation_step = FineTuneModule.validation_step

    def step(self, batch, batch_idx):
        if self.trainer.global_step == 3 and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return validation_step(self, batch, batch_idx)

    monkeypatch.setattr(FineTuneModule, "validation_step", step)
    with pytest.raises(RunInterrupted, match="stopped by SIGTERM; the checkpoint is saved"):
        run_experiment(smoke_config(*overrides, logger="csv"), tmp_path / "resumed")
    monkeypatch.undo()
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == (3 if every == 3 else 4) and len(ckpt["s2ft"]["val_curve"]) == 1
    resumed = run_experiment(smoke_config(*overrides, "ckpt_path=last", logger="csv"), tmp_path / "resumed")
    for key in ("steps", "loss_curve", "val_curve", "tokens"):
        assert resumed["train"][key] == full["train"][key], key
    assert len(full["train"]["val_curve"]) == 2
    assert logged(tmp_path / "resumed") == pytest.approx(logged(tmp_path / "full"))
    for key, tensor in adapter_tensors(tmp_path / "full").items():
        assert torch.equal(adapter_tensors(tmp_path / "resumed")[key], tensor), key


@pytest.mark.parametrize("select", [[], ["trainer.select_best=val_loss", "method.lr=0.05"]], ids=["last", "best"])
def test_a_sigterm_in_the_last_step_stops_before_the_evaluation_and_the_resume_only_finishes(
    tmp_path, stop_at_step, select
):
    """The checkpoint the stop leaves holds what training ended with (with select_best, the best validation's)."""
    overrides = ["trainer.max_steps=4", "trainer.checkpoint_every_n_steps=100", "trainer.val_check_interval=2"]
    overrides += select
    full = run_experiment(smoke_config(*overrides, logger="csv"), tmp_path / "full")
    patch = stop_at_step(3)
    with pytest.raises(RunInterrupted, match="stopped by SIGTERM; the checkpoint is saved"):
        run_experiment(smoke_config(*overrides, logger="csv"), tmp_path / "resumed")
    patch.undo()
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert not (tmp_path / "resumed" / "summary.json").exists()
    resumed = run_experiment(smoke_config(*overrides, "ckpt_path=last", logger="csv"), tmp_path / "resumed")
    assert resumed["train"].get("best_val_loss") == full["train"].get("best_val_loss")
    for key in ("steps", "loss_curve", "val_curve", "tokens", "final_loss", "val_loss"):
        assert resumed["train"][key] == full["train"][key], key
    assert logged(tmp_path / "resumed") == pytest.approx(logged(tmp_path / "full"))
    for key, tensor in adapter_tensors(tmp_path / "full").items():
        assert torch.equal(adapter_tensors(tmp_path / "resumed")[key], tensor), key


def test_a_resume_on_another_number_of_processes_or_kind_of_device_is_refused(tmp_path, stop_at_step):
    """trainer.devices=auto (or -1) is the same config on a machine with other GPUs: a checkpoint of two ranks (each
    its own sampler position, token count and random state) resumed on one would continue neither rank exactly; and
    trainer.accelerator=auto the same config on a machine without a GPU."""
    overrides = ["trainer.max_steps=4", "trainer.checkpoint_every_n_steps=100"]
    patch = stop_at_step(1)
    with pytest.raises(RunInterrupted):
        run_experiment(smoke_config(*overrides), tmp_path)
    patch.undo()
    path = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["s2ft"]["tokens_seen_per_rank"] *= 2  # as two ranks write it
    torch.save(ckpt, path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"written by 2 processes, but this run has 1 \(trainer.devices="):
        run_experiment(smoke_config(*overrides, "ckpt_path=last"), tmp_path)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert ckpt["s2ft"]["device_type"] == "cpu"
    ckpt["s2ft"]["tokens_seen_per_rank"] = ckpt["s2ft"]["tokens_seen_per_rank"][:1]
    ckpt["s2ft"]["device_type"] = "cuda"  # trainer.accelerator=auto: trained on a GPU node, requeued on a CPU one
    torch.save(ckpt, path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"written on cuda, but this run trains on cpu .*trainer.accelerator=gpu"):
        run_experiment(smoke_config(*overrides, "ckpt_path=last"), tmp_path)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("signalled", [False, True], ids=["ctrl_c", "killed"])
def test_a_resume_stopped_before_its_checkpoint_loads_keeps_the_first_sessions_metrics(
    tmp_path, stop_at_step, monkeypatch, signalled
):
    """Lightning's CSV writer deleted metrics.csv as the resumed session built its logger, and the rows logged before
    the checkpoint were written back only once the checkpoint loaded, inside fit: a resume stopped in between (Ctrl-C,
    or a kill while DDP waited for its ranks) lost the first session's rows for good, and so did every later resume."""
    overrides = ["trainer.max_steps=6", "trainer.checkpoint_every_n_steps=100"]
    full = run_experiment(smoke_config(*overrides, logger="csv"), tmp_path / "full")
    patch = stop_at_step(2)
    with pytest.raises(RunInterrupted):
        run_experiment(smoke_config(*overrides, logger="csv"), tmp_path / "job")
    patch.undo()
    metrics = tmp_path / "job" / "metrics.csv"
    written = metrics.read_bytes()

    def stopped(self):
        if signalled:  # a process killed here runs no cleanup: what is on disk then is what the next resume reads
            raise SystemExit(f"killed; metrics.csv is {'there' if metrics.is_file() else 'gone'}")
        raise KeyboardInterrupt

    monkeypatch.setattr(FineTuneModule, "configure_model", stopped)
    with pytest.raises((KeyboardInterrupt, SystemExit)) as stop:
        run_experiment(smoke_config(*overrides, "ckpt_path=last", logger="csv"), tmp_path / "job")
    if signalled:
        assert str(stop.value) == "killed; metrics.csv is there"
    assert metrics.read_bytes() == written
    monkeypatch.undo()
    resumed = run_experiment(smoke_config(*overrides, "ckpt_path=last", logger="csv"), tmp_path / "job")
    assert resumed["train"]["loss_curve"] == full["train"]["loss_curve"]
    assert logged(tmp_path / "job") == pytest.approx(logged(tmp_path / "full"))


def test_a_resume_onto_another_base_model_is_refused_before_anything_is_written(tmp_path, stop_at_step, monkeypatch):
    """A checkpoint holds only the trained tensors: the resumed session loads the base model and its tokenizer again by
    name. A hub model updated since (hub ids are not pinned to a revision; a tokenizer's chat template is often fixed
    alone), or a local folder replaced, trained the run's tensors on another base, or on other token ids, from then on,
    with no word; changed training files are refused so (`check_same_data`)."""
    overrides = ["trainer.max_steps=4", "trainer.checkpoint_every_n_steps=100"]
    patch = stop_at_step(1)
    with pytest.raises(RunInterrupted):
        run_experiment(smoke_config(*overrides, logger="csv"), tmp_path)
    patch.undo()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    build = runner.build_run_model

    def updated(*args):  # the same architecture and name, other values (as a new revision of a hub model)
        model, tokenizer = build(*args)
        with torch.no_grad():
            next(model.parameters()).mul_(1.01)
        return model, tokenizer

    def retemplated(*args):  # the same weights, a tokenizer with a fixed chat template (data.template=chat reads it)
        model, tokenizer = build(*args)
        tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"
        return model, tokenizer

    for changed in (updated, retemplated):
        monkeypatch.setattr(runner, "build_run_model", changed)
        with pytest.raises(CheckpointError, match=r"checkpoint \S+last\.ckpt was written on another base model than "):
            run_experiment(smoke_config(*overrides, "ckpt_path=last", logger="csv"), tmp_path)
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    monkeypatch.undo()
    assert run_experiment(smoke_config(*overrides, "ckpt_path=last", logger="csv"), tmp_path)["train"]["steps"] == 4


def test_a_resume_refused_for_other_eval_settings_after_training_names_the_evaluation_command(tmp_path, monkeypatch):
    """Training done, the final evaluation failed (out of memory at eval.batch_size, say): resuming with other eval.*
    settings is refused, and the fixes the message named were to resume with the settings that failed or to train
    again in a new directory; the adapter the run saved can be evaluated on its own, which it now says."""
    overrides = ["trainer.max_steps=2", "eval.tasks=[boolq]", "eval.limit=2", "eval.heldout=[]"]

    stopped_in(monkeypatch, runner, "measure_model", smoke_config(*overrides), tmp_path / "run")
    run_dir = tmp_path / "run"
    assert (run_dir / "adapter").is_dir() and not (run_dir / "summary.json").exists()
    message = (
        r"differs in eval\.batch_size\); .* its training is done \(adapter/\): evaluate it with the new eval settings "
        rf"in a directory of its own with python run\.py <these overrides, without ckpt_path> mode=eval "
        rf"run_dir={re.escape(str(run_dir))}$"
    )
    with pytest.raises(RunConfigError, match=message):
        run_experiment(smoke_config(*overrides, "eval.batch_size=2", "ckpt_path=auto"), run_dir)
    done = run_experiment(
        smoke_config(*overrides, "eval.batch_size=2", "mode=eval", f"run_dir={run_dir}"), tmp_path / "e"
    )
    assert done["eval"]["boolq"]["n"] == 2
    with pytest.raises(RunConfigError) as refused:  # a change to training itself gets no such advice
        run_experiment(smoke_config(*overrides, "eval.batch_size=2", "seed=1", "ckpt_path=auto"), run_dir)
    assert "mode=eval" not in str(refused.value)


def test_a_resume_on_other_training_items_is_refused_even_without_a_file_digest(tmp_path, stop_at_step, monkeypatch):
    """The registered hub sets (commonsense_170k, math_10k, alpaca_gpt4: the paper's training data) record no SHA-256,
    so `check_same_data` could not see a dataset updated on the hub, or re-downloaded into a fresh cache, between two
    sessions: the resumed run trained on other items, with no word. The items themselves are compared now."""
    overrides = ["trainer.max_steps=4", "trainer.checkpoint_every_n_steps=100"]
    patch = stop_at_step(1)
    with pytest.raises(RunInterrupted):
        run_experiment(smoke_config(*overrides, logger="csv"), tmp_path)
    patch.undo()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    load_train = runner.load_train

    def updated(*args):  # the same sources, files and count; one answer corrected upstream
        examples = load_train(*args)
        return [examples[0].__class__(**{**vars(examples[0]), "output": "corrected"}), *examples[1:]]

    monkeypatch.setattr(runner, "load_train", updated)
    with pytest.raises(CheckpointError, match=r"checkpoint \S+last\.ckpt was written while the training items were "):
        run_experiment(smoke_config(*overrides, "ckpt_path=last", logger="csv"), tmp_path)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    monkeypatch.undo()
    assert run_experiment(smoke_config(*overrides, "ckpt_path=last", logger="csv"), tmp_path)["train"]["steps"] == 4
