import pytest

from s2ft.data.prompt import build_prompt


def test_prompt_without_input():
    assert build_prompt("  What is 2 + 2? ") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nWhat is 2 + 2?\n\n### Response:\n"
    )
    assert build_prompt("What is 2 + 2?", "  ") == build_prompt("What is 2 + 2?")


def test_prompt_with_input():
    assert build_prompt("Add the numbers.", "2 and 2\n") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 2\n\n### Response:\n"
    )


def test_empty_instruction_is_an_error():
    with pytest.raises(ValueError, match="non-empty instruction"):
        build_prompt(" \n")
