import json
from pathlib import Path

import pytest
from conftest import DATA

from s2ft.data.records import (
    DataError,
    format_number,
    gsm8k_solution,
    load_hub,
    read_gsm8k,
    read_llm_adapters,
    read_mawps_raw,
)

ADAPTERS = DATA / "llm-adapters"


@pytest.mark.parametrize(
    ("relative", "count"),
    [
        ("dataset/gsm8k/test.json", 1319),
        ("dataset/SVAMP/test.json", 1000),
        ("dataset/MultiArith/test.json", 600),
        ("dataset/AddSub/test.json", 395),
        ("dataset/SingleEq/test.json", 508),
        ("dataset/mawps/test.json", 238),
        ("dataset/AQuA/test.json", 254),
        ("dataset/boolq/test.json", 3270),
        ("dataset/piqa/test.json", 1838),
        ("dataset/social_i_qa/test.json", 1954),
        ("dataset/winogrande/test.json", 1267),
        ("dataset/ARC-Easy/test.json", 2376),
        ("dataset/ARC-Challenge/test.json", 1172),
        ("dataset/openbookqa/test.json", 500),
        # data/README.md lists 9426 / 1118 / 4952 for these three train sets: the number of *distinct* questions
        # (the files hold 1, 1 and 5 repeated questions); the readers keep every record.
        ("dataset/boolq/train.json", 9427),
        ("dataset/ARC-Easy/train.json", 2251),
        ("dataset/ARC-Challenge/train.json", 1119),
        ("dataset/openbookqa/train.json", 4957),
        ("ft-training_set/math_data.json", 3260),
    ],
)
def test_read_llm_adapters_real_files(relative, count):
    examples = read_llm_adapters(ADAPTERS / relative, "t")
    assert len(examples) == count
    assert len({ex.id for ex in examples}) == count
    assert all(ex.instruction.strip() and ex.answer.strip() for ex in examples)


def test_read_llm_adapters_keeps_fields():
    raw = json.loads((ADAPTERS / "dataset/boolq/test.json").read_text())[5]
    example = read_llm_adapters(ADAPTERS / "dataset/boolq/test.json", "boolq")[5]
    assert (example.id, example.task) == ("boolq-5", "boolq")
    assert (example.instruction, example.input, example.output, example.answer) == (
        raw["instruction"],
        raw["input"],
        raw["output"],
        raw["answer"],
    )


def _write(tmp_path, records) -> Path:
    path = tmp_path / "set.json"
    path.write_text(json.dumps(records))
    return path


