"""A user's own evaluation tasks: definitions (inline in ``eval.tasks``, or in a yaml file), user groups, and loading.

A definition is a dict::

    {name: mine, path: my/test.json, answer: letter}
    {name: sums, path: sums.jsonl, answer: number, tolerance: 0.01, max_new_tokens: 64}
    {name: sentiment, path: s.csv, format: prompt_completion, answer: label, labels: [positive, negative]}
    {name: capital, hub: org/capitals, split: test, answer: text, columns: {instruction: question}}
    {name: mc, path: mc.jsonl, answer: letter, mode: loglik}     # records carry options: [text, text, ...]

The test file is read like training data (`s2ft.data.user`: the same file types, formats and column mapping, split
``test`` by default for folders and hub datasets). The gold answer is a record's ``answer`` field, else its response
(output, completion, the last assistant message). Answer kinds: ``number`` (the last number of the output, correct
within ``tolerance``, default 0.001), ``letter`` (A-E), ``label`` (the first of ``labels`` in the output) and ``text``
(the output's first line equals the gold after normalisation). ``mode: loglik`` scores each option's text as the
response instead of generating: the records' ``options`` field is a list of texts (labelled A, B, ... for letter
tasks, by ``labels`` in order for label tasks) or a ``{label: text}`` dict.

A string ending in ``.yaml``/``.yml`` in ``eval.tasks`` is a file holding one definition or a list of them. User
groups (``eval.groups: {NAME: [task, ...]}``) expand where they are named and get their mean accuracy in the
summary, as the registered groups do.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import yaml

from s2ft.checks import is_positive_int
from s2ft.data.records import DataError, Example
from s2ft.data.tasks import GROUPS, TASKS, TaskSpec, UnknownNameError, resolve_tasks
from s2ft.data.user import SOURCE_KEYS, UserSource, file_lines, load_rows, parse_source, to_examples

ANSWER_KINDS = ("number", "letter", "label", "text")
TASK_KEYS = ("answer", "labels", "tolerance", "max_new_tokens", "mode")
LETTERS = tuple("ABCDE")
DEFAULT_BUDGET = {"number": 256, "letter": 32, "label": 32, "text": 32}
log = logging.getLogger(__name__)


def parse_task(definition: dict) -> TaskSpec:
    """A TaskSpec from a user's task definition (see the module docstring), without reading the test file.

    Raises:
        DataError: A missing or clashing name, an unknown answer kind or key, labels on a non-label task (or none on
            one), a bad tolerance, budget or mode.
    """
    if not isinstance(definition, dict):
        raise DataError(f"a task definition is a dict with name, path (or hub) and answer, got {definition!r}")
    name = definition.get("name")
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"task definition {definition!r} needs a name")
    where = f"task {name}"
    if "/" in name or "\\" in name or name.strip(".") == "":
        # The name is a file's: predictions/NAME.jsonl, which the report finds with predictions/*.jsonl.
        raise DataError(f"{where}: the name names its predictions file, so it cannot hold / or \\ or be . or ..")
    if name.lower() in TASKS or name.lower() in GROUPS:
        raise DataError(f"{where}: the name is a registered task or group; give the user task another name")
    kind = definition.get("answer")
    if kind not in ANSWER_KINDS:
        raise DataError(f"{where}: answer must be one of {', '.join(ANSWER_KINDS)}, got {kind!r}")
    labels = definition.get("labels")
    if kind == "label":
        if isinstance(labels, list) and any(isinstance(x, bool) for x in labels):
            # YAML (a task file, a conf/eval config) reads unquoted yes, no, true, false, on and off as booleans.
            raise DataError(
                f"{where}: labels {labels} hold booleans, as yaml reads yes/no/true/false/on/off unquoted; quote each "
                "label: labels: ['yes', 'no']"
            )
        if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x for x in labels):
            raise DataError(f"{where}: answer: label needs labels: [a list of at least two label strings]")
        if len({label.lower() for label in labels}) < len(labels):
            # Golds and outputs are matched in lower case: two such labels would be one answer.
            raise DataError(f"{where}: labels {labels} repeat a label (case is ignored); give each label once")
        labels = tuple(labels)
    elif labels is not None:
        raise DataError(f"{where}: labels only apply to answer: label")
    else:
        labels = LETTERS if kind == "letter" else ()
    tolerance = definition.get("tolerance", 1e-3)
    if kind != "number" and "tolerance" in definition:
        raise DataError(f"{where}: tolerance only applies to answer: number")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or tolerance < 0:
        raise DataError(f"{where}: tolerance must be a number >= 0, got {tolerance!r}")
    budget = definition.get("max_new_tokens")
    if budget is not None and not is_positive_int(budget):
        raise DataError(f"{where}: max_new_tokens must be an int >= 1, got {budget!r}")
    mode = definition.get("mode")
    if mode not in (None, "generate", "loglik"):
        raise DataError(f"{where}: mode must be generate or loglik, got {mode!r}")
    if mode == "loglik" and kind not in ("letter", "label"):
        raise DataError(f"{where}: mode: loglik scores options, so answer must be letter or label, not {kind}")
    source_spec = {key: value for key, value in definition.items() if key in SOURCE_KEYS}
    unknown = sorted(set(definition) - set(SOURCE_KEYS) - set(TASK_KEYS))
    if unknown:
        raise DataError(f"{where}: unknown keys {unknown}; allowed: {', '.join(SOURCE_KEYS + TASK_KEYS)}")
    try:
        source = parse_source(source_spec, default_split="test")
    except DataError as err:
        raise DataError(f"{where}: {err}") from None
    return TaskSpec(
        name=name,
        suite="user",
        path=source.where,
        answer_kind=kind,
        labels=labels,
        max_new_tokens=budget or DEFAULT_BUDGET[kind],
        source=source,
        tolerance=float(tolerance),
        mode=mode,
        own_budget=budget is not None,
    )


def read_task_file(path: str | Path) -> list[dict]:
    """The task definitions of a yaml file: one dict, or a list of them (``tasks: [...]`` is accepted too).

    A relative ``path`` in a definition is read from the yaml file's folder when it is there, so a file of
    definitions and its test files can move together; otherwise as any relative path (`s2ft.data.user.resolve_path`:
    the working directory, then ``paths.data_dir``).

    Raises:
        DataError: A missing or unparsable file, or content that is not definitions.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"task definition file {path} does not exist")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise DataError(f"task definition file {path}: not valid yaml ({err})") from err
    except UnicodeDecodeError as err:
        raise DataError(f"task definition file {path}: not UTF-8 text ({err.reason}); save it as UTF-8") from err
    if isinstance(content, dict) and "tasks" in content:
        content = content["tasks"]
    definitions = [content] if isinstance(content, dict) else content
    if not isinstance(definitions, list) or not all(isinstance(d, dict) for d in definitions):
        raise DataError(f"task definition file {path}: expected a definition (a dict) or a list of them")
    return [_beside(definition, path.parent) for definition in definitions]


