"""A user's own evaluation tasks (s2ft/data/user_tasks.py): definitions inline and in yaml, every answer kind,
log-likelihood tasks with their options, user groups, held-out losses, config checks, the overlap guard and the
whole run (`run_experiment`) on a tiny model, with the task named as the user named it."""

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import DATA, ROOT, compose_run, read_predictions

from s2ft.data import load_eval, load_train
from s2ft.data.checks import check_heldout_spec
from s2ft.data.overlap import DataOverlapError, check_overlap
from s2ft.data.records import DataError
from s2ft.data.sources import describe_eval_sources, heldout_name, load_heldout
from s2ft.data.tasks import UnknownNameError
from s2ft.data.user_tasks import group_members, parse_task, resolve_eval_tasks
from s2ft.evaluation import evaluate, heldout_item_losses
from s2ft.evaluation.checks import check_task_spec
from s2ft.evaluation.evaluate import prepare_tasks
from s2ft.evaluation.loglik import encode_pairs, score_pairs
from s2ft.evaluation.measure import eval_data
from s2ft.models import tiny_model, tiny_tokenizer


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def test_every_answer_kind_scores_as_defined(tmp_path, scripted, model, tokenizer):
    script, calls = scripted
    numbers = write_jsonl(
        tmp_path / "sums.jsonl",
        [
            {"instruction": "N1: 1+1?", "output": "2", "answer": "2"},
            {"instruction": "N2: 1/3?", "output": "0.33"},  # no answer field: the response is the gold
            {"instruction": "N3: 5+5?", "output": "10"},
        ],
    )
    script.update({"N1": "It is 2.004", "N2": "about 0.333", "N3": "It is 11"})
    letters = write_jsonl(
        tmp_path / "letters.jsonl",
        [{"instruction": "L1 pick", "output": "", "answer": "b"}, {"instruction": "L2 pick", "answer": "C"}],
    )
    script.update({"L1": "The answer is (B).", "L2": "A"})
    labels = tmp_path / "sentiment.csv"
    labels.write_text("prompt,completion\nS1 great,positive\nS2 awful,negative\n")
    script.update({"S1": "Positive!", "S2": "positive, I think"})
    texts = write_jsonl(
        tmp_path / "capitals.jsonl",
        [{"q": "T1 France?", "a": "Paris"}, {"q": "T2 Italy?", "a": "The Rome."}, {"q": "T3 Spain?", "a": "Madrid"}],
    )
    script.update({"T1": "\n  paris.\nsecond line", "T2": "rome", "T3": "It is Madrid"})
    tasks = [
        {"name": "Sums", "path": numbers, "answer": "number", "tolerance": 0.005, "max_new_tokens": 7},
        {"name": "letters", "path": letters, "answer": "letter"},
        {"name": "Sentiment", "path": str(labels), "answer": "label", "labels": ["positive", "negative"]},
        {"name": "capitals", "path": texts, "answer": "text", "columns": {"instruction": "q", "output": "a"}},
    ]
    result = evaluate(model, tokenizer, tasks, data_dir=DATA, out_dir=tmp_path, progress=False, max_new_tokens=3)
    accuracy = {name: r["accuracy"] for name, r in result["tasks"].items()}
    assert accuracy == {
        "Sums": pytest.approx(2 / 3),
        "letters": 0.5,
        "Sentiment": 0.5,
        "capitals": pytest.approx(2 / 3),
    }
    # A task's own budget wins over eval.max_new_tokens; the others take eval.max_new_tokens.
    assert [call["max_new_tokens"] for call in calls] == [7, 3, 3, 3]
    assert [r["correct"] for r in read_predictions(tmp_path, "Sums")] == [True, True, False]
    assert [r["extracted"] for r in read_predictions(tmp_path, "capitals")] == ["paris", "rome", "it is madrid"]
    assert [r["gold"] for r in read_predictions(tmp_path, "letters")] == ["B", "C"]
    assert result["avg_accuracy"] == pytest.approx((2 / 3 + 0.5 + 0.5 + 2 / 3) / 4)


