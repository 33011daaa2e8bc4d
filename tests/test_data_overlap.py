import logging

import pytest
from conftest import DATA

from s2ft.data.overlap import DataOverlapError, check_overlap, drop_overlaps, find_overlaps, normalize_question
from s2ft.data.records import Example, read_llm_adapters
from s2ft.data.sources import load_eval, load_train
from s2ft.data.tasks import GROUPS


@pytest.fixture(scope="module")
def arithmetic_tests():
    return {task: load_eval(task, DATA) for task in GROUPS["arithmetic"]}


def _example(question: str) -> Example:
    return Example("x-0", "x", question, "", "out", "1")


def test_normalize_question():
    assert normalize_question("  There are 7 crayons in the drawer . Mary took 3 !\n") == (
        "there are 7 crayons in the drawer mary took 3"
    )
    assert normalize_question("There were 7 crayons in the drawer. Mary took 3") != normalize_question(
        "There are 7 crayons in the drawer. Mary took 3"
    )
    assert normalize_question("Ça_coûte 3,5 €?") == "ça coûte 3 5"


def test_math_data_counts_match_readme(arithmetic_tests):
    # The raw file: data/README.md counts test items matching math_data.json items word for word.
    math_data = read_llm_adapters(DATA / "llm-adapters/ft-training_set/math_data.json", "math_data")
    assert find_overlaps(math_data, arithmetic_tests) == {
        "multiarith": 491,
        "gsm8k": 1055,
        "addsub": 330,
        "aqua": 203,
        "singleeq": 425,
        "svamp": 800,
        "mawps": 131,
    }


def test_mawps_train_counts_match_readme(arithmetic_tests):
    counts = find_overlaps(load_train("mawps", DATA), arithmetic_tests)
    assert counts == {"multiarith": 452, "gsm8k": 0, "addsub": 327, "aqua": 0, "singleeq": 416, "svamp": 0, "mawps": 28}


def test_gsm8k_train_is_clean(arithmetic_tests):
    commonsense = {task: load_eval(task, DATA) for task in GROUPS["commonsense"]}
    counts = check_overlap(load_train("gsm8k", DATA), arithmetic_tests | commonsense, allow=False)
    assert set(counts) == set(arithmetic_tests) | set(commonsense) and not any(counts.values())


def test_math_data_trips_the_guard(arithmetic_tests):
    train = load_train("math_data", DATA)  # its 3 empty-output items (all GSM8K questions) are dropped
    with pytest.raises(DataOverlapError) as err:
        check_overlap(train, arithmetic_tests, allow=False)
    message = str(err.value)
    assert (
        "multiarith 491/600, gsm8k 1052/1319, addsub 330/395, aqua 203/254, singleeq 425/508, svamp 800/1000" in message
    )
    assert "mawps 131/238" in message and "data.allow_overlap=true" in message


def test_commonsense_train_files_are_cleaned_of_their_test_questions(caplog):
    # BoolQ and ARC-Easy repeat a few test questions in their train files (upstream duplicates); the training
    # sources remove them on load, so the default commonsense mix passes the guard.
    commonsense = {task: load_eval(task, DATA) for task in GROUPS["commonsense"]}
    folders = {"boolq": "boolq", "arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "openbookqa": "openbookqa"}
    raw = [
        ex
        for name, d in folders.items()
        for ex in read_llm_adapters(DATA / f"llm-adapters/dataset/{d}/train.json", name)
    ]
    kept, counts = drop_overlaps(raw, commonsense)
    assert counts == {task: {"boolq": 1, "arc_easy": 2}.get(task, 0) for task in GROUPS["commonsense"]}
    assert {ex.id for ex in raw} - {ex.id for ex in kept} == {"boolq-6960", "arc_easy-1087", "arc_easy-2246"}
    with caplog.at_level(logging.INFO, logger="s2ft.data.sources"):
        train = load_train("commonsense_mix", DATA)
    assert sorted(ex.id for ex in train) == sorted(ex.id for ex in kept)
    assert "training source arc_easy: removed 2 items whose question is in {'arc_easy': 2}" in caplog.text
    assert not any(check_overlap(train, commonsense).values())


def test_check_overlap_allow_logs_and_returns_counts(caplog):
    train = [_example("How many apples?"), _example("Unrelated")]
    eval_sets = {"a": [_example("how many  apples"), _example("other")], "b": [_example("nothing")]}
    with caplog.at_level(logging.WARNING):
        assert check_overlap(train, eval_sets, allow=True) == {"a": 1, "b": 0}
    assert "a 1/2" in caplog.text
    with pytest.raises(DataOverlapError, match=r"\(a 1/2\)"):
        check_overlap(train, eval_sets)
