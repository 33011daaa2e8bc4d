"""A user's own training data (s2ft/data/user.py): every file type and format, the column mapping, the hub path
(a local folder through the real `datasets.load_dataset`, and a `save_to_disk` folder), mixing with registered
sources, the errors (named field and line, empty set, unknown format), provenance and the overlap guard."""

import gzip
import json
import logging
from pathlib import Path

import datasets
import pandas as pd
import pytest
from conftest import DATA

from s2ft.data import Example, load_train
from s2ft.data.checks import check_train_spec
from s2ft.data.overlap import DataOverlapError, check_overlap
from s2ft.data.records import DataError
from s2ft.data.sources import describe_train_sources
from s2ft.data.tasks import resolve_train_items
from s2ft.data.tokenize import tokenize_examples
from s2ft.data.user import UserSource, file_digest, load_user_source, parse_source
from s2ft.evaluation.checks import check_task_spec
from s2ft.models import tiny_tokenizer

ALPACA = [
    {"instruction": "Name a colour.", "input": "", "output": "Red."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
]
EXPECTED = [
    ("Name a colour.", "", "Red."),
    ("Add the numbers.", "2 and 3", "5"),
]


def fields(examples: list[Example]) -> list[tuple[str, str, str]]:
    return [(ex.instruction, ex.input, ex.output) for ex in examples]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_every_file_type_reads_alpaca_records(tmp_path, suffix):
    path = tmp_path / f"train{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(ALPACA))
    elif suffix == ".jsonl":
        write_jsonl(path, ALPACA)
    else:
        frame = pd.DataFrame(ALPACA)
        frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    examples = load_user_source(str(path))
    assert fields(examples) == EXPECTED
    assert [ex.id for ex in examples] == ["train-0", "train-1"] and {ex.task for ex in examples} == {"train"}


def test_chat_records(tmp_path):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "4"},
                    {"role": "user", "content": "And 3+3?"},
                    {"role": "assistant", "content": "6"},
                ]
            },
        ],
    )
    assert fields(load_user_source(str(path))) == [
        ("Hi?", "", "Hello."),
        ("And 3+3?", "system: Be brief.\nuser: 2+2?\nassistant: 4", "6"),
    ]


def test_prompt_completion_records_and_numbers_as_text(tmp_path):
    path = tmp_path / "pc.csv"
    path.write_text("prompt,completion,answer\nWhat is 2+2?,It is 4.,4\nWhat is 3+3?,It is 6.,6\n")
    examples = load_user_source(str(path))
    assert fields(examples) == [("What is 2+2?", "", "It is 4."), ("What is 3+3?", "", "It is 6.")]
    assert [ex.answer for ex in examples] == ["4", "6"]


def test_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "Name a colour.", "a": "Red."}, {"q": "Sky?", "a": "Blue."}])
    spec = {"path": str(path), "format": "alpaca", "columns": {"instruction": "q", "output": "a"}, "name": "mine"}
    examples = load_user_source(spec)
    assert fields(examples) == [("Name a colour.", "", "Red."), ("Sky?", "", "Blue.")]
    assert examples[0].id == "mine-0"
    # The mapping alone says the format (its instruction column is present).
    assert fields(load_user_source({"path": str(path), "columns": {"instruction": "q", "output": "a"}})) == fields(
        examples
    )


def test_hub_dataset_through_load_dataset_and_a_saved_dataset(tmp_path):
    folder = tmp_path / "org_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ALPACA)
    write_jsonl(folder / "test.jsonl", ALPACA[:1])
    assert fields(load_user_source({"hub": str(folder)})) == EXPECTED
    assert fields(load_user_source({"hub": str(folder), "split": "test"})) == EXPECTED[:1]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA)}).save_to_disk(str(saved))
    assert fields(load_user_source({"path": str(saved)})) == EXPECTED
    with pytest.raises(DataError, match="no split 'validation'"):
        load_user_source({"path": str(saved), "split": "validation"})


