"""`run.py` end to end on a tiny model: a multirun of two smoke jobs, their run directories, and eval mode."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, compose_run

from s2ft.lightning import evaluation, run_experiment, runner
from s2ft.lightning.evaluation import eval_device
from s2ft.run_config import RunConfigError

TASKS = ["boolq", "arc_easy"]
SUMMARY_KEYS = {
    "experiment", "method", "model", "strategy", "order", "ratios", "seed", "trainable_params", "total_params",
    "trainable_pct", "train", "eval", "avg_accuracy", "heldout", "measure_wall_s", "git_commit", "versions", "wandb",
}  # fmt: skip
TRAIN_KEYS = {"steps", "tokens", "wall_s", "median_tokens_per_s", "peak_mem_mb", "final_loss", "loss_curve"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """`python run.py -m debug=smoke seed=0,1 ...`: two jobs in one sweep directory (max_steps overrides smoke's 4)."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    command = [
        sys.executable, "run.py", "-m", "debug=smoke", "seed=0,1", f"eval.tasks=[{','.join(TASKS)}]",
        "eval.heldout=[commonsense_test]", "name=smoke_test", "save_merged=true", "save_lora=true",
        "trainer.max_steps=5", f"hydra.sweep.dir={sweep_dir}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return sweep_dir


def test_each_job_has_its_own_complete_run_dir(sweep):
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0", "1"]
    for seed, run_dir in enumerate(jobs):
        summary = json.loads((run_dir / "summary.json").read_text())
        assert SUMMARY_KEYS <= summary.keys()
        assert summary["seed"] == seed and summary["experiment"] == "smoke_test"
        assert (summary["method"], summary["model"], summary["strategy"]) == ("s2ft", "tiny_llama", "random")
        assert TRAIN_KEYS <= summary["train"].keys() and summary["train"]["steps"] == 5
        assert [step for step, _ in summary["train"]["loss_curve"]] == [1, 2, 3, 4, 5]
        assert summary["train"]["final_loss"] == summary["train"]["loss_curve"][-1][1]
        assert summary["train"]["median_tokens_per_s"] > 0
        assert 0 < summary["trainable_params"] < summary["total_params"]
        assert summary["trainable_pct"] == pytest.approx(100 * summary["trainable_params"] / summary["total_params"])
        assert set(summary["eval"]) == set(TASKS) and set(summary["eval_before"]) == set(TASKS)
        for result in summary["eval"].values():
            assert 0.0 <= result["accuracy"] <= 1.0 and result["n"] == 4 and result["mode"] == "generate"
            assert result["tokens_per_s"] > 0 and result["wall_s"] > 0
        # Each measurement is timed by part, the untrained model's too: the study scripts size their jobs by it.
        for when in ("before", "after"):
            wall = summary["measure_wall_s"][when]
            assert wall.keys() == {"tasks", "heldout"} and min(wall.values()) > 0
        assert sum(r["wall_s"] for r in summary["eval"].values()) <= summary["measure_wall_s"]["after"]["tasks"]
        accuracies = [r["accuracy"] for r in summary["eval"].values()]
        assert summary["avg_accuracy"] == pytest.approx(sum(accuracies) / len(accuracies))
        heldout = summary["heldout"]["commonsense_test"]
        assert heldout["before"] > 0 and heldout["after"] > 0 and heldout["before"] != heldout["after"]
        assert summary["versions"]["torch"] and summary["versions"]["lightning"]
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["seed"] == seed and config["model"]["name"] == "tiny_llama"  # resolved, debug settings applied
        # Hydra's record of the job's command, written by the runner once the directory accepted it.
        assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
        assert f"seed={seed}" in overrides and "trainer.max_steps=5" in overrides
        hydra_record = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
        assert (hydra_record["job"]["num"], hydra_record["runtime"]["output_dir"]) == (seed, str(run_dir))
        assert yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["seed"] == seed
        assert (run_dir / "adapter" / "adapter_config.json").is_file()
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()
        with (run_dir / "metrics.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        # The final results logged after training reach the CSV too, with the summary's values.
        final = [row for row in rows if row.get("eval/avg_accuracy")]
        assert len(final) == 1 and float(final[0]["eval/avg_accuracy"]) == pytest.approx(summary["avg_accuracy"])
        assert final[0]["step"] == "5"  # after the training rows (steps 0-4), on the loggers' step axis
        for task in TASKS:
            lines = (run_dir / "predictions" / f"{task}.jsonl").read_text().splitlines()
            assert len(lines) == 4 and {"id", "output", "gold", "correct"} <= json.loads(lines[0]).keys()
    # Different seeds select different units: the two adapters differ.
    a, b = ((job / "adapter" / "adapter.safetensors").read_bytes() for job in jobs)
    assert a != b


def scores(results: dict) -> dict:
    """What an evaluation must reproduce: accuracy, size and mode per task (throughput varies between runs)."""
    return {task: (r["accuracy"], r["n"], r["mode"]) for task, r in results.items()}


def test_eval_mode_on_a_saved_run_reproduces_its_accuracy(sweep, tmp_path):
    trained = sweep / "0"
    overrides = ["debug=smoke", "mode=eval", f"run_dir={trained}", f"eval.tasks=[{','.join(TASKS)}]"]
    # Options the command sets (here other ratios) do not describe the saved run: its summary keeps the run's own.
    cfg = compose_run(*overrides, "eval.before=false", "method.options.ratios={o: 0.5}")
    summary = run_experiment(cfg, tmp_path / "eval")
    expected = json.loads((trained / "summary.json").read_text())
    assert summary["train"] is None and summary["source"] == str(trained / "adapter")
    assert (summary["ratios"], summary["strategy"], summary["method"]) == (
        expected["ratios"],
        expected["strategy"],
        expected["method"],
    )
    assert expected["ratios"] != {"o": 0.5}
    assert scores(summary["eval"]) == scores(expected["eval"])
    assert summary["heldout"]["commonsense_test"]["after"] == pytest.approx(
        expected["heldout"]["commonsense_test"]["after"], rel=1e-6
    )
    assert scores(json.loads((tmp_path / "eval" / "summary.json").read_text())["eval"]) == scores(expected["eval"])
    for task in TASKS:
        assert (tmp_path / "eval" / "predictions" / f"{task}.jsonl").read_text() == (
            trained / "predictions" / f"{task}.jsonl"
        ).read_text()
    # The same adapter given directly (the method then comes from the config).
    by_adapter = run_experiment({**cfg, "run_dir": None, "adapter": str(trained / "adapter")}, tmp_path / "adapter")
    assert scores(by_adapter["eval"]) == scores(expected["eval"]) and by_adapter["method"] == "s2ft"


def test_merged_model_equals_base_plus_adapter(sweep):
    import torch
    from transformers import AutoModelForCausalLM

    from s2ft.methods import load_trained
    from s2ft.models import build_model

    run_dir = sweep / "0"
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32)
    base, tokenizer = build_model("tiny_llama")
    adapted = load_trained(base, "s2ft", run_dir / "adapter")
    ids = tokenizer("Question: which is heavier?\nAnswer:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=0, atol=1e-5)
        assert not torch.allclose(merged(input_ids=ids).logits, build_model("tiny_llama")[0](input_ids=ids).logits)


def test_save_lora_writes_a_peft_lora_with_the_adapters_outputs(sweep):
    import torch
    from peft import PeftModel

    from s2ft.methods import load_trained
    from s2ft.models import build_model

    run_dir = sweep / "0"
    lora = PeftModel.from_pretrained(build_model("tiny_llama")[0], run_dir / "lora").eval()
    base, tokenizer = build_model("tiny_llama")
    adapted = load_trained(base, "s2ft", run_dir / "adapter")
    ids = tokenizer("Question: which is heavier?\nAnswer:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_eval_mode_evaluates_on_the_trainers_accelerator(monkeypatch):
    """mode=eval ignored trainer.accelerator: `+experiment=commonsense_llama mode=eval run_dir=...` (trainer=gpu)
    evaluated the 7B model with beam search on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert eval_device({"accelerator": "gpu", "devices": [3]}) == torch.device("cuda", 3)
    assert (
        eval_device({"accelerator": "gpu", "devices": -1})
        == eval_device({"accelerator": "auto"})
        == torch.device("cuda", 0)
    )
    assert eval_device({"accelerator": "cpu", "devices": 1}) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert eval_device({"accelerator": "auto"}) == torch.device("cpu")


def test_eval_mode_on_a_gpu_the_machine_lacks_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = compose_run("debug=smoke", "mode=eval", "method=none", "eval.tasks=[boolq]", "trainer.accelerator=gpu")
    with pytest.raises(RunConfigError, match=r"trainer\.accelerator='gpu' but this machine has no GPU: .* trainer=cpu"):
        run_experiment(cfg, tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


@pytest.mark.gpu
def test_eval_mode_with_trainer_gpu_evaluates_on_the_gpu(tmp_path, monkeypatch):
    devices = []
    measure = evaluation.measure_model

    def spy(model, *args, **kwargs):
        devices.append(next(model.parameters()).device)
        return measure(model, *args, **kwargs)

    monkeypatch.setattr(evaluation, "measure_model", spy)
    cfg = compose_run("debug=smoke", "mode=eval", "method=none", "eval.tasks=[boolq]", "trainer.accelerator=gpu")
    assert run_experiment(cfg, tmp_path / "eval")["eval"]["boolq"]["n"] == 4
    assert [device.type for device in devices] == ["cuda"]


@pytest.mark.gpu
def test_a_training_run_on_the_gpu_measures_and_calibrates_the_untrained_model_there_too(tmp_path, monkeypatch):
    """eval.before and the calibration of data-scored selections (selection_ablation: 1% of the training set through
    an 8B model) ran where the model was loaded, on the CPU, before the Trainer moved it to the GPU at fit."""
    devices = []
    measure, prepare = runner.measure_model, runner.prepare_model

    def spy(real):
        def call(model, *args, **kwargs):
            devices.append(next(model.parameters()).device.type)
            return real(model, *args, **kwargs)

        return call

    monkeypatch.setattr(runner, "measure_model", spy(measure))
    monkeypatch.setattr(runner, "prepare_model", spy(prepare))
    overrides = ("eval.tasks=[boolq]", "eval.before=true", "method.options.strategy=activation")
    run_experiment(compose_run("debug=smoke", *overrides, "trainer.accelerator=gpu"), tmp_path / "run")
    assert devices == ["cuda", "cuda", "cuda"]  # before, calibration, after