GOOD = {"instruction": "q?", "input": "", "output": "the correct answer is true", "answer": "true"}


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ("not a record", "expected an object, got str"),
        (
            {k: v for k, v in GOOD.items() if k != "answer"},
            "missing field 'answer' (need instruction, input, output, answer)",
        ),
        ({**GOOD, "input": None}, "field 'input' must be a string, got NoneType"),
        ({**GOOD, "answer": 3}, "field 'answer' must be a string, got int"),
        ({**GOOD, "instruction": "  \n"}, "empty instruction"),
        ({**GOOD, "answer": ""}, "empty answer"),
    ],
)
def test_read_llm_adapters_malformed_record_names_file_and_index(tmp_path, bad, problem):
    path = _write(tmp_path, [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as err:
        read_llm_adapters(path, "t")
    assert str(err.value) == f"{path}: record 2: {problem}"


def test_read_llm_adapters_rejects_non_list_and_bad_json(tmp_path):
    with pytest.raises(DataError, match="expected a JSON list of records, got dict"):
        read_llm_adapters(_write(tmp_path, GOOD), "t")
    path = tmp_path / "broken.json"
    path.write_text("[{")
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        read_llm_adapters(path, "t")


def test_missing_file_names_path_and_fix(tmp_path):
    path = tmp_path / "nowhere" / "test.json"
    with pytest.raises(FileNotFoundError) as err:
        read_llm_adapters(path, "t")
    assert str(path) in str(err.value) and "paths.data_dir=" in str(err.value)


def test_gsm8k_solution_strips_annotations_and_extracts_answer():
    solution, number = gsm8k_solution(
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 in all.\n#### 1,072"
    )
    assert solution == "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 in all.\nThe answer is 1072."
    assert number == "1072"
    with pytest.raises(ValueError, match="no '#### N' final answer"):
        gsm8k_solution("no final line")


def test_read_gsm8k_real_files():
    train = read_gsm8k(DATA / "gsm8k/train.jsonl")
    test = read_gsm8k(DATA / "gsm8k/test.jsonl", task="gsm8k_test")
    assert (len(train), len(test)) == (7473, 1319)
    assert test[0].id == "gsm8k_test-0"
    for example in train + test:
        assert "<<" not in example.output and "####" not in example.output
        assert example.output.endswith(f"The answer is {example.answer}.")
        float(example.answer)  # every final answer is a plain number once separators are dropped
    first = json.loads((DATA / "gsm8k/train.jsonl").read_text().splitlines()[0])
    assert train[0].instruction == first["question"]
    assert train[0].answer == first["answer"].split("####")[-1].strip()


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{", "not valid JSON"),
        ("[1]", "expected an object, got list"),
        ('{"question": "q"}', "field 'answer' must be a non-empty string"),
        ('{"question": "q", "answer": "it is 4"}', "answer has no '#### N' final answer"),
    ],
)
def test_read_gsm8k_malformed_line(tmp_path, line, problem):
    path = tmp_path / "g.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n' + line + "\n")
    with pytest.raises(DataError, match=f"g.jsonl: record 1: {problem}"):
        read_gsm8k(path)


def test_read_mawps_raw_real_file():
    examples = read_mawps_raw(ADAPTERS / "dataset/mawps/trainset.json")
    assert len(examples) == 1898
    raw = json.loads((ADAPTERS / "dataset/mawps/trainset.json").read_text())
    assert examples[0].instruction == raw[0]["original_text"]
    assert examples[0].output == "X=((22.0-14.0)/4.0). The answer is 2."
    assert all(
        float(ex.answer) == pytest.approx(float(r["ans"]), abs=1e-12) for ex, r in zip(examples, raw, strict=True)
    )


def test_read_mawps_raw_bad_answer(tmp_path):
    path = _write(tmp_path, [{"original_text": "How many?", "equation": "X=1+1", "ans": "two"}])
    with pytest.raises(DataError, match="record 0: field 'ans' must be a number, got 'two'"):
        read_mawps_raw(path)


def test_format_number():
    assert [format_number(v) for v in (2.0, "15.0", 1.25, "1,000", -3, "0.53")] == [
        "2",
        "15",
        "1.25",
        "1000",
        "-3",
        "0.53",
    ]


def test_load_hub_offline_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"commonsense_170k \(zwhe99/commonsense_170k, split 'train'\).*no network"):
        load_hub("commonsense_170k", "train")
    with pytest.raises(KeyError, match="known: commonsense_170k, math_10k, alpaca_gpt4, hellaswag"):
        load_hub("nope", "train")


def test_load_hub_converts_rows(monkeypatch):
    import datasets

    rows = {
        "zwhe99/commonsense_170k": [
            {"instruction": "q", "input": "", "output": "the correct answer is a", "answer": "a"}
        ],
        "vicgalle/alpaca-gpt4": [{"instruction": "write", "input": "x", "output": "done", "text": "..."}],
        "Rowan/hellaswag": [
            {"activity_label": "Cooking", "ctx": "He stirs", "endings": ["a", "b", "c", "d"], "label": "2"}
        ],
    }
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, split: rows[hub_id])
    (cs,) = load_hub("commonsense_170k", "train")
    assert (cs.id, cs.instruction, cs.output, cs.answer) == ("commonsense_170k-0", "q", "the correct answer is a", "a")
    (alpaca,) = load_hub("alpaca_gpt4", "train")
    assert (alpaca.instruction, alpaca.input, alpaca.output, alpaca.answer) == ("write", "x", "done", "")
    (hella,) = load_hub("hellaswag", "validation")
    assert hella.answer == "ending3" and hella.output == "the correct answer is ending3"
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, split: [{"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError, match=r"lmms-lab/Math10K \(train\): record 0: unexpected fields.*'completion'"):
        load_hub("math_10k", "train")
    assert hella.instruction == (
        "Please choose the correct ending to complete the given sentence: Cooking: He stirs\n\n"
        "Ending1: a Ending2: b Ending3: c Ending4: d\n\nAnswer format: ending1/ending2/ending3/ending4"
    )
