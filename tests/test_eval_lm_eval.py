"""The lm-evaluation-harness cross-check (s2ft/evaluation/lm_eval_backend.py): the local copies in the harness's
schemas, the same items as our evaluation, the harness's scores on a tiny model against a direct computation, and
``eval.backend=lm_eval`` through the runner into the summary."""

import json

import pytest
import torch
import yaml
from conftest import DATA, compose_run

from s2ft.data import eval_subset, load_eval, read_gsm8k
from s2ft.evaluation.lm_eval_backend import LM_EVAL_TASKS, harness_record, run_lm_eval, write_local_tasks


def first(task: str):
    return load_eval(task, DATA)[0]


def test_records_in_the_harness_schemas():
    assert harness_record(first("boolq"), "boolq") == {
        "passage": "",
        "question": "does ethanol take more energy make that produces",
        "label": 0,
    }
    piqa = harness_record(first("piqa"), "piqa")
    assert piqa["goal"] == "How do I ready a guinea pig cage for it's new occupants?" and piqa["label"] == 0
    assert piqa["sol1"].startswith(
        "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper"
    )
    obqa = harness_record(first("openbookqa"), "openbookqa")
    assert obqa["question_stem"].startswith("A person wants to start saving money") and obqa["question_stem"].endswith(
        "the best way to save money is to"
    )
    assert obqa["choices"] == {
        "text": [
            "make more phone calls",
            "quit eating lunch out",
            "buy less with monopoly money",
            "have lunch with friends",
        ],
        "label": ["A", "B", "C", "D"],
    }
    assert obqa["answerKey"] == "B"
    arc = harness_record(first("arc_easy"), "arc_easy")
    assert set(arc) == {"id", "question", "choices", "answerKey"} and "Answer1" not in arc["question"]


def test_local_copies_hold_our_evaluation_subset(tmp_path):
    names = write_local_tasks(list(LM_EVAL_TASKS), DATA, tmp_path, limit=5, seed=3)
    assert names == {task: f"s2ft_{task}" for task in LM_EVAL_TASKS}
    ours = eval_subset(load_eval("arc_easy", DATA), 5, 3)
    copied = [json.loads(line) for line in (tmp_path / "arc_easy.jsonl").read_text().splitlines()]
    assert [record["id"] for record in copied] == [example.id for example in ours]
    gsm8k = [json.loads(line) for line in (tmp_path / "gsm8k.jsonl").read_text().splitlines()]
    ours_gsm8k = eval_subset(read_gsm8k(DATA / "gsm8k" / "test.jsonl"), 5, 3)
    assert [record["question"].strip() for record in gsm8k] == [example.instruction for example in ours_gsm8k]
    config = yaml.safe_load((tmp_path / "boolq.yaml").read_text())
    assert config["dataset_path"] == "json" and config["dataset_kwargs"] == {
        "data_files": {"test": str(tmp_path / "boolq.jsonl")}
    }
    assert config["include"].endswith("super_glue/boolq/default.yaml") and config["test_split"] == "test"
    with pytest.raises(ValueError, match="not covered"):
        write_local_tasks(["siqa"], DATA, tmp_path)


def _harness_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """Summed log-probability of the continuation (byte tokens: the harness's context/continuation split is exact)."""
    context_ids = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0].double().log_softmax(-1)
    return sum(logits[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole)))


def test_harness_scores_match_a_direct_computation_on_a_tiny_model(model, tokenizer, tmp_path):
    results = run_lm_eval(model, tokenizer, DATA, tmp_path, tasks=["arc_easy", "gsm8k"], limit=3, max_gen_toks=4)
    assert set(results) == {"arc_easy", "gsm8k"}
    assert results["arc_easy"]["n"] == 3 and results["gsm8k"]["n"] == 3
    assert set(results["gsm8k"]) >= {"exact_match,strict-match", "exact_match,flexible-extract"}
    correct = []
    for line in (tmp_path / "tasks" / "arc_easy.jsonl").read_text().splitlines():
        record = json.loads(line)
        context = f"Question: {record['question']}\nAnswer:"
        scores = [_harness_loglik(model, tokenizer, context, f" {text}") for text in record["choices"]["text"]]
        correct.append(scores.index(max(scores)) == record["choices"]["label"].index(record["answerKey"]))
    assert results["arc_easy"]["acc"] == pytest.approx(sum(correct) / len(correct))
    assert json.loads((tmp_path / "results.json").read_text())["s2ft_arc_easy"]


def test_backend_lm_eval_stores_the_harness_results_beside_ours(tmp_path):
    from s2ft.lightning import run_experiment

    cfg = compose_run(
        "debug=smoke",
        "mode=eval",
        "method=none",
        "eval.tasks=[arc_easy]",
        "eval.heldout=[]",
        "eval.backend=lm_eval",
        "eval.lm_eval.tasks=[arc_easy,boolq]",
        "logger=none",
    )
    summary = run_experiment(cfg, tmp_path)
    assert summary["eval"]["arc_easy"]["n"] == 4  # debug=smoke: eval.limit=4
    assert set(summary["lm_eval"]) == {"arc_easy", "boolq"}
    assert summary["lm_eval"]["arc_easy"]["n"] == 4 and 0 <= summary["lm_eval"]["boolq"]["acc"] <= 1
    assert (tmp_path / "lm_eval" / "results.json").is_file()