def test_user_groups_expand_and_average_like_registered_groups(tmp_path, scripted, model, tokenizer):
    script, _ = scripted
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "A1", "output": "1"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "B1", "output": "1"}, {"instruction": "B2", "output": "2"}])
    script.update({"A1": "1", "B1": "1", "B2": "3"})
    groups = {"mine": [{"name": "a", "path": a, "answer": "number"}, "b"]}
    tasks = ["mine", {"name": "b", "path": b, "answer": "number"}]
    result = evaluate(model, tokenizer, tasks, data_dir=DATA, progress=False, groups=groups)
    assert list(result["tasks"]) == ["a", "b"]
    assert result["groups"] == {"mine": pytest.approx(0.75)}
    assert group_members(groups, tasks) == {"mine": ["a", "b"]}


def test_loglik_task_scores_the_records_options(tmp_path, tokenizer, model64):
    records = [
        {"instruction": "Which colour is the sky?", "options": ["blue", "green", "a long red answer"], "answer": "A"},
        {"instruction": "Which is a fruit?", "options": ["car", "apple"], "answer": "B"},
    ]
    path = write_jsonl(tmp_path / "mc.jsonl", records)
    task = {"name": "MC", "path": path, "answer": "letter", "mode": "loglik"}
    # The task's own mode wins over eval.mode=generate.
    result = evaluate(model64, tokenizer, [task], data_dir=DATA, out_dir=tmp_path, progress=False)
    assert result["tasks"]["MC"]["mode"] == "loglik"
    predictions = read_predictions(tmp_path, "MC")
    for record, prediction in zip(records, predictions, strict=True):
        labels = "ABC"[: len(record["options"])]
        assert prediction["options"] == dict(zip(labels, record["options"], strict=True))
        pairs = encode_pairs([record["instruction"]] * len(labels), [""] * len(labels), record["options"], tokenizer)
        scores = score_pairs(model64, pairs, pad_token_id=tokenizer.pad_token_id)
        best = max(range(len(labels)), key=lambda i: scores[i].mean)
        assert prediction["extracted"] == labels[best]
        assert prediction["logprob"] == pytest.approx({labels[i]: scores[i].logprob for i in range(len(labels))})
    labelled = write_jsonl(
        tmp_path / "yn.jsonl", [{"instruction": "Is it?", "options": {"yes": "Yes", "no": "No"}, "answer": "no"}]
    )
    spec = {"name": "yn", "path": labelled, "answer": "label", "labels": ["yes", "no"], "mode": "loglik"}
    result = evaluate(model64, tokenizer, [spec], data_dir=DATA, out_dir=tmp_path, progress=False)
    assert read_predictions(tmp_path, "yn")[0]["options"] == {"yes": "Yes", "no": "No"}


def test_json_numbers_are_golds_as_written_when_ints_and_floats_mix(tmp_path):
    """Before, arrow read a JSON column mixing ints and floats as floats: the gold of {"answer": 4} beside
    {"answer": 0.5} was "4.0", normalised to "4 0", so a text task scored the model's "4" wrong."""
    path = write_jsonl(
        tmp_path / "counts.jsonl",
        [{"instruction": "Legs of a cat?", "answer": 4}, {"instruction": "Half?", "answer": 0.5}],
    )
    (items,) = prepare_tasks([{"name": "counts", "path": path, "answer": "text"}], DATA, "generate")
    assert items.golds == ["4", "0 5"]
    assert [ex.answer for ex in items.examples] == ["4", "0.5"]


