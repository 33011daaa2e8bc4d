"""Answer extraction and scoring of generated outputs, following the LLM-Adapters evaluation scripts.

The rules, per `TaskSpec.answer_kind`:

- ``label`` (commonsense): the first occurrence of one of the task's labels in the lowercased output. LLM-Adapters
  runs ``re.findall("answer1|answer2|...", output)`` on the raw output; two deliberate differences here: the output is
  lowercased (so "True" or "Answer2" count, as the issue asks), and a label only matches as a whole word (not
  preceded by a letter or digit, not followed by one), so "answer1" is not found inside "answer10" and "true" not
  inside "untrue". On the shipped label sets (at most 5 options) the word rule never changes a well-formed answer.
- ``number`` (arithmetic): exactly LLM-Adapters' rule: commas removed, the last match of ``-?\\d+\\.?\\d*``, correct
  when ``|prediction - gold| <= 0.001``.
- ``letter`` (AQuA): LLM-Adapters takes the first capital A-E anywhere in the output, which also fires inside words
  ("Each", "Bob"). Here, in order: the last "answer is (X)" / "answer: X" phrase (the rationale's closing sentence),
  else the last parenthesised "(X)", else the first capital A-E standing alone as a word.

- ``text`` (a user's tasks): the first non-empty line of the output, normalised as SQuAD normalises answers
  (`normalize_text`: lowercase, punctuation and the articles a/an/the dropped, whitespace collapsed), equal to the
  normalised gold.

An output without an answer extracts to None and is scored wrong; extraction never raises on model output.
"""

import math
import re
from functools import lru_cache

NUMBER = re.compile(r"-?\d+\.?\d*")
NUMBER_TOLERANCE = 1e-3
# A lowercase letter only counts in parentheses: "the answer is a multiple of 3" names no option.
LETTER_PHRASE = re.compile(
    r"(?i:answer)\s*(?:(?i:is)|:)\s*:?\s*(?:(?i:option)\s*)?(?:\(([A-Ea-e])\)|([A-E])(?![A-Za-z0-9]))"
)
LETTER_PARENTHESISED = re.compile(r"\(([A-E])\)")
LETTER_WORD = re.compile(r"(?<![A-Za-z0-9])([A-E])(?![A-Za-z0-9])")
ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = re.compile(r"[^\w\s]")


@lru_cache(maxsize=64)
def label_pattern(labels: tuple[str, ...]) -> re.Pattern:
    """The whole-word alternation of ``labels`` (lowercase), longest first."""
    if not labels:
        raise ValueError("a label task needs at least one label")
    alternatives = "|".join(re.escape(label.lower()) for label in sorted(labels, key=len, reverse=True))
    return re.compile(rf"(?<![a-z0-9])(?:{alternatives})(?![a-z0-9])")


def extract_label(output: str, labels: tuple[str, ...]) -> str | None:
    """The first of ``labels`` found as a whole word in the lowercased output, or None."""
    match = label_pattern(tuple(labels)).search(output.lower())
    return match.group(0) if match else None


def extract_number(output: str) -> float | None:
    """The last number in the output after removing commas (LLM-Adapters' rule), or None."""
    numbers = NUMBER.findall(output.replace(",", ""))
    return float(numbers[-1]) if numbers else None


def extract_letter(output: str) -> str | None:
    """The chosen AQuA option A-E (see the module docstring for the rule), or None."""
    phrases = LETTER_PHRASE.findall(output)
    if phrases:
        return "".join(phrases[-1]).upper()
    parenthesised = LETTER_PARENTHESISED.findall(output)
    if parenthesised:
        return parenthesised[-1]
    word = LETTER_WORD.search(output)
    return word.group(1) if word else None


def normalize_text(text: str) -> str:
    """Lowercase, punctuation and the articles a/an/the removed, whitespace collapsed (SQuAD's answer normalisation)."""
    return " ".join(ARTICLES.sub(" ", PUNCTUATION.sub(" ", text.lower())).split())


def extract_text(output: str) -> str | None:
    """The first non-empty line of the output, normalised (`normalize_text`), or None when there is none."""
    line = next((line for line in output.splitlines() if normalize_text(line)), None)
    return None if line is None else normalize_text(line)


def extract(answer_kind: str, output: str, labels: tuple[str, ...] = ()) -> str | float | None:
    """Extracts the answer of one output by the rule of ``answer_kind`` ("label", "number", "letter" or "text")."""
    if answer_kind == "label":
        return extract_label(output, labels)
    if answer_kind == "number":
        return extract_number(output)
    if answer_kind == "letter":
        return extract_letter(output)
    if answer_kind == "text":
        return extract_text(output)
    raise ValueError(f"unknown answer_kind {answer_kind!r}; use label, number, letter or text")


def parse_gold(answer_kind: str, gold: str, labels: tuple[str, ...] = ()) -> str | float:
    """Parses a gold answer, raising ValueError when it cannot be scored (so bad data fails before the model runs).

    Returns:
        A float for "number", an uppercase letter for "letter", a lowercase label for "label", the normalised text
        for "text".
    """
    text = gold.strip()
    if answer_kind == "number":
        try:
            value = float(text.replace(",", ""))
        except ValueError:
            raise ValueError(f"gold answer {gold!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"gold answer {gold!r} is not a finite number")
        return value
    if answer_kind == "letter":
        if len(text) != 1 or text.upper() not in "ABCDE":
            raise ValueError(f"gold answer {gold!r} is not a letter A-E")
        return text.upper()
    if answer_kind == "label":
        if text.lower() not in {label.lower() for label in labels}:
            raise ValueError(f"gold answer {gold!r} is not one of the task's labels {list(labels)}")
        return text.lower()
    if answer_kind == "text":
        if not normalize_text(text):
            raise ValueError(f"gold answer {gold!r} is empty after normalisation")
        lines = [line for line in text.splitlines() if normalize_text(line)]
        if len(lines) > 1:
            # extract_text reads the output's first line, and no line equals the normalised whole of several.
            raise ValueError(
                f"gold answer {gold[:60]!r} has {len(lines)} lines, but a text answer is the output's first line, so "
                "it could never match; give each record a one-line answer field"
            )
        return normalize_text(text)
    raise ValueError(f"unknown answer_kind {answer_kind!r}; use label, number, letter or text")


def is_correct(
    answer_kind: str, extracted: str | float | None, gold: str | float, tolerance: float = NUMBER_TOLERANCE
) -> bool:
    """Whether an extracted answer matches the parsed gold one (numbers within ``tolerance``); None is wrong."""
    if extracted is None:
        return False
    if answer_kind == "number":
        return abs(extracted - gold) <= tolerance
    return extracted == gold


def label_settled(output: str, labels: tuple[str, ...]) -> bool:
    """Whether more generated text can no longer change `extract_label` of this output.

    The first whole-word label match is final once a character follows it; a match at the very end could still
    grow into a longer word ("answer1" -> "answer10"), so it is not settled yet.
    """
    text = output.lower()
    match = label_pattern(tuple(labels)).search(text)
    return match is not None and match.end() < len(text)
