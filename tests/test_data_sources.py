import logging

import pytest
from conftest import DATA

from s2ft.data.records import DataError, Example
from s2ft.data.sources import eval_subset, load_eval, load_heldout, load_train, split_validation
from s2ft.data.tasks import TASKS, UnknownNameError

EVAL_COUNTS = {
    "gsm8k": 1319,
    "svamp": 1000,
    "multiarith": 600,
    "addsub": 395,
    "singleeq": 508,
    "mawps": 238,
    "aqua": 254,
    "boolq": 3270,
    "piqa": 1838,
    "siqa": 1954,
    "winogrande": 1267,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "openbookqa": 500,
}


def _examples(n: int) -> list[Example]:
    return [Example(f"t-{i}", "t", f"q{i}", "", f"a{i}", str(i)) for i in range(n)]


@pytest.mark.parametrize(("task", "count"), EVAL_COUNTS.items())
def test_load_eval_counts_and_gold_format(task, count):
    examples = load_eval(task, DATA)
    assert len(examples) == count
    assert all(ex.task == task for ex in examples)
    spec = TASKS[task]
    for ex in examples:
        if spec.answer_kind == "number":
            float(ex.answer)
        else:
            assert ex.answer in spec.labels


def test_load_eval_errors(tmp_path, monkeypatch):
    with pytest.raises(UnknownNameError, match="'arithmetic' is a group"):
        load_eval("arithmetic", DATA)
    with pytest.raises(FileNotFoundError, match="paths.data_dir="):
        load_eval("boolq", tmp_path)
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"hellaswag \(Rowan/hellaswag, split 'validation'\).*needs a network"):
        load_eval("hellaswag", DATA)


def test_eval_subset_deterministic_nested_in_file_order():
    examples = _examples(100)
    small, large = eval_subset(examples, 10, seed=3), eval_subset(examples, 40, seed=3)
    assert small == eval_subset(examples, 10, seed=3)
    assert small != eval_subset(examples, 10, seed=4)
    assert len(small) == 10 and set(map(id, small)) <= set(map(id, large))
    assert [int(ex.answer) for ex in large] == sorted(int(ex.answer) for ex in large)
    assert eval_subset(examples, None) == examples == eval_subset(examples, 500)
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        eval_subset(examples, 0)


def test_load_train_mix_is_a_seeded_shuffle():
    full = load_train("commonsense_mix", DATA, seed=0)
    assert len(full) == 9427 + 2251 + 1119 + 4957 - 3  # minus the 3 test questions (see test_data_overlap.py)
    assert {ex.task for ex in full} == {"boolq", "arc_easy", "arc_challenge", "openbookqa"}
    assert len({(ex.task, ex.id) for ex in full}) == len(full)
    limited = load_train(["boolq", "arc_easy", "arc_challenge", "openbookqa"], DATA, limit=50, seed=0)
    assert limited == full[:50]
    assert load_train("commonsense_mix", DATA, limit=50, seed=1) != limited


def test_load_train_sources():
    gsm8k = load_train("gsm8k", DATA)
    assert len(gsm8k) == 7473 and all(ex.output.endswith(f"The answer is {ex.answer}.") for ex in gsm8k)
    assert len(load_train("mawps", DATA)) == 1898


def test_load_train_drops_empty_outputs(caplog):
    with caplog.at_level(logging.WARNING):
        math = load_train("math_data", DATA)
    assert len(math) == 3260 - 3
    assert "dropped 3 items with an empty output: ['math_data-175', 'math_data-1448', 'math_data-2920']" in caplog.text


def test_split_validation():
    examples = _examples(50)
    train, val = split_validation(examples, 10, seed=0)
    assert len(train) == 40 and len(val) == 10
    assert sorted(train + val, key=lambda ex: int(ex.answer)) == examples
    assert [int(ex.answer) for ex in val] == sorted(int(ex.answer) for ex in val)
    assert split_validation(examples, 10, seed=0) == (train, val)
    assert split_validation(examples, 10, seed=1)[1] != val
    assert len(split_validation(examples, 0.1)[1]) == 5
    assert split_validation(examples, 0) == (examples, [])
    for bad, message in [(50, "leaves no training items"), (1.5, r"lie in \(0, 1\)"), (-1, "leaves no training")]:
        with pytest.raises(ValueError, match=message):
            split_validation(examples, bad)


def test_load_heldout():
    gsm8k = load_heldout("gsm8k_test", DATA)
    assert len(gsm8k) == 1319 and gsm8k[0].task == "gsm8k_test"
    assert all(ex.output.endswith(f"The answer is {ex.answer}.") for ex in gsm8k)
    commonsense = load_heldout("commonsense_test", DATA)
    assert len(commonsense) == sum(
        EVAL_COUNTS[t] for t in TASKS if TASKS[t].suite == "commonsense" and t in EVAL_COUNTS
    )
    assert all(ex.output == f"the correct answer is {ex.answer}" for ex in commonsense)
    with pytest.raises(UnknownNameError, match="valid: gsm8k_test, commonsense_test"):
        load_heldout("gsm8k", DATA)
