"""Answer extraction rules (s2ft/evaluation/extract.py) on realistic model outputs and on the shipped answer files."""

import pytest
from conftest import DATA

from s2ft.data import load_eval, read_gsm8k, resolve_tasks
from s2ft.evaluation.extract import (
    extract,
    extract_label,
    extract_letter,
    extract_number,
    is_correct,
    label_settled,
    parse_gold,
)

ARC = tuple(f"answer{i}" for i in range(1, 6))
BOOLQ = ("true", "false")


@pytest.mark.parametrize(
    ("output", "labels", "expected"),
    [
        ("the correct answer is answer3", ARC, "answer3"),
        ("The correct answer is Answer2.", ARC, "answer2"),
        ("answer4 is right; answer1 is a distractor", ARC, "answer4"),
        ("The correct answer is answer10", ARC, None),  # not answer1 inside answer10
        ("False. The show was cancelled.", BOOLQ, "false"),
        ("That claim is untrue", BOOLQ, None),  # not true inside untrue
        ("the correct answer is solution2\n\n### Instruction:", ("solution1", "solution2"), "solution2"),
        ("option1", ("option1", "option2"), "option1"),
        ("I am not sure about this question.", ARC, None),
        ("", ARC, None),
    ],
)
def test_extract_label(output, labels, expected):
    assert extract_label(output, labels) == expected


def test_label_longest_alternative_wins():
    labels = tuple(f"answer{i}" for i in range(1, 12))
    assert extract_label("so answer11 it is", labels) == "answer11"
    assert extract_label("so answer1, then", labels) == "answer1"


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (
            "\nA: There were 7 crayons. Mary took 3 out, so now there are 7 - 3 = 4 crayons. The answer is 4.",
            4.0,
        ),
        ("The difference is 0.625 - 0.5 = 0.125 mile. The answer is 0.125 mile.", 0.125),
        ("They earned 1,250 + 2,000 = 3,250 dollars. The answer is 3,250.", 3250.0),
        ("The temperature dropped to -15 degrees.", -15.0),
        ("The answer is 12.", 12.0),
        ("I cannot solve this.", None),
        ("", None),
    ],
)
def test_extract_number(output, expected):
    assert extract_number(output) == expected


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("Rationale: 1023.65 - 1000 = 23.65, so (D) is wrong. The answer is (A).", "A"),
        ("The answer is: (c)", "C"),
        ("the answer is option E.", "E"),
        ("Answer: B", "B"),
        ("Between (B) 2.25 miles and (E) 2.85 miles, pick (E)", "E"),
        ("Bob picks D because it is largest", "D"),
        ("Each worker does the same job.", None),  # LLM-Adapters would read the E of "Each"
        ("the answer is a multiple of 3", None),
        ("", None),
    ],
)
def test_extract_letter(output, expected):
    assert extract_letter(output) == expected


def test_number_tolerance_is_one_thousandth():
    gold = parse_gold("number", "1.8333333333333335")
    assert is_correct("number", extract_number("The answer is 1.833."), gold)
    assert not is_correct("number", extract_number("The answer is 1.83."), gold)
    assert is_correct("number", extract_number("The answer is 576."), parse_gold("number", "576.0"))


def test_missing_answer_is_wrong_never_an_error():
    assert not is_correct("number", extract("number", "no idea"), 3.0)
    assert not is_correct("label", extract("label", "no idea", ARC), "answer1")
    assert not is_correct("letter", extract("letter", "no idea"), "A")


@pytest.mark.parametrize(
    ("kind", "gold", "labels", "message"),
    [
        ("number", "twelve", (), "not a number"),
        ("number", "nan", (), "not a finite number"),
        ("letter", "F", (), "not a letter A-E"),
        ("label", "answer6", ARC, "not one of the task's labels"),
        # Before, such a gold was accepted and no first line of an output could ever equal it.
        ("text", "Paris.\nIt is the capital.", (), r"has 2 lines, but a text answer is the output's first line"),
        ("kind", "1", (), "unknown answer_kind"),
    ],
)
def test_parse_gold_rejects_unscorable_answers(kind, gold, labels, message):
    with pytest.raises(ValueError, match=message):
        parse_gold(kind, gold, labels)


def test_parse_gold_normalises():
    assert parse_gold("number", "1,000") == 1000.0
    assert parse_gold("letter", " c ") == "C"
    assert parse_gold("label", "Answer2", ARC) == "answer2"
    assert parse_gold("text", "\n The Eiffel Tower!\n\n ...\n") == "eiffel tower"  # blank lines do not count


@pytest.mark.parametrize(
    "output",
    [
        "the correct answer is answer1.",
        "the correct answer is answer10 and then answer2 later",
        "Answer3\nanswer1",
        "the correct answer is true",
        "it is untrue, so false.",
        "nothing here at all",
    ],
)
def test_settled_answer_never_changes_with_more_text(output):
    labels = ARC + BOOLQ
    final = extract_label(output, labels)
    for end in range(len(output) + 1):
        if label_settled(output[:end], labels):
            assert extract_label(output[:end], labels) == final


def test_label_at_the_very_end_is_not_settled():
    assert not label_settled("the correct answer is answer1", ARC)
    assert label_settled("the correct answer is answer1 ", ARC)
    assert not label_settled("no answer yet ", ARC)


def test_commonsense_reference_outputs_extract_to_their_gold():
    # The LLM-Adapters test files carry the reference response ("the correct answer is answerN") next to the answer.
    for spec in resolve_tasks("commonsense"):
        for example in load_eval(spec, DATA):
            gold = parse_gold(spec.answer_kind, example.answer, spec.labels)
            assert is_correct(spec.answer_kind, extract(spec.answer_kind, example.output, spec.labels), gold), example


def test_gsm8k_worked_solutions_extract_to_their_gold():
    for example in read_gsm8k(DATA / "gsm8k" / "test.jsonl"):
        assert is_correct("number", extract_number(example.output), parse_gold("number", example.answer)), example