def _beside(definition: dict, folder: Path) -> dict:
    """The definition with a relative ``path`` that exists under ``folder`` made to point there.

    The new path is spelled the same however the yaml file was named (relative to the working directory when it is
    under it, else absolute), and a path that already names that file is kept as written: two spellings of one
    definition stay one task for the duplicate-name checks (`resolve_eval_tasks`, ``eval.heldout``).
    """
    given = definition.get("path")
    if not isinstance(given, str) or Path(given).expanduser().is_absolute() or not (folder / given).exists():
        return definition
    beside, here = folder / given, Path(given)
    if here.exists():
        if os.path.samefile(here, beside):
            return definition
        # Read from the working directory before the folder-first rule: a run continued now evaluates another file.
        log.warning(
            "task %s: path %s is read beside its definition file, %s, not from the working directory",
            definition.get("name"),
            given,
            beside,
        )
    spelled = os.path.relpath(os.path.abspath(beside))
    return {**definition, "path": os.path.abspath(beside) if spelled.split(os.sep)[0] == ".." else spelled}


def is_task_file(item) -> bool:
    """Whether an ``eval.tasks`` string names a yaml file of task definitions."""
    return isinstance(item, str) and Path(item).suffix.lower() in (".yaml", ".yml")


def resolve_eval_tasks(items, groups: dict[str, list] | None = None, defined=()) -> list[TaskSpec]:
    """Expands ``eval.tasks``: registered names and groups, a user's definitions (dicts), yaml files of definitions,
    user groups (``eval.groups``) and TaskSpecs, in order, without duplicates. A name may refer to a user task
    defined elsewhere in ``items``, in a group or in ``defined`` (e.g. ``eval.groups: {mine: [a, b]}`` with tasks
    ``a`` and ``b`` defined in ``eval.tasks``).

    Raises:
        UnknownNameError: An unknown name (registered tasks, groups and the user groups are listed).
        DataError: A bad definition, two different definitions with one name, a user group that names itself.
        ValueError: An empty list.
    """
    groups = groups or {}
    items = [items] if isinstance(items, str | dict | TaskSpec) else list(items)
    if not items:
        raise ValueError("no task given")
    definitions = [*items, *([defined] if isinstance(defined, str | dict) else defined)]
    named = {spec.name: spec for spec in _definitions([*definitions, *groups.values()])}
    specs: dict[str, TaskSpec] = {}
    for spec in _expand(items, groups, (), named):
        if spec.name in specs and specs[spec.name] != spec:
            raise DataError(f"two different task definitions are named {spec.name!r}; give each its own name")
        specs.setdefault(spec.name, spec)
    return list(specs.values())


def _definitions(items: Iterable) -> Iterable[TaskSpec]:
    """The user task definitions among ``items`` (nested lists are group members)."""
    for item in items:
        if isinstance(item, list):
            yield from _definitions(item)
        elif isinstance(item, TaskSpec) and item.source is not None:
            yield item
        elif isinstance(item, dict):
            yield parse_task(item)
        elif is_task_file(item):
            yield from (parse_task(definition) for definition in read_task_file(item))


