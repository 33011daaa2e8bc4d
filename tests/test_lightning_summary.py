"""s2ft.lightning.summary: the logger's flat metrics of a summary and the summary read back from them (W&B)."""

from pathlib import Path

import pytest
import wandb
import yaml

from s2ft.lightning.evaluation import write_config
from s2ft.lightning.summary import flat_metrics, summary_from_metrics, wandb_summaries, write_json

CONFIG = {"name": "commonsense_smollm", "method": {"name": "s2ft"}, "model": {"name": "smollm2_135m"}, "seed": 1}
SUMMARY = {
    "eval": {"boolq": {"accuracy": 0.5, "n": 4, "mode": "generate"}, "arc_easy": {"accuracy": 0.25, "n": 4}},
    "avg_accuracy": 0.375,
    "groups": {"id": 0.5, "far_ood": 0.25},
    "heldout": {"gsm8k_test": {"before": 2.0, "after": 1.5}},
    "train": {"wall_s": 12.0, "val_loss": None, "median_tokens_per_s": 900.0, "peak_mem_mb": 640.0},
}


def test_flat_metrics_are_the_final_results_under_their_logger_names():
    assert flat_metrics(SUMMARY) == {
        "eval/boolq/accuracy": 0.5,
        "eval/arc_easy/accuracy": 0.25,
        "eval/avg_accuracy": 0.375,
        "groups/id": 0.5,
        "groups/far_ood": 0.25,
        "heldout/gsm8k_test": 1.5,
        "train/wall_s": 12.0,
        "train/median_tokens_per_s": 900.0,
    }


def test_a_summary_read_back_from_its_metrics_keeps_what_the_report_reads():
    # The module logs the counts and the peak memory itself; Lightning logs the loss against its global step.
    metrics = {**flat_metrics(SUMMARY), "trainable_params": 10, "trainable_pct": 0.5, "train/peak_mem_mb": 640.0}
    history = [
        {"train/loss": 3.0, "trainer/global_step": 1},
        {"trainer/global_step": 1},  # a row without a loss (validation, learning rate)
        {"train/loss": 2.5, "trainer/global_step": 2},
    ]
    summary = summary_from_metrics(CONFIG, metrics, history, "abc")
    assert (summary["experiment"], summary["method"], summary["model"], summary["seed"]) == (
        "commonsense_smollm",
        "s2ft",
        "smollm2_135m",
        1,
    )
    assert {task: r["accuracy"] for task, r in summary["eval"].items()} == {"boolq": 0.5, "arc_easy": 0.25}
    assert summary["avg_accuracy"] == 0.375 and summary["groups"] == SUMMARY["groups"]
    assert summary["heldout"] == {"gsm8k_test": {"after": 1.5}}
    assert (summary["trainable_params"], summary["trainable_pct"]) == (10, 0.5)
    assert summary["train"] == {
        "wall_s": 12.0,
        "val_loss": None,
        "peak_mem_mb": 640.0,
        "median_tokens_per_s": 900.0,
        "loss_curve": [[1, 3.0], [2, 2.5]],
    }
    assert summary["wandb"] == {"id": "abc", "dir": None}
    # Without a logged train/wall_s (older runs), W&B's own run time stands in.
    del metrics["train/wall_s"]
    assert summary_from_metrics(CONFIG, {**metrics, "_runtime": 99.0}, [], "abc")["train"]["wall_s"] == 99.0


def test_wandb_summaries_skip_runs_that_are_not_s2ft_runs(monkeypatch):
    def remote(run_id: str, config: dict):
        return type("Run", (), {"id": run_id, "config": config, "summary": {}, "history": lambda self, **_: []})()

    runs = [remote("a", CONFIG), remote("b", {"lr": 1})]
    asked = []
    monkeypatch.setattr(wandb, "Api", lambda: type("Api", (), {"runs": lambda self, p: asked.append(p) or runs})())
    found = wandb_summaries("team/s2ft")
    assert asked == ["team/s2ft"]
    assert [(summary["wandb"]["id"], config) for summary, config in found] == [("a", CONFIG)]


@pytest.mark.parametrize(("write", "name"), [(write_config, "config.yaml"), (write_json, "summary.json")])
def test_a_run_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch, write, name):
    """A crash while writing (a full disk) leaves the previous file, not a torn one a resume would compare against."""
    args = (tmp_path,) if write is write_config else (tmp_path / name,)
    write({"a": 1}, *args)

    def torn(self, text, *rest, **kwargs):
        with open(self, "w") as handle:
            handle.write(text[: len(text) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", torn)
    with pytest.raises(OSError, match="No space left"):
        write({"a": 2, "b": list(range(50))}, *args)
    monkeypatch.undo()
    assert yaml.safe_load((tmp_path / name).read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left behind
