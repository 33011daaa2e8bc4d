import json
import logging
import re
import unicodedata

import pytest
from conftest import DATA, compose_run
from test_experiment_configs import SMOLLM, sweep_axes

from s2ft.data.overlap import DataOverlapError, check_overlap, drop_overlaps, find_overlaps, normalize_question
from s2ft.data.records import Example, read_llm_adapters
from s2ft.data.sources import heldout_name, load_eval, load_heldout, load_train
from s2ft.data.tasks import GROUPS
from s2ft.data.user import load_user_source


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
    # Before, an accent written as a combining character (NFD) split its word: "cafe" here, "café" composed.
    decomposed = unicodedata.normalize("NFD", "Un café, s'il vous plaît ?")
    assert decomposed != "Un café, s'il vous plaît ?" and normalize_question(decomposed) == "un café s il vous plaît"
    assert normalize_question("Ｗｈａｔ is ２＋２? ﬁve") == "what is 2 2 five"


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
    counts = "multiarith 491/600, gsm8k 1052/1319, addsub 330/395, aqua 203/254, singleeq 425/508, svamp 800/1000"
    assert f"the evaluation sets ({counts}, mawps 131/238; e.g. " in message
    # Five shared items by id, one from each set in turn, each with the training item that asks it.
    shared = re.search(r"; e\.g\. (.*?)\), whose", message).group(1).split(", ")
    assert len(shared) == 6 and shared[-1] == "..."
    examples = {ex.id: ex for ex in train} | {ex.id: ex for task in arithmetic_tests.values() for ex in task}
    pairs = [pair.split(" = training ") for pair in shared[:5]]
    assert [test_id.rsplit("-", 1)[0] for test_id, _ in pairs] == ["multiarith", "gsm8k", "addsub", "aqua", "singleeq"]
    for test_id, train_id in pairs:
        assert train_id.startswith("math_data-")
        assert normalize_question(examples[test_id].instruction) == normalize_question(examples[train_id].instruction)
    assert "held-out" not in message and "data.allow_overlap=true" in message


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
    assert "a 1/2; e.g. x-0 = training x-0" in caplog.text
    with pytest.raises(DataOverlapError, match=r"sets \(a 1/2; e\.g\. x-0 = training x-0\), whose accuracy"):
        check_overlap(train, eval_sets)


def test_held_out_sets_are_guarded_like_evaluation_sets(caplog):
    """Before, eval.heldout was never compared with the training data: a held-out file sharing items with the
    training file gave a "held-out" loss measured on training items, silently."""
    train = [_example("How many apples?"), Example("t-1", "t", "Name a colour.", "", "red", "")]
    heldout = {"mine": [Example("mine-0", "mine", "name a colour", "", "red", ""), _example("other")]}
    with pytest.raises(DataOverlapError) as err:
        check_overlap(train, {"a": [_example("nothing")]}, heldout=heldout)
    assert str(err.value) == (
        "the training set contains questions of the held-out sets (mine 1/2; e.g. mine-0 = training t-1), whose loss "
        "would be a training loss. Remove those items from the training data, check other sets (eval.tasks or "
        "data.overlap_tasks, eval.heldout), or opt in with data.allow_overlap=true"
    )
    with caplog.at_level(logging.WARNING):
        counts = check_overlap(train, {"a": [_example("how many apples")]}, allow=True, heldout=heldout)
    assert counts == {"a": 1, "heldout:mine": 1}
    assert (
        "the evaluation sets (a 1/1; e.g. x-0 = training x-0), whose accuracy would measure memorisation; "
        in caplog.text
    )
    assert (
        "the held-out sets (mine 1/2; e.g. mine-0 = training t-1), whose loss would be a training loss" in caplog.text
    )


def test_math_data_overlaps_the_gsm8k_held_out_set():
    with pytest.raises(
        DataOverlapError, match=r"held-out sets \(gsm8k_test 1052/1319; e\.g\. gsm8k_test-\d+ = training math_data-"
    ):
        check_overlap(load_train("math_data", DATA), {}, heldout={"gsm8k_test": load_heldout("gsm8k_test", DATA)})


def test_the_cpu_studies_train_on_nothing_they_measure_held_out_loss_on():
    # Every training set of every job of the CPU studies (and the default configs) against the held-out sets of that
    # job: GSM8K train and the commonsense mix (cleaned of its test questions on load) share none with GSM8K test or
    # the commonsense test sets. The paper configs train on hub sets; their runs are guarded as they start.
    jobs = [[], ["data=gsm8k", "eval=arithmetic"]]
    for name in SMOLLM:
        trains = next((axis for axis in sweep_axes(name) if axis[0].startswith("data.train=")), [None])
        jobs += [[f"+experiment={name}", *([train] if train else [])] for train in trains]
    pairs = set()
    for job in jobs:
        cfg = compose_run(*job)
        pairs.add((tuple(cfg["data"]["train"]), tuple(cfg["eval"]["heldout"])))
    assert {train for train, _ in pairs} == {("gsm8k",), ("commonsense_mix",)}
    assert {heldout for _, heldout in pairs} >= {("gsm8k_test", "commonsense_test"), ("commonsense_test",)}
    loaded = {}
    for train, heldout in sorted(pairs):
        sets = {name: loaded.setdefault(name, load_heldout(name, DATA)) for name in heldout}
        counts = check_overlap(loaded.setdefault(train, load_train(list(train), DATA)), {}, heldout=sets)
        assert counts == {f"heldout:{heldout_name(name)}": 0 for name in heldout}


def test_a_leading_system_message_does_not_hide_a_question(tmp_path):
    """Before, a chat record's system message (part of its input, `s2ft.data.user`) was part of the comparison key, so
    the same question asked under a system prompt on one side only was not found."""
    question = Example("t-0", "t", "What is 2 + 2?", "", "4", "4")
    for context in ("system: You are a helpful assistant.", "system: Be brief.\nAnswer with a number."):
        chat = Example("c-0", "c", "what is 2+2", context, "4", "")
        assert find_overlaps([chat], {"t": [question]}) == {"t": 1}
        assert find_overlaps([question], {"c": [chat]}) == {"c": 1}
    # As a user's chat file gives it (`s2ft.data.user`: earlier turns, the system message first, are the input).
    path = tmp_path / "chat.jsonl"
    messages = [
        {"role": "system", "content": "You are a tutor.\nBe brief."},
        {"role": "user", "content": "What is 2 + 2?"},
    ]
    path.write_text(json.dumps({"messages": [*messages, {"role": "assistant", "content": "4"}]}) + "\n")
    (read,) = load_user_source(str(path))
    assert read.input == "system: You are a tutor.\nBe brief." and find_overlaps([read], {"t": [question]}) == {"t": 1}
    # Earlier turns stay in the key: after a dialogue, a follow-up asks something else than on its own.
    dialogue = Example("c-1", "c", "What is 2 + 2?", "system: Be brief.\nuser: Use base 3.\nassistant: OK.", "11", "")
    assert find_overlaps([dialogue], {"t": [question]}) == {"t": 0}
    assert find_overlaps(
        [dialogue], {"d": [Example("d-0", "d", "What is 2 + 2?", "user: use base 3 assistant: ok", "", "11")]}
    ) == {"d": 1}