def _expand(
    items: Iterable, groups: dict[str, list], within: tuple[str, ...], named: dict[str, TaskSpec]
) -> Iterable[TaskSpec]:
    for item in items:
        if isinstance(item, TaskSpec):
            yield item
        elif isinstance(item, dict):
            yield parse_task(item)
        elif is_task_file(item):
            yield from (parse_task(definition) for definition in read_task_file(item))
        elif isinstance(item, str) and item in groups:
            if item in within:
                raise DataError(f"eval.groups: group {item!r} contains itself")
            members = groups[item]
            if not isinstance(members, list) or not members:
                raise DataError(f"eval.groups: group {item!r} must be a non-empty list of tasks")
            yield from _expand(members, groups, (*within, item), named)
        elif isinstance(item, str) and item in named:
            yield named[item]
        elif isinstance(item, str):
            try:
                yield from resolve_tasks(item)
            except UnknownNameError as err:
                extra = f"; user groups: {', '.join(groups)}" if groups else ""
                raise UnknownNameError(f"{err}{extra}; or a task definition {{name, path, answer}}") from None
        else:
            raise TypeError(f"a task is a name, a definition (dict) or a yaml file, got {item!r}")


def group_members(groups: dict[str, list] | None, defined=()) -> dict[str, list[str]]:
    """User group -> the names of its tasks (for the summary's group accuracies); ``defined``: ``eval.tasks``."""
    return {
        name: [spec.name for spec in resolve_eval_tasks(members, groups, defined)]
        for name, members in (groups or {}).items()
    }


def load_user_task(
    spec: TaskSpec, data_dir: str | Path | None, mode: str | None = None
) -> tuple[list[Example], list[dict[str, str]] | None]:
    """The items of a user's task (gold in ``answer``: the record's answer, else its response) and, for loglik tasks,
    each item's ``{label: option text}``.

    Args:
        spec: The task.
        data_dir: The data directory.
        mode: The evaluation's mode (``eval.mode``), which the task's own ``mode`` overrides. A task that runs in
            loglik mode by ``eval.mode`` alone reads its records' options when they have the field, else (None) its
            options are parsed from its instructions as a registered task's are.

    Raises:
        DataError: The errors of `s2ft.data.user.to_examples`, and for loglik tasks a record without options, with
            fewer than two or more than the labels, or options that are not texts.
    """
    source: UserSource = spec.source
    rows = load_rows(source, data_dir)
    lines = file_lines(source, data_dir, len(rows))
    examples = to_examples(source, rows, lines, need_response=False, data_dir=data_dir)
    for example in examples:
        if not example.answer.strip():
            example.answer = example.output.strip()
    if (spec.mode or mode) != "loglik":
        return examples, None
    column = dict(source.columns).get("options", "options")
    if column not in rows.column_names and spec.mode is None:
        return examples, None
    if column not in rows.column_names:
        raise DataError(f"{source.where}: task {spec.name} has mode: loglik, so its records need an options field")
    options = []
    for index, value in enumerate(rows[column]):
        where = f"{source.where}: {lines[index] if lines else f'record {index}'}"
        if isinstance(value, dict):
            value = {str(label): text for label, text in value.items() if text is not None}
        elif isinstance(value, list):
            if len(value) > len(spec.labels):
                raise DataError(f"{where}: {len(value)} options, but the task has only labels {list(spec.labels)}")
            value = dict(zip(spec.labels, value, strict=False))
        else:
            raise DataError(f"{where}: options must be a list of texts or a {{label: text}} dict, got {value!r}")
        if len(value) < 2 or not all(isinstance(text, str) and text.strip() for text in value.values()):
            raise DataError(f"{where}: options need at least two non-empty texts, got {value!r}")
        labelled = {_label(spec, label): text for label, text in value.items()}
        # A label outside the task's would compete as an option no gold can name (a typo such as "negativ"), and two
        # labels that differ only in case would silently become one option.
        unknown = [label for label in value if _label(spec, label) not in {_label(spec, x) for x in spec.labels}]
        if unknown or len(labelled) < len(value):
            raise DataError(
                f"{where}: options labelled {list(value)}, but each option needs its own label among the task's "
                f"labels {list(spec.labels)} (case is ignored)"
            )
        texts = [text.strip() for text in labelled.values()]
        if len(set(texts)) < len(texts):
            # Equal texts score equally, and the first of tied options is the prediction: the item is decided by order.
            raise DataError(f"{where}: two options have the same text, {labelled!r}; give each option its own text")
        options.append(labelled)
    return examples, options


def _label(spec: TaskSpec, label: str) -> str:
    """A label as the task's golds are parsed: upper case for letter tasks, lower case for label tasks."""
    return label.upper() if spec.answer_kind == "letter" else label.lower()