def test_a_folder_without_the_split_names_the_split_and_the_fix(tmp_path):
    """Before, an evaluation task (split test by default) on a folder holding only mydata.jsonl (split train) failed
    with "could not read FOLDER: ValueError: Unknown split ..." and no word of the split: setting."""
    folder = tmp_path / "mine"
    folder.mkdir()
    write_jsonl(folder / "mydata.jsonl", [{"instruction": "Q", "output": "B"}])
    problems = check_task_spec([{"name": "mine", "path": str(folder), "answer": "letter"}], DATA)
    assert problems == [
        f"eval.tasks: {folder}: no split 'test' (Unknown split \"test\". Should be one of ['train'].); set split: NAME"
    ]
    assert check_task_spec([{"name": "mine", "path": str(folder), "answer": "letter", "split": "train"}], DATA) == []


def test_a_local_file_as_hub_a_folder_as_dot_and_a_field_twice_in_a_message(tmp_path, monkeypatch):
    """Before: hub: train.jsonl tried the network (~40 s offline) and failed as "not cached"; path: . failed with
    datasets' "dataset_name should be specified"; a chat message naming content twice was read as a messages struct
    and refused as "field 'messages' must be a non-empty list"."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", ALPACA)

    def offline(*args, **kwargs):
        raise AssertionError("load_dataset was called")

    with monkeypatch.context() as patched:
        patched.setattr(datasets, "load_dataset", offline)
        with pytest.raises(DataError, match=r"hub 'train.jsonl' is a local data file; give it as path: train.jsonl$"):
            load_user_source({"hub": "train.jsonl"})
    assert fields(load_user_source({"path": "."})) == EXPECTED
    chat = tmp_path / "chat" / "chat.jsonl"
    chat.parent.mkdir()
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    twice = '{"messages": [{"role": "user", "content": "hi", "content": "x"}, {"role": "assistant", "content": "yo"}]}'
    chat.write_text(json.dumps(good) + "\n" + twice + "\n")
    with pytest.raises(DataError, match=rf"^{chat}: line 2 has the field 'content' twice; keep one$"):
        load_user_source(str(chat))
    array = tmp_path / "chat" / "chat.json"
    array.write_text("[" + json.dumps(good) + ", " + twice + "]")
    with pytest.raises(DataError, match=rf"^{array}: an object names the field 'content' twice; keep one$"):
        load_user_source(str(array))


def test_hub_id_that_cannot_load_is_a_data_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"could not read hub dataset org/name \(train\): ConnectionError: offline"):
        load_user_source({"hub": "org/name", "config": "main"})


def test_missing_field_names_the_field_and_the_first_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "Q1", "output": "A1"}\n\n{"instruction": "Q2"}\n{"instruction": "Q3"}\n')
    with pytest.raises(DataError, match=rf"^{path}: line 3: missing field 'output'$"):
        load_user_source(str(path))
    mapped = write_jsonl(tmp_path / "mapped.jsonl", [{"q": "Q1", "a": "A1"}, {"q": "Q2", "a": None}])
    with pytest.raises(DataError, match=r"line 2: missing field 'output' \(column 'a'\)"):
        load_user_source({"path": str(mapped), "columns": {"instruction": "q", "output": "a"}})
    csv = tmp_path / "bad.csv"
    csv.write_text("prompt,completion\nhi,there\nbye,\n")
    with pytest.raises(DataError, match=r"bad.csv: line 3: missing field 'completion'"):
        load_user_source(str(csv))
    listed = tmp_path / "bad.json"
    listed.write_text(json.dumps([ALPACA[0], {"instruction": "", "output": "x"}]))
    with pytest.raises(DataError, match=r"bad.json: record 1: empty instruction"):
        load_user_source(str(listed))


def test_csv_cells_are_read_as_written(tmp_path):
    """Before, pandas' type inference trained a column of numbers as floats (7 -> "7.0", 01234 -> "1234.0") and took
    None, NA or null for a missing value (an error naming a field the file has)."""
    csv = tmp_path / "answers.csv"
    csv.write_text("instruction,output\nZip?,01234\nPrice?,1.50\nCount?,7\nWho?,None\nAnd?,NA\n")
    assert [ex.output for ex in load_user_source(str(csv))] == ["01234", "1.50", "7", "None", "NA"]
    csv.write_text("instruction,output\nCount?,7\nEmpty?,\n")
    with pytest.raises(DataError, match=r"answers.csv: line 3: missing field 'output'$"):
        load_user_source(str(csv))


def test_a_folder_without_data_files_is_named_as_such(tmp_path):
    """Before, an empty folder gave datasets' "FileNotFoundError: Couldn't resolve pattern ** with resolver
    functools.partial(<function resolve_pattern at 0x...>, ...)", and a folder of notes read as one text column."""
    folder = tmp_path / "my data"
    folder.mkdir()
    message = (
        f"{folder}: the folder holds no data file (.json, .jsonl, .csv, .parquet) and is not a folder saved with "
        "datasets' save_to_disk; point the path at the data file or its folder"
    )
    for notes in (None, "notes.txt"):
        if notes:
            (folder / notes).write_text("Q: A\n")
        with pytest.raises(DataError) as refused:
            load_user_source(str(folder))
        assert str(refused.value) == message
    with gzip.open(folder / "train.jsonl.gz", "wt") as file:  # a compressed file is a data file too
        file.write("".join(json.dumps(record) + "\n" for record in ALPACA))
    assert fields(load_user_source(str(folder))) == EXPECTED