def test_eval_mode_loglik_scores_a_user_tasks_own_options(tmp_path, tokenizer, model64):
    """Before, only a task's own mode: loglik read its records' options: under eval.mode=loglik a user letter task
    with an options field was refused for having no 'Answer Choices:' in its instructions."""
    records = [{"instruction": "Which colour is the sky?", "options": ["blue", "green"], "answer": "A"}]
    path = write_jsonl(tmp_path / "mc.jsonl", records)
    task = {"name": "mc", "path": path, "answer": "letter"}
    assert check_task_spec([task], DATA, mode="loglik") == []
    (items,) = prepare_tasks([task], DATA, "loglik")
    assert items.mode == "loglik" and items.options == [{"A": "blue", "B": "green"}]
    result = evaluate(model64, tokenizer, [task], data_dir=DATA, mode="loglik", out_dir=tmp_path, progress=False)
    assert result["tasks"]["mc"]["mode"] == "loglik"
    assert read_predictions(tmp_path, "mc")[0]["options"] == {"A": "blue", "B": "green"}
    # Without an options field the options are still read from the instruction, as a registered task's.
    aqua = write_jsonl(
        tmp_path / "aqua.jsonl", [{"instruction": "Sky? Answer Choices: (A) blue (B) green", "answer": "B"}]
    )
    (items,) = prepare_tasks([{"name": "choices", "path": aqua, "answer": "letter"}], DATA, "loglik")
    assert items.options == [{"A": "blue", "B": "green"}]
    (items,) = prepare_tasks([task], DATA, "generate")
    assert items.mode == "generate" and items.options == []


def test_loglik_options_are_labelled_by_the_task_labels(tmp_path):
    """Before, a {label: text} option under a label the task does not have (a typo, "negativ") competed as an option
    that no gold names, and labels differing only in case (["yes", "Yes"]) merged two options into one, so an item
    with a single option left was always answered correctly."""
    typo = write_jsonl(
        tmp_path / "typo.jsonl",
        [
            {"instruction": "Good?", "options": {"positive": "good", "negative": "bad"}, "answer": "positive"},
            {"instruction": "Bad?", "options": {"positive": "good", "negativ": "bad"}, "answer": "positive"},
        ],
    )
    labels = ["positive", "negative"]
    (problem,) = check_task_spec(
        [{"name": "s", "path": typo, "answer": "label", "labels": labels, "mode": "loglik"}], DATA
    )
    assert problem == (
        f"eval.tasks: {typo}: line 2: options labelled ['positive', 'negativ'], but each option needs its own label "
        "among the task's labels ['positive', 'negative'] (case is ignored)"
    )
    letters = write_jsonl(
        tmp_path / "f.jsonl", [{"instruction": "Pick", "options": {"A": "x", "F": "y"}, "answer": "A"}]
    )
    (problem,) = check_task_spec([{"name": "f", "path": letters, "answer": "letter", "mode": "loglik"}], DATA)
    assert "line 1: options labelled ['A', 'F'], but each option needs its own label" in problem
    both = write_jsonl(tmp_path / "yes.jsonl", [{"instruction": "Is it?", "options": ["Yes", "No"], "answer": "no"}])
    with pytest.raises(DataError, match=r"^task yn: labels \['yes', 'Yes'\] repeat a label \(case is ignored\)"):
        parse_task({"name": "yn", "path": both, "answer": "label", "labels": ["yes", "Yes"], "mode": "loglik"})
    # Before, equal texts tied and the first option won: the item was scored correct whenever its gold came first.
    same = write_jsonl(tmp_path / "same.jsonl", [{"instruction": "Pick", "options": ["x", "y", "x "], "answer": "A"}])
    (problem,) = check_task_spec([{"name": "same", "path": same, "answer": "letter", "mode": "loglik"}], DATA)
    assert problem == (
        f"eval.tasks: {same}: line 1: two options have the same text, {{'A': 'x', 'B': 'y', 'C': 'x '}}; give each "
        "option its own text"
    )
    mixed = {"name": "yn", "path": both, "answer": "label", "labels": ["Yes", "No"], "mode": "loglik"}
    (items,) = prepare_tasks([mixed], DATA, "generate")  # labels in any case, matched in lower case
    assert items.options == [{"yes": "Yes", "no": "No"}] and items.golds == ["no"]


