"""The answer options of a multiple-choice item, as text, parsed from its LLM-Adapters instruction.

Log-likelihood evaluation scores what an option *says*: scoring the bare labels ("answer1", "solution2") measures
nothing on a model that has not learnt the label format (chance accuracy on the base SmolLM2). The instruction
formats handled, per task:

- ARC, OpenBookQA, SIQA: "... \\n\\nAnswer1: text Answer2: text ...\\n\\nAnswer format: answer1/answer2/...".
- PIQA: "Solution1: text\\n\\nSolution2: text"; HellaSwag (hub): "Ending1: text Ending2: text ...".
- WinoGrande: "... the given sentence: <sentence with _>\\n\\nOption1: name Option2: name Answer format: ...". The
  option text is the sentence with the blank filled in, so each option is scored as a whole sentence.
- BoolQ: the texts "true" and "false".
- AQuA: "... Answer Choices: (A) text (B) text ... (E) text".
"""

import re

from s2ft.errors import UserError

OPTION_MARKER = re.compile(r"(?<![A-Za-z])(Answer|Solution|Option|Ending)(\d+):")
ANSWER_FORMAT = re.compile(r"\s*Answer format:")
AQUA_CHOICES = re.compile(r"Answer Choices:")
AQUA_MARKER = re.compile(r"\(([A-E])\)")
BLANK_SENTENCE = re.compile(r"the given sentence:\s*(.*?)\s*$", re.DOTALL)


class OptionParseError(UserError, ValueError):
    """An instruction whose answer options cannot be read."""


def _split_on_markers(text: str, markers: list[re.Match], label_of) -> dict[str, str]:
    options = {}
    for marker, following in zip(markers, [*markers[1:], None][: len(markers)], strict=True):
        end = following.start() if following else len(text)
        body = text[marker.end() : end]
        if following is None:
            body = ANSWER_FORMAT.split(body)[0]
        label = label_of(marker)
        if label in options:
            raise OptionParseError(f"option {label!r} appears twice")
        options[label] = body.strip()
    return options


def parse_options(instruction: str, answer_kind: str, labels: tuple[str, ...]) -> dict[str, str]:
    """Maps each option label of a multiple-choice item to the option's text.

    Args:
        instruction: The item's LLM-Adapters instruction.
        answer_kind: "label" (commonsense sets) or "letter" (AQuA); numeric tasks have no options.
        labels: The task's labels; every parsed label must be one of them.

    Returns:
        ``{label: text}`` in option order, labels lowercase for "label" tasks and A-E for "letter".

    Raises:
        OptionParseError: Fewer than two options, an empty option, labels out of order or not in ``labels``.
    """
    if answer_kind == "number":
        raise OptionParseError("numeric answers have no options to score; use generation for this task")
    if answer_kind == "letter":
        choices = AQUA_CHOICES.split(instruction, maxsplit=1)
        if len(choices) != 2:
            raise OptionParseError("no 'Answer Choices:' in the instruction")
        text = choices[1]
        options = _split_on_markers(text, list(AQUA_MARKER.finditer(text)), lambda m: m.group(1))
    elif set(labels) == {"true", "false"}:
        options = {"true": "true", "false": "false"}
    else:
        markers = list(OPTION_MARKER.finditer(instruction))
        options = _split_on_markers(instruction, markers, lambda m: f"{m.group(1).lower()}{m.group(2)}")
        if markers and markers[0].group(1) == "Option":
            options = _fill_blank(instruction[: markers[0].start()], options)
    _check(options, labels)
    return options


def _fill_blank(question: str, options: dict[str, str]) -> dict[str, str]:
    found = BLANK_SENTENCE.search(question)
    if not found or found.group(1).count("_") != 1:
        raise OptionParseError("a fill-in-the-blank item needs 'the given sentence: ...' with exactly one '_'")
    sentence = found.group(1)
    return {label: sentence.replace("_", text) for label, text in options.items()}


def _check(options: dict[str, str], labels: tuple[str, ...]) -> None:
    if len(options) < 2:
        raise OptionParseError(f"found {len(options)} answer option(s), need at least 2")
    unknown = [label for label in options if label not in labels]
    if unknown:
        raise OptionParseError(f"option labels {unknown} are not among the task's labels {list(labels)}")
    if list(options) != list(labels[: len(options)]):
        raise OptionParseError(f"options {list(options)} are not the task's labels in order {list(labels)}")
    empty = [label for label, text in options.items() if not text]
    if empty:
        raise OptionParseError(f"empty option text for {empty}")
