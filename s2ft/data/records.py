"""Readers that turn the benchmark files (and hub datasets) into one record type, `Example`.

Every reader validates each record and fails on the first bad one with the file and the record index, so a broken
download is caught before any model is loaded.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import datasets

from s2ft.errors import UserError

LLM_ADAPTERS_FIELDS = ("instruction", "input", "output", "answer")
_CALCULATOR_ANNOTATION = re.compile(r"<<[^>]*>>")


class DataError(UserError, ValueError):
    """A data file or record that cannot be used as it is."""


@dataclass
class Example:
    """One instruction-following item in the LLM-Adapters shape.

    Attributes:
        id: Unique within its task, e.g. ``"gsm8k-12"``.
        task: Task or training-source name the item came from.
        instruction: The question, as shown to the model.
        input: Optional extra context (empty for every shipped set).
        output: The training target (a worked solution or "the correct answer is X"); may be empty in test sets.
        answer: The gold answer used for scoring: a number, a letter or a label.
    """

    id: str
    task: str
    instruction: str
    input: str
    output: str
    answer: str


def require_file(path: str | Path) -> Path:
    """Returns ``path`` as a Path, or raises FileNotFoundError saying how to point the suite at the data."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"data file {path} does not exist. The benchmark files ship in the repository's data/ folder; "
            "point the run at the folder holding llm-adapters/ and gsm8k/ with paths.data_dir=/path/to/data"
        )
    return path


def format_number(value: float | int | str) -> str:
    """Formats a numeric answer without a spurious ".0" (2.0 -> "2", 1.25 -> "1.25", "1,000" -> "1000")."""
    number = float(str(value).replace(",", ""))
    return str(int(number)) if number.is_integer() else repr(number)


def _record_error(path: Path, index: int, problem: str) -> DataError:
    return DataError(f"{path}: record {index}: {problem}")


def _load_json_list(path: Path) -> list:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def read_llm_adapters(path: str | Path, task: str) -> list[Example]:
    """Reads an LLM-Adapters JSON file: a list of ``{"instruction", "input", "output", "answer"}``.

    Args:
        path: The JSON file.
        task: Name stored in each Example (and used in its id).

    Returns:
        One Example per record, in file order.

    Raises:
        FileNotFoundError: The file is missing.
        DataError: A record is not a dict, lacks a field, has a non-string field, an empty instruction or an empty
            answer; the message names the file and the record index.
    """
    path = require_file(path)
    examples = []
    for index, record in enumerate(_load_json_list(path)):
        if not isinstance(record, dict):
            raise _record_error(path, index, f"expected an object, got {type(record).__name__}")
        for field in LLM_ADAPTERS_FIELDS:
            if field not in record:
                raise _record_error(path, index, f"missing field {field!r} (need {', '.join(LLM_ADAPTERS_FIELDS)})")
            if not isinstance(record[field], str):
                raise _record_error(
                    path, index, f"field {field!r} must be a string, got {type(record[field]).__name__}"
                )
        if not record["instruction"].strip():
            raise _record_error(path, index, "empty instruction")
        if not record["answer"].strip():
            raise _record_error(path, index, "empty answer")
        examples.append(Example(f"{task}-{index}", task, *(record[field] for field in LLM_ADAPTERS_FIELDS)))
    return examples


def gsm8k_solution(answer: str) -> tuple[str, str]:
    """Splits a GSM8K answer into a clean worked solution and the final number.

    The ``<<48/2=24>>`` calculator annotations are removed and the ``#### N`` line becomes the sentence
    "The answer is N." (the LLM-Adapters rationale style), so the model learns to end with a phrase the
    evaluator's last-number rule reads correctly.

    Returns:
        (solution, number), the number without thousands separators.
    """
    reasoning, sep, final = answer.rpartition("####")
    if not sep or not final.strip():
        raise ValueError("no '#### N' final answer")
    number = final.strip().replace(",", "")
    reasoning = _CALCULATOR_ANNOTATION.sub("", reasoning).strip()
    return f"{reasoning}\nThe answer is {number}.".lstrip(), number


def read_gsm8k(path: str | Path, task: str = "gsm8k") -> list[Example]:
    """Reads the original GSM8K JSONL (``{"question", "answer"}`` per line) into Examples.

    The instruction is the question, the output the annotation-free worked solution ending in
    "The answer is N.", the answer N (see `gsm8k_solution`).

    Raises:
        FileNotFoundError: The file is missing.
        DataError: A line is not JSON, not an object, lacks a string question/answer, or has no ``#### N``;
            the message names the file and the record index (non-empty lines, counting from 0).
    """
    path = require_file(path)
    examples = []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for index, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise _record_error(path, index, f"not valid JSON ({err})") from err
        if not isinstance(record, dict):
            raise _record_error(path, index, f"expected an object, got {type(record).__name__}")
        for field in ("question", "answer"):
            if not isinstance(record.get(field), str) or not record[field].strip():
                raise _record_error(path, index, f"field {field!r} must be a non-empty string")
        try:
            solution, number = gsm8k_solution(record["answer"])
        except ValueError as err:
            raise _record_error(path, index, f"answer has {err}") from err
        examples.append(Example(f"{task}-{index}", task, record["question"].strip(), "", solution, number))
    return examples