def test_definition_errors():
    good = {"name": "mine", "path": "t.json", "answer": "letter"}
    assert parse_task(good).labels == tuple("ABCDE") and parse_task(good).source.split == "test"
    cases = [
        ({"path": "t.json", "answer": "letter"}, "needs a name"),
        ({**good, "name": "boolq"}, "registered task or group"),
        # Before, predictions/qa/v2.jsonl was written, which the report's predictions/*.jsonl never finds.
        ({**good, "name": "qa/v2"}, r"^task qa/v2: the name names its predictions file, so it cannot hold / or \\"),
        ({**good, "name": "..\\x"}, "cannot hold / or"),
        ({**good, "name": ".."}, "cannot hold / or"),
        ({**good, "answer": "choice"}, "answer must be one of number, letter, label, text"),
        ({**good, "answer": "label"}, "needs labels"),
        ({**good, "labels": ["a", "b"]}, "labels only apply to answer: label"),
        ({**good, "tolerance": 0.1}, "tolerance only applies to answer: number"),
        ({**good, "answer": "number", "mode": "loglik"}, "answer must be letter or label"),
        ({**good, "max_new_tokens": 0}, "max_new_tokens must be an int >= 1"),
        ({**good, "metric": "f1"}, r"unknown keys \['metric'\]"),
        ({"name": "x", "answer": "text"}, "needs exactly one of path"),
        ({**good, "format": "sharegpt"}, "unknown format"),
    ]
    for definition, message in cases:
        with pytest.raises(DataError, match=message):
            parse_task(definition)
    with pytest.raises(DataError, match="two different task definitions are named 'mine'"):
        resolve_eval_tasks([good, {**good, "path": "other.json"}])
    with pytest.raises(UnknownNameError, match="or a task definition"):
        resolve_eval_tasks(["not_a_task"])


def test_definitions_in_yaml_files_and_the_conf_eval_example(tmp_path):
    test = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "Q", "output": "4"}])
    (tmp_path / "one.yaml").write_text(yaml.safe_dump({"name": "one", "path": test, "answer": "number"}))
    (tmp_path / "two.yml").write_text(
        yaml.safe_dump([{"name": "a", "path": test, "answer": "text"}, {"name": "b", "path": test, "answer": "number"}])
    )
    names = [spec.name for spec in resolve_eval_tasks([str(tmp_path / "one.yaml"), str(tmp_path / "two.yml"), "boolq"])]
    assert names == ["one", "a", "b", "boolq"]
    with pytest.raises(DataError, match="does not exist"):
        resolve_eval_tasks([str(tmp_path / "missing.yaml")])
    (tmp_path / "latin.yaml").write_bytes("name: caf\u00e9\npath: t.jsonl\nanswer: text\n".encode("latin-1"))
    with pytest.raises(DataError, match=rf"^task definition file {tmp_path}/latin.yaml: not UTF-8 text \(invalid"):
        resolve_eval_tasks([str(tmp_path / "latin.yaml")])
    example = yaml.safe_load((ROOT / "conf/eval/user_example.yaml").read_text())
    assert [task["name"] for task in example["tasks"]] == ["arc_letters", "arc_letters_mc"]


def test_yes_no_labels_left_unquoted_in_yaml_are_named_as_booleans(tmp_path):
    """Before, `labels: [yes, no]` in a yaml file (read as [True, False]) was refused with "answer: label needs labels:
    [a list of at least two label strings]", which the user had written."""
    (tmp_path / "yn.yaml").write_text("name: yn\npath: t.json\nanswer: label\nlabels: [yes, no]\n")
    message = (
        "task yn: labels [True, False] hold booleans, as yaml reads yes/no/true/false/on/off unquoted; quote each "
    )
    with pytest.raises(DataError, match=rf"^{re.escape(message)}label: labels: \['yes', 'no'\]$"):
        resolve_eval_tasks([str(tmp_path / "yn.yaml")])
    (tmp_path / "yn.yaml").write_text("name: yn\npath: t.json\nanswer: label\nlabels: ['yes', 'no']\n")
    assert resolve_eval_tasks([str(tmp_path / "yn.yaml")])[0].labels == ("yes", "no")


