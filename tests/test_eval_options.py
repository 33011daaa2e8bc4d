"""Parsing answer options from LLM-Adapters instructions (s2ft/evaluation/options.py)."""

import pytest
from conftest import DATA

from s2ft.data import TASKS, load_eval, resolve_tasks
from s2ft.evaluation.extract import parse_gold
from s2ft.evaluation.options import OptionParseError, parse_options

ARC_ITEM = (
    "Please choose the correct answer to the question: Which part of a sunflower plant absorbs water and nutrients?"
    "\n\nAnswer1: Roots Answer2: Stems Answer3: Leaves Answer4: Flowers\n\n"
    "Answer format: answer1/answer2/answer3/answer4"
)
PIQA_ITEM = (
    "Please choose the correct solution to the question: Where can I buy a tennis ball\n\n"
    "Solution1: You can purchase a tennis ball at any sports store\n\n"
    "Solution2: You can purchase a tennis racket at any sports store\n\nAnswer format: solution1/solution2"
)
WINOGRANDE_ITEM = (
    "Please choose the correct answer to fill in the blank to complete the given sentence: Sarah was a much better "
    "surgeon than Maria so _ always got the easier cases.\n\nOption1: Sarah Option2: Maria Answer format: "
    "option1/option2"
)
AQUA_ITEM = (
    "How far can Bill travel on a windy day in 21 minutes? Answer Choices: (A) 2 miles (B) 2.25 miles (C) 3.25 miles "
    "(D) 3.85 miles (E) 2.85 miles"
)


def test_arc_options():
    assert parse_options(ARC_ITEM, "label", TASKS["arc_easy"].labels) == {
        "answer1": "Roots",
        "answer2": "Stems",
        "answer3": "Leaves",
        "answer4": "Flowers",
    }


def test_piqa_options():
    assert parse_options(PIQA_ITEM, "label", TASKS["piqa"].labels) == {
        "solution1": "You can purchase a tennis ball at any sports store",
        "solution2": "You can purchase a tennis racket at any sports store",
    }


def test_winogrande_options_fill_the_blank():
    assert parse_options(WINOGRANDE_ITEM, "label", TASKS["winogrande"].labels) == {
        "option1": "Sarah was a much better surgeon than Maria so Sarah always got the easier cases.",
        "option2": "Sarah was a much better surgeon than Maria so Maria always got the easier cases.",
    }


def test_boolq_options_are_true_and_false():
    item = "Please answer the following question with true or false, question: is it blue?\n\nAnswer format: true/false"
    assert parse_options(item, "label", TASKS["boolq"].labels) == {"true": "true", "false": "false"}


def test_aqua_options():
    assert parse_options(AQUA_ITEM, "letter", TASKS["aqua"].labels) == {
        "A": "2 miles",
        "B": "2.25 miles",
        "C": "3.25 miles",
        "D": "3.85 miles",
        "E": "2.85 miles",
    }


def test_hellaswag_format():
    item = (
        "Please choose the correct ending to complete the given sentence: Baking: A man mixes flour.\n\n"
        "Ending1: He eats it. Ending2: He bakes bread. Ending3: He sings. Ending4: He sleeps.\n\n"
        "Answer format: ending1/ending2/ending3/ending4"
    )
    options = parse_options(item, "label", TASKS["hellaswag"].labels)
    assert options == {
        "ending1": "He eats it.",
        "ending2": "He bakes bread.",
        "ending3": "He sings.",
        "ending4": "He sleeps.",
    }


@pytest.mark.parametrize(
    ("instruction", "kind", "labels", "message"),
    [
        ("What is 2 + 3?", "number", (), "numeric answers have no options"),
        (
            "Question?\n\nAnswer1: only one\n\nAnswer format: answer1",
            "label",
            TASKS["arc_easy"].labels,
            "need at least 2",
        ),
        ("Q\n\nAnswer1: a Answer1: b\n\nAnswer format: answer1", "label", TASKS["arc_easy"].labels, "appears twice"),
        ("Q\n\nAnswer2: a Answer1: b\n\nAnswer format: x", "label", TASKS["arc_easy"].labels, "in order"),
        ("Q\n\nAnswer1: a Answer6: b\n\nAnswer format: x", "label", TASKS["arc_easy"].labels, "not among"),
        ("Q\n\nAnswer1: a Answer2:\n\nAnswer format: x", "label", TASKS["arc_easy"].labels, "empty option"),
        ("Which? (A) 1 (B) 2", "letter", TASKS["aqua"].labels, "Answer Choices"),
        ("the given sentence: no blank here\n\nOption1: a Option2: b", "label", TASKS["winogrande"].labels, "one '_'"),
    ],
)
def test_bad_instructions_raise(instruction, kind, labels, message):
    with pytest.raises(OptionParseError, match=message):
        parse_options(instruction, kind, labels)


def test_every_shipped_multiple_choice_item_parses_with_its_gold_among_the_options():
    for spec in resolve_tasks(["commonsense", "aqua"]):
        for example in load_eval(spec, DATA):
            options = parse_options(example.instruction, spec.answer_kind, spec.labels)
            assert parse_gold(spec.answer_kind, example.answer, spec.labels) in options, example.id
