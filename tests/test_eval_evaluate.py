"""`evaluate` end to end (s2ft/evaluation/evaluate.py): scoring, predictions files, subsets, modes and early errors."""

import json
from pathlib import Path

import pytest
from conftest import DATA, read_predictions

from s2ft.data import TASKS, build_prompt
from s2ft.evaluation import evaluate, prepare_tasks, summarize
from s2ft.models import tiny_tokenizer


def write_task(data_dir: Path, task: str, records: list[dict]) -> None:
    path = data_dir / TASKS[task].path
    path.parent.mkdir(parents=True, exist_ok=True)
    full = [{"instruction": r["instruction"], "input": "", "output": "", "answer": r["answer"]} for r in records]
    path.write_text(json.dumps(full))


def arc_item(question: str, answer: str) -> dict:
    instruction = (
        f"Please choose the correct answer to the question: {question}\n\nAnswer1: red Answer2: blue Answer3: green"
        "\n\nAnswer format: answer1/answer2/answer3"
    )
    return {"instruction": instruction, "answer": answer}


@pytest.fixture
def data_dir(tmp_path):
    write_task(tmp_path, "arc_easy", [arc_item(f"Color {i}?", f"answer{i % 3 + 1}") for i in range(4)])
    write_task(tmp_path, "gsm8k", [{"instruction": f"What is {i} + {i}?", "answer": f"{2 * i}.0"} for i in range(3)])
    write_task(tmp_path, "aqua", [{"instruction": "Pick. Answer Choices: (A) 1 (B) 2", "answer": "B"}])
    return tmp_path


SCRIPT = {
    "Color 0?": "the correct answer is answer1",  # gold answer1: right
    "Color 1?": "The correct answer is Answer3",  # gold answer2: wrong
    "Color 2?": "I do not know",  # gold answer3: no answer, wrong
    "Color 3?": "answer1 for sure",  # gold answer1: right
    "What is 0 + 0?": "0 + 0 = 0. The answer is 0.",
    "What is 1 + 1?": "1 + 1 = 2. The answer is 2.0001.",
    "What is 2 + 2?": "2 + 2 = 5. The answer is 5.",
    "Pick.": "The answer is (B).",
}


@pytest.fixture
def calls(scripted):
    """The calls of the scripted generation, which answers with SCRIPT."""
    script, calls = scripted
    script.update(SCRIPT)
    return calls


def test_generate_mode_scores_and_writes_predictions(model, tokenizer, data_dir, calls, tmp_path):
    out = tmp_path / "run"
    result = evaluate(model, tokenizer, ["arc_easy", "gsm8k", "aqua"], data_dir=data_dir, out_dir=out, progress=False)
    tasks = result["tasks"]
    assert tasks["arc_easy"]["accuracy"] == 0.5 and tasks["arc_easy"]["n"] == 4
    assert tasks["gsm8k"]["accuracy"] == pytest.approx(2 / 3, abs=1e-15)
    assert tasks["aqua"]["accuracy"] == 1.0
    assert result["avg_accuracy"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3, abs=1e-15)
    assert all(task["mode"] == "generate" and task["tokens_per_s"] > 0 for task in tasks.values())
    # Suite budgets, and the early stop only where the first label decides (commonsense).
    budgets = {call["n"]: (call["max_new_tokens"], call["stop"] is not None) for call in calls}
    assert budgets == {4: (32, True), 3: (256, False), 1: (256, False)}
    arc = read_predictions(out, "arc_easy")
    assert [r["extracted"] for r in arc] == ["answer1", "answer3", None, "answer1"]
    assert [r["correct"] for r in arc] == [True, False, False, True]
    assert arc[0]["prompt"] == build_prompt(arc_item("Color 0?", "answer1")["instruction"])
    assert set(arc[0]) >= {"id", "prompt", "output", "extracted", "gold", "correct"}
    gsm8k = read_predictions(out, "gsm8k")
    assert [r["extracted"] for r in gsm8k] == [0.0, 2.0001, 5.0]
    assert [r["gold"] for r in gsm8k] == [0.0, 2.0, 4.0]


def test_max_new_tokens_override(model, tokenizer, data_dir, calls):
    evaluate(model, tokenizer, ["gsm8k"], data_dir=data_dir, max_new_tokens=5, progress=False)
    assert calls[0]["max_new_tokens"] == 5


def test_generate_on_a_real_model_is_batch_size_invariant(model, tokenizer, tmp_path):
    outputs = {}
    for batch_size in (1, 3):
        out = tmp_path / f"b{batch_size}"
        result = evaluate(
            model,
            tokenizer,
            ["boolq", "aqua"],
            data_dir=DATA,
            limit=3,
            batch_size=batch_size,
            max_new_tokens=4,
            out_dir=out,
            progress=False,
        )
        for task in ("boolq", "aqua"):
            records = read_predictions(out, task)
            assert len(records) == 3 == result["tasks"][task]["n"]
            assert result["tasks"][task]["accuracy"] == sum(r["correct"] for r in records) / 3
            assert all(1 <= r["num_tokens"] <= 4 for r in records)
            outputs[batch_size, task] = [(r["id"], r["output"]) for r in records]
    assert outputs[1, "boolq"] == outputs[3, "boolq"] and outputs[1, "aqua"] == outputs[3, "aqua"]