def test_a_relative_path_in_a_yaml_file_is_read_beside_it_from_any_working_directory(tmp_path, monkeypatch):
    """Before, `path: test.jsonl` in tasks/mine.yaml was read from the working directory only: the definitions
    and their test file could not move together, and a run from another folder did not find the file."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    write_jsonl(folder / "test.jsonl", [{"instruction": "Legs of a cat?", "answer": 4}])
    (folder / "mine.yaml").write_text(yaml.safe_dump({"name": "mine", "path": "test.jsonl", "answer": "number"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (items,) = prepare_tasks([str(folder / "mine.yaml")], DATA, "generate")
    assert [example.instruction for example in items.examples] == ["Legs of a cat?"] and items.golds == [4]
    # A path written from the working directory, as before, still reads.
    monkeypatch.chdir(tmp_path)
    (folder / "cwd.yaml").write_text(yaml.safe_dump({"name": "cwd", "path": "tasks/test.jsonl", "answer": "number"}))
    (items,) = prepare_tasks(["tasks/cwd.yaml"], DATA, "generate")
    assert items.golds == [4]


def test_a_missing_file_of_a_yaml_task_names_the_yaml_file_and_every_folder_searched(tmp_path, monkeypatch):
    """Before, a typo'd relative path in a yaml file was "data file X does not exist (nor under the data directory
    D)": neither the definition file nor its folder, searched first, was named."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks/mine.yaml").write_text(yaml.safe_dump({"name": "mine", "path": "tset.jsonl", "answer": "text"}))
    assert check_task_spec(["tasks/mine.yaml"], DATA) == [
        "eval.tasks: task mine of tasks/mine.yaml (its path is not beside that file either): data file tset.jsonl "
        f"does not exist (nor under the data directory {DATA})"
    ]
    # Found beside a yaml file named with ~, a problem of its records does not claim the path was missing there.
    monkeypatch.setenv("HOME", str(tmp_path / "tasks"))
    write_jsonl(tmp_path / "tasks/tset.jsonl", [{"instruction": "Legs of a cat?"}])
    (problem,) = check_task_spec(["~/mine.yaml"], DATA)
    assert problem.startswith("eval.tasks: task mine of ~/mine.yaml: ") and "no gold answer" in problem
    inline = {"name": "mine", "path": "tset.jsonl", "answer": "text"}
    assert check_task_spec([inline], DATA) == [
        f"eval.tasks: data file tset.jsonl does not exist (nor under the data directory {DATA})"
    ]