def test_a_column_mapping_to_a_column_no_record_has_is_refused(tmp_path):
    """Before, only the required fields' mapping was checked: a typo in the input's or the answer's column trained every
    item without its input, or scored an evaluation task against the responses instead of the answers."""
    path = write_jsonl(tmp_path / "mapped.jsonl", [{"q": "Q", "ctx": "C", "a": "A", "gold": "G"}])
    columns = {"instruction": "q", "input": "context", "output": "a"}
    message = (
        f"{path}: columns maps 'input' to 'context', but no record has that column (columns: ['q', 'ctx', 'a', "
        "'gold']); fix the column name or leave the field out of columns"
    )
    with pytest.raises(DataError) as refused:
        load_user_source({"path": str(path), "columns": columns})
    assert str(refused.value) == message
    task = {"name": "t", "path": str(path), "answer": "text", "columns": {"instruction": "q", "answer": "gld"}}
    assert check_task_spec([task], DATA) == [
        f"eval.tasks: {path}: columns maps 'answer' to 'gld', but no record has that column (columns: ['q', 'ctx', "
        "'a', 'gold']); fix the column name or leave the field out of columns"
    ]
    columns = {"instruction": "q", "input": "ctx", "output": "a", "answer": "gold"}
    assert load_user_source({"path": str(path), "columns": columns}) == [
        Example("mapped-0", "mapped", "Q", "C", "A", "G")
    ]


def test_json_numbers_train_as_written_when_ints_and_floats_mix(tmp_path):
    """Before, arrow read a JSON column mixing ints and floats as floats and the target of {"output": 4} was "4.0"."""
    records = [{"instruction": "Legs?", "output": 4}, {"instruction": "Half?", "output": 0.5}]
    path = write_jsonl(tmp_path / "counts.jsonl", records)
    assert [ex.output for ex in load_user_source(str(path))] == ["4", "0.5"]
    chat = [
        {"messages": [{"role": "user", "content": 2}, {"role": "assistant", "content": 4}]},
        {"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": 0.5}]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", chat)
    assert fields(load_user_source(str(path))) == [("2", "", "4"), ("1", "", "0.5")]


def test_a_json_nan_is_a_missing_field_not_the_text_nan(tmp_path):
    """Before, a NaN (pandas' missing value, which json.dumps writes as NaN) in a column without a text was read as
    the text "nan": every input "nan", a gold answer "nan" in place of the response, a response "nan" trained on."""
    path = tmp_path / "frame.jsonl"
    path.write_text(
        '{"instruction": "Q1", "input": NaN, "output": "A1", "answer": NaN}\n'
        '{"instruction": "Q2", "input": NaN, "output": "A2", "answer": 2}\n'
    )
    assert load_user_source(str(path)) == [
        Example("frame-0", "frame", "Q1", "", "A1", ""),
        Example("frame-1", "frame", "Q2", "", "A2", "2"),
    ]
    path.write_text('{"instruction": "Q1", "output": NaN}\n{"instruction": "Q2", "output": NaN}\n')
    with pytest.raises(DataError, match=rf"^{path}: line 1: missing field 'output'$"):
        load_user_source(str(path))