def test_loglik_mode_picks_the_best_option_by_mean_and_by_sum(model, tokenizer, tmp_path):
    runs = {}
    for batch_size in (1, 7):
        out = tmp_path / f"b{batch_size}"
        result = evaluate(
            model,
            tokenizer,
            ["arc_easy", "winogrande"],
            data_dir=DATA,
            mode="loglik",
            limit=4,
            batch_size=batch_size,
            out_dir=out,
            progress=False,
        )
        for task in ("arc_easy", "winogrande"):
            metrics = result["tasks"][task]
            records = read_predictions(out, task)
            assert metrics["mode"] == "loglik" and metrics["n"] == 4 and metrics["accuracy"] == metrics["accuracy_mean"]
            for r in records:
                means = {label: r["logprob"][label] / r["num_tokens"][label] for label in r["options"]}
                assert r["extracted"] == max(means, key=means.get)
                assert r["extracted_sum"] == max(r["logprob"], key=r["logprob"].get)
                assert r["output"] == r["options"][r["extracted"]]
                assert r["correct"] == (r["extracted"] == r["gold"])
            assert metrics["accuracy_mean"] == sum(r["correct"] for r in records) / 4
            assert metrics["accuracy_sum"] == sum(r["correct_sum"] for r in records) / 4
            runs[batch_size, task] = records
    for task in ("arc_easy", "winogrande"):
        for a, b in zip(runs[1, task], runs[7, task], strict=True):
            assert a["extracted"] == b["extracted"]
            assert list(a["logprob"].values()) == pytest.approx(list(b["logprob"].values()), rel=1e-5, abs=1e-5)


def test_limit_is_a_deterministic_subset():
    first = [ex.id for ex in prepare_tasks(["piqa"], DATA, "generate", limit=5, seed=0)[0].examples]
    again = [ex.id for ex in prepare_tasks(["piqa"], DATA, "generate", limit=5, seed=0)[0].examples]
    other = [ex.id for ex in prepare_tasks(["piqa"], DATA, "generate", limit=5, seed=1)[0].examples]
    assert first == again and first != other and len(first) == 5
    assert len(prepare_tasks(["piqa"], DATA, "generate")[0].examples) == 1838


def test_groups_and_average():
    tasks = {name: {"accuracy": value} for name, value in {"gsm8k": 0.3, "mawps": 0.6, "aqua": 0.0}.items()}
    result = summarize(tasks)
    assert result["avg_accuracy"] == pytest.approx(0.3, abs=1e-15)
    assert result["groups"] == {"id": pytest.approx(0.3, abs=1e-15)}


def test_training_mode_is_restored(model, tokenizer, data_dir, calls):
    model.train()
    try:
        evaluate(model, tokenizer, ["aqua"], data_dir=data_dir, progress=False)
        assert model.training
    finally:
        model.eval()


class Untouchable:
    """A model that fails if evaluation reaches it: errors must come before the model is used."""

    def __getattr__(self, name):
        raise AssertionError(f"the model was used ({name}) before the input was validated")


@pytest.mark.parametrize(
    ("tasks", "options", "error", "message"),
    [
        (["nope"], {}, KeyError, "unknown task 'nope'"),
        (["arc_easy"], dict(mode="sample"), ValueError, "unknown evaluation mode"),
        (["gsm8k"], dict(mode="loglik"), ValueError, "numeric answers"),
        (["arc_easy"], dict(mode="loglik", num_beams=4), ValueError, "num_beams applies to generation"),
        (["arc_easy"], dict(limit=0), ValueError, "limit must be a positive integer"),
        (["arc_easy"], dict(batch_size=0), ValueError, "eval batch_size must be a positive integer"),
        (["arc_easy"], dict(max_new_tokens=0), ValueError, "eval max_new_tokens must be a positive integer"),
        (["arc_easy"], dict(num_beams=None), ValueError, "eval num_beams must be a positive integer"),
    ],
)
def test_bad_requests_fail_before_the_model_is_used(data_dir, tasks, options, error, message):
    with pytest.raises(error, match=message):
        evaluate(Untouchable(), tiny_tokenizer(), tasks, data_dir=data_dir, progress=False, **options)


def test_missing_test_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="boolq/test.json"):
        evaluate(Untouchable(), tiny_tokenizer(), ["boolq"], data_dir=tmp_path, progress=False)


@pytest.mark.parametrize(
    ("task", "record", "message"),
    [
        ("gsm8k", {"instruction": "What?", "answer": "many"}, r"task gsm8k, item gsm8k-0: gold answer 'many'"),
        ("arc_easy", arc_item("Color?", "answer9"), "not one of the task's labels"),
        ("arc_easy", {"instruction": "No options here", "answer": "answer1"}, "found 0 answer option"),
        ("gsm8k", {"instruction": "What?", "answer": ""}, "empty answer"),
    ],
)
def test_unscorable_records_fail_before_the_model_is_used(tmp_path, task, record, message):
    write_task(tmp_path, task, [record])
    with pytest.raises(ValueError, match=message):
        evaluate(
            Untouchable(),
            tiny_tokenizer(),
            [task],
            data_dir=tmp_path,
            mode="loglik" if task != "gsm8k" else "generate",
            progress=False,
        )


def test_progress_display_counts_every_item(model, tokenizer, data_dir, calls, capsys):
    result = evaluate(model, tokenizer, ["arc_easy", "gsm8k"], data_dir=data_dir, progress=True)
    assert result["tasks"]["arc_easy"]["n"] == 4
    shown = capsys.readouterr().out
    assert "arc_easy" in shown and "4/4" in shown and "3/3" in shown