def read_mawps_raw(path: str | Path, task: str = "mawps") -> list[Example]:
    """Reads the raw MAWPS train set (``original_text``, ``equation``, ``ans``).

    MAWPS has no rationale, so the target is the equation followed by the answer sentence:
    "X=((22.0-14.0)/4.0). The answer is 2."

    Raises:
        FileNotFoundError: The file is missing.
        DataError: A record is not an object, lacks a text/equation, or has a non-numeric ``ans``
            (file and record index in the message).
    """
    path = require_file(path)
    examples = []
    for index, record in enumerate(_load_json_list(path)):
        if not isinstance(record, dict):
            raise _record_error(path, index, f"expected an object, got {type(record).__name__}")
        for field in ("original_text", "equation"):
            if not isinstance(record.get(field), str) or not record[field].strip():
                raise _record_error(path, index, f"field {field!r} must be a non-empty string")
        try:
            answer = format_number(record["ans"])
        except (KeyError, ValueError, TypeError):
            raise _record_error(path, index, f"field 'ans' must be a number, got {record.get('ans')!r}") from None
        output = f"{record['equation'].strip()}. The answer is {answer}."
        examples.append(Example(f"{task}-{index}", task, record["original_text"].strip(), "", output, answer))
    return examples


def _from_llm_adapters_row(row: dict) -> tuple[str, str, str, str]:
    return row["instruction"], row.get("input") or "", row["output"], row.get("answer") or ""


def _from_alpaca_row(row: dict) -> tuple[str, str, str, str]:
    # Open-ended instructions: there is no gold answer to score, only a response to train on.
    return row["instruction"], row.get("input") or "", row["output"], ""


def _from_hellaswag_row(row: dict) -> tuple[str, str, str, str]:
    # The LLM-Adapters HellaSwag prompt, so hub items look like the other commonsense sets.
    context = f"{row['activity_label']}: {row['ctx']}"
    endings = " ".join(f"Ending{i + 1}: {ending}" for i, ending in enumerate(row["endings"]))
    formats = "/".join(f"ending{i + 1}" for i in range(len(row["endings"])))
    instruction = (
        f"Please choose the correct ending to complete the given sentence: {context}\n\n{endings}\n\n"
        f"Answer format: {formats}"
    )
    answer = f"ending{int(row['label']) + 1}"
    return instruction, "", f"the correct answer is {answer}", answer


# name -> (hub id, row converter). Hub ids are the public mirrors of the LLM-Adapters / Alpaca-GPT4 releases.
HUB_DATASETS = {
    "commonsense_170k": ("zwhe99/commonsense_170k", _from_llm_adapters_row),
    "math_10k": ("lmms-lab/Math10K", _from_llm_adapters_row),
    "alpaca_gpt4": ("vicgalle/alpaca-gpt4", _from_alpaca_row),
    "hellaswag": ("Rowan/hellaswag", _from_hellaswag_row),
}


def load_hub(name: str, split: str) -> list[Example]:
    """Loads a Hugging Face hub dataset (needs a network or a warm ``datasets`` cache).

    Args:
        name: One of `HUB_DATASETS`: commonsense_170k, math_10k, alpaca_gpt4 (train) or hellaswag (validation is
            the split the commonsense literature reports).
        split: The hub split, e.g. "train".

    Raises:
        KeyError: Unknown name.
        DataError: The download failed (offline, or the id moved; the message says what to use instead) or a row
            lacks the fields its converter reads (dataset and record index in the message).
    """
    if name not in HUB_DATASETS:
        raise KeyError(f"unknown hub dataset {name!r}; known: {', '.join(HUB_DATASETS)}")
    hub_id, convert = HUB_DATASETS[name]
    try:
        rows = datasets.load_dataset(hub_id, split=split)
    except Exception as err:  # datasets raises many types (ConnectionError, OfflineModeIsEnabled, HfHubHTTPError ...)
        raise DataError(
            f"could not load {name} ({hub_id}, split {split!r}) from the Hugging Face hub: {err}. It needs a network "
            "(or a datasets cache that holds it); offline, use the local sets (e.g. data.train=[commonsense_mix])"
        ) from err
    examples = []
    for index, row in enumerate(rows):
        try:
            examples.append(Example(f"{name}-{index}", name, *convert(row)))
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{hub_id} ({split}): record {index}: unexpected fields ({err!r}): {sorted(row)}") from err
    return examples
