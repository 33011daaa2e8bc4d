import pytest
from conftest import DATA

from s2ft.data.tasks import (
    GROUPS,
    TASKS,
    TRAIN_SETS,
    UnknownNameError,
    data_path,
    resolve_tasks,
    resolve_train_sources,
)


def test_task_registry_shape():
    arithmetic = {"gsm8k", "svamp", "multiarith", "addsub", "singleeq", "mawps", "aqua"}
    commonsense = {"boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"}
    assert set(TASKS) == arithmetic | commonsense
    for name, spec in TASKS.items():
        assert spec.name == name == name.lower()
        assert spec.suite == ("arithmetic" if name in arithmetic else "commonsense")
        assert spec.max_new_tokens == (256 if name in arithmetic else 32)
        if spec.hub is None:
            assert (DATA / spec.path).is_file(), spec.path
    assert TASKS["aqua"].answer_kind == "letter" and TASKS["aqua"].labels == ("A", "B", "C", "D", "E")
    assert TASKS["gsm8k"].answer_kind == "number" and TASKS["gsm8k"].labels == ()
    assert TASKS["boolq"].labels == ("true", "false")
    assert TASKS["piqa"].labels == ("solution1", "solution2")
    assert TASKS["siqa"].labels == ("answer1", "answer2", "answer3")
    assert TASKS["winogrande"].labels == ("option1", "option2")
    assert TASKS["arc_easy"].labels == TASKS["arc_challenge"].labels == tuple(f"answer{i}" for i in range(1, 6))
    assert TASKS["openbookqa"].labels == tuple(f"answer{i}" for i in range(1, 5))
    assert TASKS["hellaswag"].labels == tuple(f"ending{i}" for i in range(1, 5))


def test_groups():
    assert set(GROUPS["arithmetic"]) == {"gsm8k", "svamp", "multiarith", "addsub", "singleeq", "mawps", "aqua"}
    assert GROUPS["commonsense"] == GROUPS["far_ood"]
    assert set(GROUPS["commonsense_paper"]) == set(GROUPS["commonsense"]) | {"hellaswag"}
    assert GROUPS["id"] == ["gsm8k", "mawps", "aqua"]
    assert GROUPS["near_ood_easy"] == ["multiarith", "addsub", "singleeq", "mawps"]
    assert GROUPS["near_ood_hard"] == ["gsm8k", "aqua", "svamp"]
    for members in GROUPS.values():
        assert set(members) <= set(TASKS)


def test_resolve_tasks_expands_and_dedups_in_order():
    names = [spec.name for spec in resolve_tasks(["boolq", "id", "GSM8K", "near_ood_easy", "social_i_qa"])]
    assert names == ["boolq", "gsm8k", "mawps", "aqua", "multiarith", "addsub", "singleeq", "siqa"]
    assert resolve_tasks("boolq") == [TASKS["boolq"]]
    assert resolve_tasks([TASKS["piqa"], "piqa"]) == [TASKS["piqa"]]


def test_resolve_tasks_errors():
    with pytest.raises(UnknownNameError) as err:
        resolve_tasks(["boolq", "gsm9k"])
    message = str(err.value)
    assert message.startswith("unknown task 'gsm9k'; valid tasks: gsm8k, svamp")
    assert "groups: arithmetic, commonsense" in message
    assert isinstance(err.value, KeyError)
    with pytest.raises(ValueError, match="no task given"):
        resolve_tasks([])


def test_train_sources():
    assert [s.name for s in resolve_train_sources("commonsense_mix")] == [
        "boolq",
        "arc_easy",
        "arc_challenge",
        "openbookqa",
    ]
    assert [s.name for s in resolve_train_sources(["gsm8k_train", "gsm8k", "mawps_train"])] == ["gsm8k", "mawps"]
    for source in TRAIN_SETS.values():
        if source.reader != "hub":
            assert (DATA / source.path).is_file(), source.path
    with pytest.raises(UnknownNameError, match="unknown training source 'math10k'; valid training sources: boolq"):
        resolve_train_sources(["math10k"])


def test_data_path(tmp_path):
    assert data_path(DATA, "gsm8k/test.jsonl") == DATA / "gsm8k/test.jsonl"
    with pytest.raises(FileNotFoundError) as err:
        data_path(tmp_path, "gsm8k/test.jsonl")
    assert str(tmp_path / "gsm8k/test.jsonl") in str(err.value) and "paths.data_dir=" in str(err.value)
