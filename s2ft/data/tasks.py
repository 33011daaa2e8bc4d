"""Registries: the evaluation tasks (and their groups) and the training sources, by name.

Paths are relative to the data directory (``paths.data_dir``, the repository's ``data/`` by default).
"""

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from s2ft.data.records import DataError, require_file
from s2ft.data.user import UserSource, is_data_file, parse_source
from s2ft.errors import UserError

ARITHMETIC_NEW_TOKENS = 256
COMMONSENSE_NEW_TOKENS = 32


class UnknownNameError(UserError, KeyError):
    """A task, group or training-source name that is not registered (a KeyError that prints its message plainly)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class TaskSpec:
    """How to load and score one evaluation task.

    Attributes:
        name: Task name, e.g. "arc_easy" (lowercase for registered tasks; a user's task keeps its own spelling).
        suite: "arithmetic", "commonsense", or "user" for a user's task (`s2ft.data.user_tasks`).
        path: Test file relative to the data directory (LLM-Adapters JSON); a user's file or hub id as given.
        answer_kind: "number" (last number, within ``tolerance``), "letter" (A-E), "label" (first label in the output)
            or "text" (exact match after normalisation, `s2ft.evaluation.extract.normalize_text`).
        labels: The answers the extractor looks for ("true"/"false", "answer1".."answer5", "A".."E"); empty for numbers.
        max_new_tokens: Generation budget of the suite (a user's task: its own, or 256 for numbers and 32 otherwise).
        hub: Name in `s2ft.data.records.HUB_DATASETS` to load from when the file is absent (HellaSwag), else None.
        source: A user's test data (`s2ft.data.user.UserSource`); None for registered tasks.
        tolerance: Largest absolute difference of a correct numeric answer.
        mode: "generate" or "loglik" for this task whatever ``eval.mode`` says; None follows ``eval.mode``.
        own_budget: The user set ``max_new_tokens`` for this task, so ``eval.max_new_tokens`` does not replace it.
    """

    name: str
    suite: str
    path: str
    answer_kind: str
    labels: tuple[str, ...]
    max_new_tokens: int
    hub: str | None = None
    source: UserSource | None = None
    tolerance: float = 1e-3
    mode: str | None = None
    own_budget: bool = False


def _arithmetic(name: str, folder: str, answer_kind: str = "number", labels: tuple[str, ...] = ()) -> TaskSpec:
    return TaskSpec(
        name, "arithmetic", f"llm-adapters/dataset/{folder}/test.json", answer_kind, labels, ARITHMETIC_NEW_TOKENS
    )


def _commonsense(name: str, folder: str, labels: tuple[str, ...], hub: str | None = None) -> TaskSpec:
    return TaskSpec(
        name, "commonsense", f"llm-adapters/dataset/{folder}/test.json", "label", labels, COMMONSENSE_NEW_TOKENS, hub
    )


def _numbered(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, count + 1))


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _arithmetic("gsm8k", "gsm8k"),
        _arithmetic("svamp", "SVAMP"),
        _arithmetic("multiarith", "MultiArith"),
        _arithmetic("addsub", "AddSub"),
        _arithmetic("singleeq", "SingleEq"),
        _arithmetic("mawps", "mawps"),
        _arithmetic("aqua", "AQuA", "letter", tuple("ABCDE")),
        _commonsense("boolq", "boolq", ("true", "false")),
        _commonsense("piqa", "piqa", _numbered("solution", 2)),
        _commonsense("siqa", "social_i_qa", _numbered("answer", 3)),
        _commonsense("hellaswag", "hellaswag", _numbered("ending", 4), hub="hellaswag"),
        _commonsense("winogrande", "winogrande", _numbered("option", 2)),
        _commonsense("arc_easy", "ARC-Easy", _numbered("answer", 5)),
        _commonsense("arc_challenge", "ARC-Challenge", _numbered("answer", 5)),
        _commonsense("openbookqa", "openbookqa", _numbered("answer", 4)),
    )
}
TASK_ALIASES = {"social_i_qa": "siqa"}

_LOCAL_COMMONSENSE = ["boolq", "piqa", "siqa", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
GROUPS: dict[str, list[str]] = {
    "arithmetic": ["multiarith", "gsm8k", "addsub", "aqua", "singleeq", "svamp", "mawps"],
    # The seven commonsense sets shipped here; HellaSwag needs the hub, so it is only in commonsense_paper.
    "commonsense": _LOCAL_COMMONSENSE,
    "commonsense_paper": [
        "boolq",
        "piqa",
        "siqa",
        "hellaswag",
        "winogrande",
        "arc_easy",
        "arc_challenge",
        "openbookqa",
    ],
    # The generalization study: in-distribution, near OOD (easy / hard) and far OOD.
    "id": ["gsm8k", "mawps", "aqua"],
    "near_ood_easy": ["multiarith", "addsub", "singleeq", "mawps"],
    "near_ood_hard": ["gsm8k", "aqua", "svamp"],
    "far_ood": _LOCAL_COMMONSENSE,
}


@dataclass(frozen=True)
class TrainSource:
    """One training set.

    Attributes:
        name: Source name used in ``data.train``.
        reader: "llm_adapters", "gsm8k", "mawps_raw" or "hub".
        path: File relative to the data directory (hub sources: the `HUB_DATASETS` name).
        domain: "commonsense", "arithmetic" or "instruction": which held-out set is in domain for a run trained on it.
        clean_against: Evaluation tasks or groups whose questions are removed from this source when it is loaded.
    """

    name: str
    reader: str
    path: str
    domain: str
    clean_against: tuple[str, ...] = ()


# The commonsense train files repeat a few of their own test questions (BoolQ 1, ARC-Easy 2: upstream duplicates, not a
# deliberate split), so they are cleaned on load and the default mix passes the overlap guard. math_data and MAWPS are
# left alone: their overlap is wholesale (data/README.md) and the guard must refuse them unless the user opts in.
_CLEAN_COMMONSENSE = ("commonsense",)
TRAIN_SETS: dict[str, TrainSource] = {
    source.name: source
    for source in (
        TrainSource(
            "boolq", "llm_adapters", "llm-adapters/dataset/boolq/train.json", "commonsense", _CLEAN_COMMONSENSE
        ),
        TrainSource(
            "arc_easy", "llm_adapters", "llm-adapters/dataset/ARC-Easy/train.json", "commonsense", _CLEAN_COMMONSENSE
        ),
        TrainSource(
            "arc_challenge",
            "llm_adapters",
            "llm-adapters/dataset/ARC-Challenge/train.json",
            "commonsense",
            _CLEAN_COMMONSENSE,
        ),
        TrainSource(
            "openbookqa",
            "llm_adapters",
            "llm-adapters/dataset/openbookqa/train.json",
            "commonsense",
            _CLEAN_COMMONSENSE,
        ),
        TrainSource("gsm8k", "gsm8k", "gsm8k/train.jsonl", "arithmetic"),
        TrainSource("mawps", "mawps_raw", "llm-adapters/dataset/mawps/trainset.json", "arithmetic"),
        # An 80% split of the arithmetic test sets (data/README.md): the overlap guard refuses it by default.
        TrainSource("math_data", "llm_adapters", "llm-adapters/ft-training_set/math_data.json", "arithmetic"),
        TrainSource("commonsense_170k", "hub", "commonsense_170k", "commonsense", _CLEAN_COMMONSENSE),
        TrainSource("math_10k", "hub", "math_10k", "arithmetic"),
        TrainSource("alpaca_gpt4", "hub", "alpaca_gpt4", "instruction"),
    )
}
TRAIN_GROUPS: dict[str, list[str]] = {"commonsense_mix": ["boolq", "arc_easy", "arc_challenge", "openbookqa"]}
TRAIN_ALIASES = {"gsm8k_train": "gsm8k", "mawps_train": "mawps"}


def _as_list(names: str | Iterable[str], what: str) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError(f"no {what} given")
    bad = [name for name in names if not isinstance(name, str)]
    if bad:
        raise TypeError(f"{what} names must be strings, got {bad!r}")
    return [name.lower() for name in names]


def _expand(names: list[str], registry: dict, groups: dict, aliases: dict, what: str) -> list[str]:
    expanded = []
    for name in names:
        name = aliases.get(name, name)
        if name in groups:
            expanded.extend(groups[name])
        elif name in registry:
            expanded.append(name)
        else:
            raise UnknownNameError(
                f"unknown {what} {name!r}; valid {what}s: {', '.join(registry)}; groups: {', '.join(groups)}"
            )
    return list(dict.fromkeys(expanded))


def resolve_tasks(names_or_groups: str | Iterable[str | TaskSpec]) -> list[TaskSpec]:
    """Expands task and group names into TaskSpecs, in order, without duplicates.

    Args:
        names_or_groups: A name or a list of names, e.g. ``["arithmetic", "boolq"]``; TaskSpecs pass through.

    Raises:
        UnknownNameError: (a KeyError) An unknown name; the message lists the valid tasks and groups.
        ValueError: An empty list.
    """
    if not isinstance(names_or_groups, str):
        names_or_groups = [item.name if isinstance(item, TaskSpec) else item for item in names_or_groups]
    names = _as_list(names_or_groups, "task")
    return [TASKS[name] for name in _expand(names, TASKS, GROUPS, TASK_ALIASES, "task")]


def resolve_train_sources(names_or_groups: str | Iterable[str]) -> list[TrainSource]:
    """Expands training-source names and groups (``commonsense_mix``) into TrainSources, in order, deduplicated.

    Raises:
        UnknownNameError: (a KeyError) An unknown name; the message lists the valid sources and groups.
        ValueError: An empty list.
    """
    names = _as_list(names_or_groups, "training source")
    return [TRAIN_SETS[name] for name in _expand(names, TRAIN_SETS, TRAIN_GROUPS, TRAIN_ALIASES, "training source")]


def is_registered_train_name(name: str) -> bool:
    """Whether a ``data.train`` string is a registered source, group or alias (else it may be a user's file)."""
    name = name.lower()
    return name in TRAIN_SETS or name in TRAIN_GROUPS or name in TRAIN_ALIASES


def resolve_train_items(items: str | dict | Iterable[str | dict]) -> list[TrainSource | UserSource]:
    """Expands ``data.train``: registered names and groups into TrainSources (deduplicated), a user's files and
    hub datasets (a path with a data suffix, or a dict with path or hub) into UserSources, in order.

    Raises:
        UnknownNameError: A string that is neither registered nor a data file (the valid names are listed).
        DataError: A bad user source spec (`s2ft.data.user.parse_source`).
        ValueError: An empty list.
    """
    items = [items] if isinstance(items, str | dict) else list(items)
    if not items:
        raise ValueError("no training source given")
    resolved: list[TrainSource | UserSource] = []
    for item in items:
        if isinstance(item, str) and is_registered_train_name(item):
            resolved.extend(source for source in resolve_train_sources(item) if source not in resolved)
        elif isinstance(item, dict) or (isinstance(item, str) and (is_data_file(item) or Path(item).is_dir())):
            resolved.append(parse_source(item))
        elif isinstance(item, str):
            raise UnknownNameError(
                f"unknown training source {item!r}; valid training sources: {', '.join(TRAIN_SETS)}; groups: "
                f"{', '.join(TRAIN_GROUPS)}; or a data file (.json .jsonl .csv .parquet), {{path: ..}} or {{hub: ..}}"
            )
        else:
            raise TypeError(f"a training source is a name, a file path or a dict, got {item!r}")
    check_unique_names(resolved)
    return resolved


def check_unique_names(sources: Iterable[TrainSource | UserSource]) -> None:
    """Refuse two training sources of one name (a file's stem, a hub id's last part, or the ``name`` given).

    Raises:
        DataError: Naming the sources and the fix; their items would share ids and be counted as one source in a
            run's training record.
    """
    places: dict[str, list[str]] = {}
    for source in sources:
        places.setdefault(source.name, []).append(source.where if isinstance(source, UserSource) else source.name)
    for name, where in places.items():
        if len(where) > 1:
            raise DataError(
                f"{len(where)} training sources are named {name!r} ({', '.join(where)}): their items would share ids "
                f"and count as one source in the run's record; give each its own name, e.g. {{path: {where[-1]}, "
                f"name: {name}_2}}"
            )


def data_path(data_dir: str | Path, relative: str) -> Path:
    """Returns ``data_dir / relative``, or raises FileNotFoundError naming it and the ``paths.data_dir`` fix."""
    return require_file(Path(data_dir) / relative)