def test_one_definition_named_two_ways_stays_one_task_and_a_home_path_reads(tmp_path, monkeypatch, caplog):
    """Before, the folder-first rule spelled the test file as the yaml file was named: tasks.yaml named by its
    absolute path and the same definition inline (or tasks/mine.yaml and ./tasks/mine.yaml) became "two different
    task definitions", as did the held-out check; and a yaml file named with ~ was "does not exist"."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    definition = {"name": "mine", "path": "test.jsonl", "answer": "number"}
    write_jsonl(tmp_path / "test.jsonl", [{"instruction": "Legs of a cat?", "output": "4"}])
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(definition))
    (inline,) = resolve_eval_tasks([definition])
    assert resolve_eval_tasks([definition, str(tmp_path / "mine.yaml"), "~/mine.yaml", "mine.yaml"]) == [inline]
    assert check_heldout_spec([definition, str(tmp_path / "mine.yaml")], DATA) == []
    folder = tmp_path / "tasks"
    folder.mkdir()
    write_jsonl(folder / "test.jsonl", [{"instruction": "Legs of a bird?", "answer": 2}])
    (folder / "mine.yaml").write_text(yaml.safe_dump(definition))
    (spec,) = resolve_eval_tasks(["tasks/mine.yaml", "./tasks/mine.yaml", str(folder / "mine.yaml")])
    assert spec.path == "tasks/test.jsonl"
    # The working directory's test.jsonl, which this file's path named before the folder-first rule, is not read:
    # said once per definition read, with both files named.
    assert [r.getMessage() for r in caplog.records if r.name == "s2ft.data.user_tasks"][0] == (
        f"task mine: path test.jsonl is read beside its definition file, {Path('tasks/test.jsonl')}, not from the "
        "working directory"
    )


def test_a_user_task_is_a_heldout_loss_set(tmp_path):
    test = write_jsonl(
        tmp_path / "t.jsonl", [{"instruction": "Q1", "output": "yes it is"}, {"instruction": "Q2", "output": "no"}]
    )
    definition = {"name": "Mine", "path": test, "answer": "text"}
    examples = load_heldout(definition, DATA)
    assert heldout_name(definition) == "Mine" and heldout_name("gsm8k_test") == "gsm8k_test"
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer)).eval()
    items = heldout_item_losses(model, tokenizer, examples, 2, 256)
    assert [item["id"] for item in items] == ["Mine-0", "Mine-1"]
    assert [item["tokens"] for item in items] == [len("yes it is") + 1, len("no") + 1]
    answers_only = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Q1", "answer": "B"}])
    (problem,) = check_heldout_spec([{"name": "x", "path": answers_only, "answer": "letter"}], DATA)
    assert "no field 'output' in any record" in problem
    assert check_heldout_spec(["gsm8k_test", definition], DATA) == []
    # Before, two sets of one name passed: the summary kept the second's loss and its item file replaced the first's.
    renamed = {**definition, "name": "gsm8k_test"}
    clash = "two different held-out sets are named '{}': the second's loss and item file would replace the first's"
    assert check_heldout_spec([definition, {**definition, "answer": "number"}], DATA) == [
        f"eval.heldout: {clash.format('Mine')}; give each its own name"
    ]
    # Before, a user set under a registered set's name passed alone: its loss was the summary's (and the report's)
    # gsm8k_test forgetting measure; beside the registered set it was the clash above.
    registered = (
        "eval.heldout: the user set 'gsm8k_test' has the name of a registered held-out set; give it another name"
    )
    assert check_heldout_spec([renamed], DATA) == [registered]
    assert check_heldout_spec(["gsm8k_test", renamed], DATA) == [registered]
    # Before, an unknown name listed the evaluation tasks ("unknown task 'gsm8k_tset'; valid tasks: gsm8k, ...").
    assert check_heldout_spec(["gsm8k_tset"], DATA) == [
        "eval.heldout: unknown held-out set 'gsm8k_tset'; valid: gsm8k_test, commonsense_test or one user task "
        "definition {name, path}"
    ]
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(definition))
    same = [definition, str(tmp_path / "mine.yaml"), "gsm8k_test", "gsm8k_test"]  # the same sets twice
    assert check_heldout_spec(same, DATA) == []
    # Before, a loss set without an answer kind (it scores the responses) was refused as "eval.heldout: task Mine:
    # answer must be one of number, letter, label, text, got None"; inline or in a yaml file of its own folder.
    loose = {"name": "Mine", "path": test}
    (tmp_path / "loose.yaml").write_text(yaml.safe_dump({"name": "Mine", "path": "t.jsonl"}))
    for item in (loose, str(tmp_path / "loose.yaml")):
        assert check_heldout_spec([item], DATA) == [] and heldout_name(item) == "Mine"
        assert load_heldout(item, DATA) == examples
        (entry,) = describe_eval_sources(None, [item], DATA)
        assert (entry["name"], entry["role"], entry["sha256"]) == ("Mine", "heldout", sha256(test))


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_a_run_records_every_file_it_is_measured_on_with_its_digest(tmp_path, monkeypatch):
    """Before, only the training sources had a SHA-256 in the summary: a user's test file edited under its name
    between two runs gave two rows of one task that the record could not tell apart."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "mine.jsonl", [{"instruction": "Q", "output": "yes"}])
    mine = {"name": "Mine", "path": "mine.jsonl", "answer": "text"}
    registered = DATA / "llm-adapters/dataset"
    described = describe_eval_sources(["boolq", mine], ["gsm8k_test", "commonsense_test", mine], DATA)
    assert [(d["name"], d["role"]) for d in described] == [
        ("boolq", "task"),
        ("Mine", "task"),
        ("gsm8k_test", "heldout"),
    ] + [("commonsense_test", "heldout")] * 7 + [("Mine", "heldout")]
    assert described[0] == {
        "name": "boolq",
        "role": "task",
        "file": str(registered / "boolq/test.json"),
        "sha256": sha256(registered / "boolq/test.json"),
    }
    user = {"file": "mine.jsonl", "resolved": str(tmp_path / "mine.jsonl"), "sha256": sha256(tmp_path / "mine.jsonl")}
    assert described[1] == {"name": "Mine", "role": "task", **user} and described[-1] == {
        "name": "Mine",
        "role": "heldout",
        **user,
    }
    assert described[2]["file"] == str(DATA / "gsm8k/test.jsonl") and described[2]["sha256"] == sha256(
        DATA / "gsm8k/test.jsonl"
    )
    assert [Path(d["file"]).parent.name for d in described[3:10]] == [
        "boolq",
        "piqa",
        "social_i_qa",
        "winogrande",
        "ARC-Easy",
        "ARC-Challenge",
        "openbookqa",
    ]
    assert all(d["sha256"] == sha256(d["file"]) for d in described[3:10])
    references = write_jsonl(tmp_path / "ref.jsonl", [{"question_id": 1, "choices": [{"turns": ["a", "b"]}]}])
    cfg = {
        "paths": {"data_dir": str(DATA)},
        "eval": {"tasks": [], "mtbench": {"questions": None, "references": references}},
    }
    questions = DATA / "mtbench_style/question.jsonl"
    assert eval_data(cfg) == [
        {"name": "questions", "role": "mtbench", "file": str(questions), "sha256": sha256(questions)},
        {"name": "references", "role": "mtbench", "file": references, "sha256": sha256(references)},
    ]