def test_a_csv_record_after_a_multi_line_field_is_named_by_its_own_line(tmp_path):
    """Before, lines were counted as records: the bad record on line 6 was reported at line 4, inside record 1."""
    csv = tmp_path / "long.csv"
    csv.write_text('instruction,output\nQ1,"line one\nline two\nline three"\n\nQ2,A2\nQ3,\n')
    with pytest.raises(DataError, match=r"long.csv: line 7: missing field 'output'$"):
        load_user_source(str(csv))
    csv.write_text('instruction,output\nQ1,"line one\nline two"\nQ2,A2\n')
    assert fields(load_user_source(str(csv))) == [("Q1", "", "line one\nline two"), ("Q2", "", "A2")]


def test_a_json_array_in_a_jsonl_file_names_records_not_lines(tmp_path):
    """Before, a pretty-printed JSON array saved as .jsonl (datasets reads it) had its records named by its non-blank
    lines: the bad second record was reported at "line 2", the first record's opening brace."""
    path = tmp_path / "pretty.jsonl"
    path.write_text(json.dumps([ALPACA[0], {"instruction": "Q2", "output": ""}], indent=2))
    with pytest.raises(DataError, match=rf"^{path}: record 1: empty response \(output\)$"):
        load_user_source(str(path))
    path.write_text(json.dumps([{"instruction": "Q1", "answer": "B"}, {"instruction": "Q2", "answer": "seven"}]))
    (problem,) = check_task_spec([{"name": "p", "path": str(path), "answer": "letter"}], DATA)
    assert problem == f"eval.tasks: task p, item p-1 ({path}: record 1): gold answer 'seven' is not a letter A-E"
    records = [{"instruction": "Q1", "answer": "A", "options": ["x", "y"]}, {"instruction": "Q2", "answer": "A"}]
    path.write_text(json.dumps(records, indent=1))
    (problem,) = check_task_spec([{"name": "p", "path": str(path), "answer": "letter", "mode": "loglik"}], DATA)
    assert problem.startswith(f"eval.tasks: {path}: record 1: options must be a list of texts")


def test_a_csv_record_with_more_fields_than_the_header_is_refused(tmp_path):
    """Before, when the first record had an extra field (an unquoted comma, a trailing comma on every line), pandas took
    each record's first field as its index and read the others one column left: "Q1,A1,extra" trained on the
    instruction "A1" with the output "extra", and "Q1,A1," was refused as missing its output."""
    csv = tmp_path / "shifted.csv"
    message = r'line {} has 3 fields but the header 2; quote a field that holds a comma \("a, b"\) and remove trailing'
    for content, line in [
        ("instruction,output\nQ1,A1,extra\nQ2,A2,more\n", 2),
        ("instruction,output\nQ1,A1,\nQ2,A2,\n", 2),
        ('instruction,output\n\nQ1,"A1\nstill A1"\nQ2,A2,more\n', 5),  # its own line, after a blank and a 2-line one
    ]:
        csv.write_text(content)
        with pytest.raises(DataError, match=rf"^{csv}: {message.format(line)}"):
            load_user_source(str(csv))
    csv.write_text('instruction,output\nQ1,"A1, with a comma"\nQ2,\n')  # quoted commas are one field
    with pytest.raises(DataError, match=r"shifted.csv: line 3: missing field 'output'$"):
        load_user_source(str(csv))


def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path):
    """pandas renamed the second column ("output.1") and the first one trained, the other silently dropped."""
    csv = tmp_path / "twice.csv"
    for content in ("instruction,output,output\nQ1,A1,B1\n", "\ufeffinstruction,instruction,output\nQ1,Q2,A1\n"):
        csv.write_text(content, encoding="utf-8")
        with pytest.raises(DataError, match=rf"^{csv}: the header names the column '(output|instruction)' twice; keep"):
            load_user_source(str(csv))
    csv.write_text("\ufeffinstruction,output\nQ1,A1\n", encoding="utf-8")  # a byte-order mark is not part of a name
    (example,) = load_user_source(str(csv))
    assert (example.instruction, example.output) == ("Q1", "A1")


def test_a_field_absent_from_every_record_and_chat_without_a_response(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"instruction": "Q1"}])
    with pytest.raises(DataError, match=r"no field 'output' in any record \(columns: \['instruction'\]\)"):
        load_user_source({"path": str(path), "format": "alpaca"})
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(
        DataError,
        match=r"c.jsonl: line 1: the last message must be the assistant's response \(role "
        r"'assistant'\), not a 'user' message$",
    ):
        load_user_source(str(chat))
    # ShareGPT's role names were taken for other roles: "the last message must be the assistant's response".
    sharegpt = [{"role": "human", "content": "Hi"}, {"role": "gpt", "content": "Hello"}]
    chat = write_jsonl(tmp_path / "s.jsonl", [{"messages": sharegpt}])
    with pytest.raises(
        DataError,
        match=r"s.jsonl: line 1: messages use ShareGPT's role names; rename them \(human -> "
        r"user, gpt -> assistant\): roles are system, user, assistant$",
    ):
        load_user_source(str(chat))
    # OpenAI-style content parts were read as their Python repr ("[{'type': 'text', ...}]") and trained on.
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}, {"role": "assistant", "content": "Hello"}]
    chat = write_jsonl(tmp_path / "parts.jsonl", [{"messages": parts}])
    with pytest.raises(DataError, match=r"parts.jsonl: line 1: a user message's content is a list, not text; give"):
        load_user_source(str(chat))


def test_empty_set_unknown_format_and_unknown_columns(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match="empty.json holds no records"):
        load_user_source(str(empty))
    # Before, datasets' "could not read ...: ArrowInvalid: BatchSize must be greater than 0, got 0".
    pd.DataFrame({"instruction": [], "output": []}, dtype=str).to_parquet(tmp_path / "none.parquet")
    with pytest.raises(DataError, match=rf"^{tmp_path}/none.parquet holds no records$"):
        load_user_source(str(tmp_path / "none.parquet"))
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "Q", "reply": "A"}])
    with pytest.raises(DataError, match=r"cannot tell the format from its columns \['question', 'reply'\]"):
        load_user_source(str(odd))
    with pytest.raises(DataError, match="unknown format 'sharegpt'; use one of alpaca, chat, prompt_completion"):
        parse_source({"path": str(odd), "format": "sharegpt"})
    with pytest.raises(DataError, match=r"columns maps unknown fields \['question'\]"):
        parse_source({"path": str(odd), "format": "alpaca", "columns": {"question": "q"}})
    with pytest.raises(DataError, match="unknown file type '.txt'"):
        parse_source("notes.txt")
    with pytest.raises(DataError, match="needs exactly one of path"):
        parse_source({"split": "train"})
    with pytest.raises(DataError, match=r"unknown keys \['colums'\]"):
        parse_source({"path": "a.json", "colums": {}})
    with pytest.raises(DataError, match="data file missing.jsonl does not exist"):
        load_user_source("missing.jsonl")
    plain = tmp_path / "records"
    plain.write_text("{}")
    with pytest.raises(DataError, match="records: unknown file type"):
        load_user_source({"path": str(plain)})


def test_unreadable_files_name_the_line_and_the_fix(tmp_path):
    """Before: a Latin-1 JSONL passed datasets and crashed with a UnicodeDecodeError traceback, a Latin-1 or ragged CSV
    and a JSONL with one broken line gave datasets' "An error occurred while generating the dataset" or a byte
    position, never the line."""
    records = [json.dumps({"instruction": f"Q{i}", "output": "A"}) for i in range(4)]
    cases = {  # file -> (its bytes, the message expected; {path} is the file's path)
        "latin.jsonl": (
            "\n".join([*records[:2], '{"instruction": "Caf\u00e9", "output": "A"}']).encode("latin-1"),
            r"^{path}: line 3 is not UTF-8 text \(byte 0xe9\); save the file as UTF-8, e",
        ),
        "latin.csv": (
            "instruction,output\nCaf\u00e9,A\n".encode("latin-1"),
            r"latin.csv: line 2 is not UTF-8 text .*iconv -f latin1 -t utf-8 latin.csv",
        ),
        "broken.jsonl": (
            ("\n".join([*records[:2], '{"instruction": "Q", "output": ', *records[2:]]) + "\n").encode(),
            r"^{path}: line 3 is not valid JSON \(Expecting value at column 32\); fix",
        ),
        "lists.jsonl": (
            b'["Q1", "A1"]\n["Q2", "A2"]\n',
            r"lists.jsonl: line 1 is not a record \{{field: value, ...\}} but \[",
        ),
        "notes.json": (b"Q: A\n", r"notes.json: not valid JSON \(Expecting value at line 1, column 1\)"),
        # Before, "could not read ...: ValueError: If using all scalar values, you must pass an index".
        "twice.jsonl": (
            ("\n".join([*records[:2], '{"instruction": "Q", "instruction": "Q2", "output": "A"}']) + "\n").encode(),
            r"^{path}: line 3 has the field 'instruction' twice; keep one$",
        ),
        "ragged.csv": (
            b"instruction,output\nQ1,A1\nQ2,A2,extra\n",
            r"ragged.csv: line 3 has 3 fields but the header 2; quote a field",
        ),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError, match=message.format(path=path)):
            load_user_source(str(path))
    # A line separator inside a string (U+2028, U+0085: written raw with ensure_ascii=False) does not end a line.
    separated = tmp_path / "separated.jsonl"
    record = json.dumps({"instruction": "Q1\u2028\u0085more", "output": "A"}, ensure_ascii=False)
    separated.write_text(f"{record}\n{{broken\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{separated}: line 2 is not valid JSON"):
        load_user_source(str(separated))
    # The config check reports them as it reports a bad record: one line each, before any model.
    latin = tmp_path / "latin.jsonl"
    assert check_train_spec([str(latin)], DATA)[0].startswith(f"data.train: {latin}: line 3 is not UTF-8")