def test_config_check_reads_every_user_record_before_any_model(tmp_path):
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [{"instruction": "Q1", "output": "B"}, {"instruction": "Q2", "output": "seven"}]
    )
    problems = check_task_spec([{"name": "mine", "path": bad, "answer": "letter"}, "no_task"], DATA)
    assert len(problems) == 2
    assert problems[0] == f"eval.tasks: task mine, item mine-1 ({bad}: line 2): gold answer 'seven' is not a letter A-E"
    assert problems[1].startswith("eval.tasks: unknown task 'no_task'")
    # A text task's gold taken from a multi-line response could never equal an output's first line.
    prose = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "Q1", "output": "Paris.\nIt is the capital of France."}])
    (problem,) = check_task_spec([{"name": "p", "path": prose, "answer": "text"}], DATA)
    assert problem.startswith(f"eval.tasks: task p, item p-0 ({prose}: line 1): gold answer 'Paris.\\nIt is the capi")
    assert problem.endswith(
        "has 2 lines, but a text answer is the output's first line, so it could never match; give "
        "each record a one-line answer field"
    )
    missing = write_jsonl(tmp_path / "m.jsonl", [{"instruction": "Q1", "input": "x"}])
    (problem,) = check_task_spec([{"name": "m", "path": missing, "answer": "text"}], DATA)
    assert problem == f"eval.tasks: {missing}: line 1: no gold answer (give an answer field or a response)"
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"instruction": "Q1", "answer": "C", "options": ["x", "y"]}])
    (problem,) = check_task_spec([{"name": "mc", "path": mc, "answer": "letter", "mode": "loglik"}], DATA)
    assert "gold answer 'C' is not among the parsed options" in problem
    good = write_jsonl(tmp_path / "g.jsonl", [{"instruction": "Q1", "output": "4"}])
    assert check_task_spec([{"name": "g", "path": good, "answer": "number"}, "boolq"], DATA) == []
    (problem,) = check_task_spec([{"name": "g", "path": good, "answer": "number"}], DATA, mode="loglik")
    assert "numeric answers without options" in problem
    (problem,) = check_task_spec(["boolq"], DATA, groups={"mine": ["nope"]})
    assert "unknown task 'nope'" in problem


def test_overlap_guard_on_user_training_data_against_user_tasks(tmp_path):
    test = write_jsonl(
        tmp_path / "test.jsonl",
        [{"instruction": "What is 2 + 2?", "output": "4"}, {"instruction": "Name a colour.", "output": "red"}],
    )
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [{"instruction": "what is 2+2", "output": "4"}, {"instruction": "Hi", "output": "Hello"}],
    )
    (spec,) = resolve_eval_tasks([{"name": "Mine", "path": test, "answer": "text"}])
    with pytest.raises(DataOverlapError, match=r"Mine 1/2"):
        check_overlap(load_train([train], DATA), {"Mine": load_eval(spec, DATA)})