def test_a_json_file_of_one_value_is_refused_not_a_crash(tmp_path):
    """Before, a .json or .jsonl file holding only null killed the process with a segmentation fault inside datasets
    (the config check included), and one holding 42 or "text" gave pandas' "DataFrame constructor not properly
    called!"."""
    cases = {
        "none.json": (
            "null",
            "holds the JSON value null, not records; write a list [{field: value, ...}, ...] (.json)",
        ),
        "none.jsonl": ("null\n", "line 1 is not a record {field: value, ...} but null"),
        "count.json": ("\ufeff42", "holds the JSON value 42, not records; write a list"),
        "text.json": ('"hello"', 'holds the JSON value "hello", not records; write a list'),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_text(content, encoding="utf-8")
        with pytest.raises(DataError) as refused:
            load_user_source(str(path))
        assert str(refused.value).startswith(f"{path}: {message}")
        assert check_train_spec([str(path)], DATA) == [f"data.train: {refused.value}"]
    for content in ("[ ]", "[\n]\n", "{}", "{ }\n"):  # before: datasets' 'Instruction "train" corresponds to no data!'
        (tmp_path / "empty.json").write_text(content)
        with pytest.raises(DataError, match=rf"^{tmp_path}/empty.json holds no records$"):
            load_user_source(str(tmp_path / "empty.json"))
    record = '{"instruction": "Q", "output": "A"}'
    for name, content in {"records.json": f"\n [{record}]\n", "records.jsonl": f"\ufeff\n {record}\n"}.items():
        (tmp_path / name).write_text(content, encoding="utf-8")  # a blank line first (and a byte-order mark): loads
        assert [e.output for e in load_user_source(str(tmp_path / name))] == ["A"]


def test_two_training_sources_of_one_name_are_refused(tmp_path):
    """Before: data.train=[a/train.jsonl, b/train.jsonl] gave items of both the ids train-0, train-1, ... and the run's
    record credited each file with the items of both."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, second = (write_jsonl(tmp_path / folder / "train.jsonl", ALPACA) for folder in ("a", "b"))
    message = (
        f"2 training sources are named 'train' ({first}, {second}): their items would share ids and count as one "
        f"source in the run's record; give each its own name, e.g. {{path: {second}, name: train_2}}"
    )
    with pytest.raises(DataError) as refused:
        load_train([str(first), str(second)], DATA)
    assert str(refused.value) == message
    assert check_train_spec([str(first), str(second)], DATA) == [f"data.train: {message}"]
    with pytest.raises(DataError, match=r"2 training sources are named 'boolq' \(boolq, "):
        resolve_train_items(["commonsense_mix", {"path": str(first), "name": "boolq"}])
    renamed = load_train([str(first), {"path": str(second), "name": "train_2"}], DATA)
    assert sorted(ex.id for ex in renamed) == ["train-0", "train-1", "train_2-0", "train_2-1"]
    assert check_train_spec(["commonsense_mix", "boolq", str(first)], DATA) == []  # a registered name twice is one


def test_user_sources_mix_with_registered_ones(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", ALPACA)
    items = resolve_train_items(["boolq", str(path), {"path": str(path), "name": "again"}])
    assert [type(item).__name__ for item in items] == ["TrainSource", "UserSource", "UserSource"]
    mixed = load_train(["boolq", str(path)], DATA, seed=0)
    boolq = load_train(["boolq"], DATA, seed=0)
    assert len(mixed) == len(boolq) + 2
    assert sorted(ex.id for ex in mixed if ex.task == "mine") == ["mine-0", "mine-1"]
    assert load_train(["boolq", str(path)], DATA, seed=0) == mixed  # the seeded shuffle is deterministic


def test_unknown_name_lists_registered_sources_and_files():
    with pytest.raises(KeyError, match="or a data file"):
        resolve_train_items(["no_such_set"])


def test_config_check_reports_every_bad_source_before_any_model(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", ALPACA)
    bad = write_jsonl(tmp_path / "bad.jsonl", [ALPACA[0], {"instruction": "Q"}])
    problems = check_train_spec([str(good), str(bad), "no_such_set", {"path": str(good), "format": "x"}], DATA)
    assert len(problems) == 3
    assert problems[0] == f"data.train: {bad}: line 2: missing field 'output'"
    assert problems[1].startswith("data.train: unknown training source 'no_such_set'")
    assert "unknown format 'x'" in problems[2]
    assert check_train_spec([str(good), "boolq"], DATA) == []
    assert check_train_spec([], DATA)[0].startswith("data.train is empty")


def test_provenance_names_file_digest_and_count(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", ALPACA)
    mine, boolq = describe_train_sources([str(path), "boolq"], DATA)
    resolved = str(path.resolve())
    assert mine == {"name": "mine", "file": str(path), "sha256": file_digest(path), "count": 2, "resolved": resolved}
    assert len(mine["sha256"]) == 64
    assert boolq["name"] == "boolq" and boolq["count"] == len(json.loads(Path(boolq["file"]).read_text()))
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ALPACA)
    (hub,) = describe_train_sources([{"hub": str(folder)}], DATA)
    assert hub["name"] == "ds" and hub["count"] == 2 and hub["sha256"]


def test_user_data_tokenizes_with_the_content_hash_cache_and_counts_truncated_items(tmp_path, caplog):
    long = {"instruction": "x" * 300, "output": "y"}
    path = write_jsonl(tmp_path / "mine.jsonl", [*ALPACA, long])
    examples = load_user_source(str(path))
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING):
        dataset = tokenize_examples(examples, tiny_tokenizer(), 256, cache)
    assert len(dataset) == 2 and "dropped 1 items whose prompt fills max_length=256" in caplog.text
    (cached,) = cache.glob("tokenized-*.arrow")
    tokenize_examples(examples, tiny_tokenizer(), 256, cache)
    assert list(cache.glob("tokenized-*.arrow")) == [cached]
    changed = write_jsonl(tmp_path / "mine.jsonl", [{**ALPACA[0], "output": "Blue."}, *ALPACA[1:]])
    tokenize_examples(load_user_source(str(changed)), tiny_tokenizer(), 256, cache)
    assert len(list(cache.glob("tokenized-*.arrow"))) == 2


def test_overlap_guard_refuses_user_data_holding_builtin_test_questions(tmp_path):
    test_item = json.loads((DATA / "llm-adapters/dataset/boolq/test.json").read_text())[0]
    # Case and punctuation do not hide a copied question.
    copied = {"instruction": test_item["instruction"].upper() + "!!", "output": test_item["output"]}
    path = write_jsonl(tmp_path / "mine.jsonl", [*ALPACA, copied])
    train = load_train([str(path)], DATA)
    from s2ft.data import load_eval

    with pytest.raises(DataOverlapError, match=r"boolq 1/3270"):
        check_overlap(train, {"boolq": load_eval("boolq", DATA)})
    assert check_overlap(train, {"boolq": load_eval("boolq", DATA)}, allow=True)["boolq"] == 1


def test_parse_source_defaults():
    assert parse_source("dir/my.data.jsonl") == UserSource(name="my.data", path="dir/my.data.jsonl")
    assert parse_source({"hub": "org/set", "config": "main"}) == UserSource(name="set", hub="org/set", config="main")


def test_a_folder_datasets_would_read_in_part_is_refused(tmp_path, monkeypatch):
    """Before, datasets read a folder's files by split from their names and by the most common file type, silently:
    a more.jsonl beside train.jsonl, or a b.csv beside a.jsonl, trained on half the data the folder held."""
    named = tmp_path / "named"
    named.mkdir()
    write_jsonl(named / "train.jsonl", ALPACA[:1])
    write_jsonl(named / "more.jsonl", ALPACA[1:])
    write_jsonl(named / "test.jsonl", ALPACA[:1])
    with pytest.raises(DataError) as refused:
        load_user_source(str(named))
    assert str(refused.value) == (
        f"{named}: datasets reads a folder's files by split, from their names (train*, test*, validation*, dev*, "
        "eval* ...; any other name is train only when no file names a split), here train: 1 file, test: 1 file, so 1 "
        "data file(s) would not be read: more.jsonl; name each by its split (train_2.jsonl), or give each file as a "
        "source of its own"
    )
    (named / "more.jsonl").rename(named / "train_2.jsonl")
    assert fields(load_user_source(str(named))) == EXPECTED
    (named / "test.jsonl").unlink()

    mixed = tmp_path / "mixed"
    (mixed / "sub").mkdir(parents=True)
    write_jsonl(mixed / "a.jsonl", ALPACA[:1])
    pd.DataFrame(ALPACA[1:]).to_csv(mixed / "sub" / "b.csv", index=False)
    with pytest.raises(DataError) as refused:
        load_user_source(str(mixed))
    assert str(refused.value) == (
        f"{mixed}: split 'train' mixes file types (csv, json: a.jsonl, sub/b.csv), and datasets reads only the most "
        "common one; save them as one type, or give each file as a source of its own"
    )
    monkeypatch.chdir(tmp_path)  # a relative folder: datasets names its files absolute
    with pytest.raises(DataError, match=r"^mixed: split 'train' mixes file types \(csv, json: a.jsonl, sub/b.csv\)"):
        load_user_source("mixed")
    (mixed / "sub" / "b.csv").unlink()
    write_jsonl(mixed / "sub" / "b.json", ALPACA[1:])  # .json and .jsonl are one type; subfolders are read
    with gzip.open(mixed / "c.jsonl.gz", "wt") as file:  # and a compressed file is of its data suffix's type
        file.write(json.dumps(ALPACA[0]) + "\n")
    (mixed / ".ipynb_checkpoints").mkdir()  # datasets skips names starting with "." or "_"; so does the check
    write_jsonl(mixed / ".ipynb_checkpoints" / "a-checkpoint.jsonl", ALPACA)
    assert sorted(fields(load_user_source(str(mixed)))) == sorted([EXPECTED[0], EXPECTED[0], EXPECTED[1]])


def test_a_bad_file_in_a_folder_is_named_with_its_line(tmp_path):
    """Before, a file of a folder that was not UTF-8 crashed with a UnicodeDecodeError traceback when its records
    were read, and a broken JSONL line gave arrow's "JSON parse error: Column(/output) changed from string to object
    in row 1", naming neither the file nor the line; an empty file is named too."""
    folder = tmp_path / "mine"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", ALPACA)
    bad = folder / "b.jsonl"
    bad.write_bytes(json.dumps(ALPACA[0]).encode() + b'\n{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(DataError) as refused:
        load_user_source(str(folder))
    assert str(refused.value) == (
        f"{bad}: line 2 is not UTF-8 text (byte 0xe9); save the file as UTF-8, e.g. iconv -f latin1 -t utf-8 b.jsonl "
        "> utf8_b.jsonl"
    )
    bad.write_text(json.dumps(ALPACA[0]) + '\n{"instruction": "x", "output": \n')
    with pytest.raises(DataError) as refused:
        load_user_source(str(folder))
    assert str(refused.value) == f"{bad}: line 2 is not valid JSON (Expecting value at column 32); fix or remove it"
    bad.write_text("\n")
    with pytest.raises(DataError) as refused:
        load_user_source(str(folder))
    assert str(refused.value) == f"{bad} (in {folder}) holds no records; remove it or fill it"