def test_the_issue_command_runs_end_to_end(tmp_path):
    """`python run.py 'data.train=[my/train.jsonl]' 'eval.tasks=[{name: mine, path: my/test.json, answer: letter}]'`
    on a tiny model, through the whole runner (config check, training, evaluation, summary)."""
    from s2ft.lightning import run_experiment

    train = write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"Pick {i}", "output": "B"} for i in range(12)])
    test = tmp_path / "test.json"
    test.write_text(json.dumps([{"instruction": f"Choose {i}", "output": "B"} for i in range(3)]))
    cfg = compose_run(
        "debug=smoke",
        f"data.train=[{train}]",
        f"eval.tasks=[{{name: Mine, path: {test}, answer: letter}}]",
        f"eval.heldout=[{{name: mine_loss, path: {test}, answer: letter}}]",
        "eval.before=false",
        "logger=none",
        f"paths.output_dir={tmp_path}",
    )
    summary = run_experiment(cfg, tmp_path / "run")
    assert list(summary["eval"]) == ["Mine"] and summary["eval"]["Mine"]["n"] == 3
    assert list(summary["heldout"]) == ["mine_loss"] and summary["heldout"]["mine_loss"]["after"] > 0
    assert summary["template"] == "alpaca" and summary["train"]["steps"] == 4  # debug=smoke
    assert (tmp_path / "run" / "predictions" / "Mine.jsonl").is_file()
    assert (tmp_path / "run" / "predictions" / "heldout_mine_loss.jsonl").is_file()
    digest = {"file": str(test), "resolved": str(test.resolve()), "sha256": sha256(test)}
    assert summary["eval_data"] == [
        {"name": "Mine", "role": "task", **digest},
        {"name": "mine_loss", "role": "heldout", **digest},
    ]
    # Re-evaluating the run uses the template it was trained with (the tiny tokenizer has no chat template, so
    # data.template=chat would be refused if it were applied).
    again = compose_run(
        "debug=smoke",
        "mode=eval",
        f"run_dir={tmp_path / 'run'}",
        "data.template=chat",
        f"eval.tasks=[{{name: Mine, path: {test}, answer: letter}}]",
        "eval.heldout=[]",
        "logger=none",
    )
    evaluated = run_experiment(again, tmp_path / "again")
    assert evaluated["template"] == "alpaca" and evaluated["eval_data"] == [{"name": "Mine", "role": "task", **digest}]


def test_tasks_holding_special_tokens_are_refused_before_any_item_runs(tmp_path, tokenizer, model64):
    """A question or an option holding the tokenizer's "</s>" or "<s>" would be scored as that control token, not
    as text: every such task is named at once, before the model answers anything or a predictions file is written."""
    options = write_jsonl(
        tmp_path / "mc.jsonl", [{"instruction": "Which?", "options": ["blue", "red</s>"], "answer": "A"}]
    )
    questions = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": "<s>Legs of a cat?", "answer": "4"}])
    tasks = [
        {"name": "mc", "path": options, "answer": "letter", "mode": "loglik"},
        {"name": "qa", "path": questions, "answer": "number"},
    ]
    message = (
        r"^task mc: 1 item\(s\) hold the tokenizer's special token\(s\) </s> in their text: mc-0 \(option B\)\. .*\n"
        r"task qa: 1 item\(s\) hold the tokenizer's special token\(s\) <s> in their text: qa-0 \(instruction\)\. "
    )
    with pytest.raises(DataError, match=message):
        evaluate(model64, tokenizer, tasks, data_dir=DATA, out_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    # A gold output only the scorer reads is no prompt: "</s>" there is not refused.
    gold = write_jsonl(tmp_path / "gold.jsonl", [{"instruction": "Say it.", "output": "a</s>b", "answer": "a</s>b"}])
    result = evaluate(
        model64,
        tokenizer,
        [{"name": "gold", "path": gold, "answer": "text"}],
        data_dir=DATA,
        progress=False,
        max_new_tokens=2,
    )
    assert result["tasks"]["gold"]["n"] == 1
    (items,) = prepare_tasks([tasks[1]], DATA, "generate")
    with pytest.raises(DataError, match=r"^the held-out items: 1 item\(s\) hold .* <s> in their text: qa-0"):
        heldout_item_losses(model64, tokenizer, [dataclasses.replace(items.examples[0], output="4")], 4, 256)
