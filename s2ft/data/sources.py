"""Loading the registered sets: evaluation tasks, training mixtures (with a validation split) and held-out loss sets.

Every subset is drawn with a seeded permutation of the item indices and nothing else, so the same seed gives the
same items whatever the other options are, and a smaller limit gives a subset of a larger one.
"""

import logging
import random
from collections.abc import Iterable
from pathlib import Path

from s2ft.checks import is_positive_int
from s2ft.data.overlap import drop_overlaps
from s2ft.data.records import DataError, Example, load_hub, read_gsm8k, read_llm_adapters, read_mawps_raw
from s2ft.data.tasks import (
    GROUPS,
    TaskSpec,
    TrainSource,
    UnknownNameError,
    data_path,
    resolve_tasks,
    resolve_train_items,
)
from s2ft.data.user import UserSource, file_digest, load_user_source, resolve_path, source_digest
from s2ft.data.user_tasks import is_task_file, load_user_task, read_task_file, resolve_eval_tasks

log = logging.getLogger(__name__)
_READERS = {"llm_adapters": read_llm_adapters, "gsm8k": read_gsm8k, "mawps_raw": read_mawps_raw}
# The domain of each held-out set: in domain for runs trained on that domain, out of domain (forgetting) otherwise.
HELDOUT_DOMAINS = {"gsm8k_test": "arithmetic", "commonsense_test": "commonsense"}
GSM8K_TEST = "gsm8k/test.jsonl"  # the gsm8k_test held-out set, under the data directory


def _permutation(count: int, seed: int, stream: str) -> list[int]:
    # A string seed is hashed with SHA-512 by `random`, so it is stable across processes and Python versions;
    # the stream name keeps the training shuffle and the validation draw independent.
    order = list(range(count))
    random.Random(f"{stream}:{seed}").shuffle(order)
    return order


def _check_limit(limit: int | None) -> None:
    if limit is not None and not is_positive_int(limit):
        raise ValueError(f"limit must be a positive integer or None (all items), got {limit!r}")


def eval_subset(examples: list[Example], limit: int | None, seed: int = 0) -> list[Example]:
    """A deterministic subset of ``limit`` items, in file order (all items when limit is None or too large)."""
    _check_limit(limit)
    if limit is None or limit >= len(examples):
        return list(examples)
    chosen = sorted(_permutation(len(examples), seed, "eval")[:limit])
    return [examples[i] for i in chosen]


def load_eval(task: str | dict | TaskSpec, data_dir: str | Path) -> list[Example]:
    """Loads every item of one evaluation task.

    The local LLM-Adapters test file is used when present; HellaSwag falls back to the hub (validation split,
    whose labels are public), with a clear error when offline. A user's task (a definition, `s2ft.data.user_tasks`)
    reads its own file.

    Raises:
        UnknownNameError: Unknown task name (groups are not accepted here: use `resolve_tasks`).
        FileNotFoundError: The test file is missing (names it and the ``paths.data_dir`` fix).
        DataError: A malformed record (file and index in the message).
    """
    if isinstance(task, str) and task.lower() in GROUPS:
        raise UnknownNameError(f"{task!r} is a group; expand it with resolve_tasks and load each task")
    if not isinstance(task, TaskSpec):
        (task,) = resolve_eval_tasks(task)
    if task.source is not None:
        return load_user_task(task, data_dir)[0]
    path = Path(data_dir) / task.path
    if task.hub is not None and not path.is_file():
        return load_hub(task.hub, "validation")
    return read_llm_adapters(data_path(data_dir, task.path), task.name)


def load_train(
    sources: str | dict | Iterable[str | dict], data_dir: str | Path, limit: int | None = None, seed: int = 0
) -> list[Example]:
    """Loads and mixes training sources into one shuffled list.

    Items with an empty output (nothing to train on) are dropped with a warning, and a source with
    ``clean_against`` loses the items whose question occurs in those evaluation sets (see `TRAIN_SETS`).

    Args:
        sources: Source names or groups (``commonsense_mix``), see `s2ft.data.tasks.TRAIN_SETS`, and a user's files or
            hub datasets (`s2ft.data.user`: a path, or a dict with path or hub, format, columns).
        data_dir: The data directory.
        limit: Keep only this many items (the first ones of the seeded shuffle); None keeps all.
        seed: Shuffle seed.

    Returns:
        The items of all sources in a seeded random order (training order and subset in one).

    Raises:
        UnknownNameError: An unknown source.
        FileNotFoundError: A missing file (named, with the ``paths.data_dir`` fix).
        DataError: A malformed record (file and line or index in the message), an empty user set, a bad source spec.
    """
    _check_limit(limit)
    examples = []
    test_sets: dict[tuple[str, ...], dict[str, list[Example]]] = {}
    for source in resolve_train_items(sources):
        if isinstance(source, UserSource):
            examples.extend(load_user_source(source, data_dir))
            continue
        loaded = read_train_source(source, data_dir)
        if source.clean_against:
            if source.clean_against not in test_sets:
                tasks = resolve_tasks(source.clean_against)
                test_sets[source.clean_against] = {task.name: load_eval(task, data_dir) for task in tasks}
            clean, counts = drop_overlaps(loaded, test_sets[source.clean_against])
            if len(clean) < len(loaded):
                shared = {name: count for name, count in counts.items() if count}
                log.info(
                    "training source %s: removed %d items whose question is in %s",
                    source.name,
                    len(loaded) - len(clean),
                    shared,
                )
            loaded = clean
        kept = [ex for ex in loaded if ex.output.strip()]
        if len(kept) < len(loaded):
            # math_data.json has 3 items without a rationale; an empty target teaches nothing, so they are dropped.
            dropped = [ex.id for ex in loaded if not ex.output.strip()]
            log.warning(
                "training source %s: dropped %d items with an empty output: %s", source.name, len(dropped), dropped
            )
        examples.extend(kept)
    order = _permutation(len(examples), seed, "train")
    return [examples[i] for i in order[:limit]]


def read_train_source(source: TrainSource, data_dir: str | Path) -> list[Example]:
    """Every item of one registered training source, as its file holds them (before any cleaning)."""
    if source.reader == "hub":
        return load_hub(source.path, "train")
    return _READERS[source.reader](data_path(data_dir, source.path), source.name)


def describe_train_sources(sources: str | dict | Iterable[str | dict], data_dir: str | Path) -> list[dict]:
    """Provenance of each training source: its name, file (or hub id), SHA-256 (a hub dataset's `datasets`
    fingerprint) and number of records, for a run's summary; a user's local file or folder also its absolute path
    (``resolved``), since one given relative to the working directory (``file``) names nothing from another.

    Raises:
        The errors of `load_train`.
    """
    described = []
    for source in resolve_train_items(sources):
        if isinstance(source, UserSource):
            count = len(load_user_source(source, data_dir))
        else:
            count = len(read_train_source(source, data_dir))
        described.append({**_train_file(source, data_dir), "count": count})
    return described


def train_source_files(sources: str | dict | Iterable[str | dict], data_dir: str | Path) -> list[dict]:
    """`describe_train_sources` without the record counts: what a finished run's recorded digests are compared with.
    Local files are hashed, not parsed; a registered hub set is not loaded (its SHA-256 is None), a user's hub dataset
    is (its `datasets` fingerprint)."""
    return [_train_file(source, data_dir) for source in resolve_train_items(sources)]


def _train_file(source: TrainSource | UserSource, data_dir: str | Path) -> dict:
    """``name``, ``file`` (or hub id), ``sha256`` (and a user's local ``resolved`` path) of one training source."""
    if isinstance(source, UserSource):
        where = source.path if source.path is not None else source.hub
        entry = {"name": source.name, "file": where, "sha256": source_digest(source, data_dir)}
        if source.path is not None:
            entry["resolved"] = str(resolve_path(source.path, data_dir).resolve())
        return entry
    if source.reader == "hub":
        return {"name": source.name, "file": source.path, "sha256": None}
    path = data_path(data_dir, source.path)
    return {"name": source.name, "file": str(path), "sha256": file_digest(path)}


def describe_eval_sources(
    tasks: Iterable | None, heldout: Iterable | None, data_dir: str | Path, groups: dict | None = None
) -> list[dict]:
    """Provenance of the files a run measures on, for its summary: one ``{"name", "role", "file", "sha256"}`` per
    file, ``role`` "task" (``eval.tasks``) or "heldout" (``eval.heldout``; ``commonsense_test`` one entry for each of
    its seven files); a user's local file or folder also its absolute path (``resolved``), a hub dataset its id as
    ``file`` and its `datasets` fingerprint (a registered one, read only when its file is absent: none).

    Raises:
        The errors of `load_eval` and `load_heldout` for a name or file that does not resolve.
    """
    specs = [("task", spec.name, spec) for spec in resolve_eval_tasks(list(tasks), groups)] if tasks else []
    for item in heldout or []:
        if item == "gsm8k_test":
            specs.append(("heldout", item, GSM8K_TEST))
        elif item == "commonsense_test":
            specs += [("heldout", item, spec) for spec in resolve_tasks("commonsense")]
        else:
            specs += [("heldout", spec.name, spec) for spec in resolve_heldout(item)]
    return [{"name": name, "role": role, **_eval_file(spec, data_dir)} for role, name, spec in specs]


def _eval_file(spec: TaskSpec | str, data_dir: str | Path) -> dict:
    """``file`` and ``sha256`` (and ``resolved``) of one evaluation file: a TaskSpec's, or one under ``data_dir``."""
    if isinstance(spec, str):
        path = data_path(data_dir, spec)
        return {"file": str(path), "sha256": file_digest(path)}
    if spec.source is not None:
        source = spec.source
        if source.path is None:
            return {"file": source.hub, "sha256": source_digest(source, data_dir)}
        resolved = resolve_path(source.path, data_dir)
        return {"file": source.path, "resolved": str(resolved.resolve()), "sha256": file_digest(resolved)}
    path = Path(data_dir) / spec.path
    if spec.hub is not None and not path.is_file():
        return {"file": spec.hub, "sha256": None}
    return _eval_file(spec.path, data_dir)


def split_validation(
    examples: list[Example], val_size: int | float, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Splits off a deterministic validation set.

    Args:
        examples: The training items.
        val_size: A count (int >= 0) or a fraction in (0, 1).
        seed: Draw seed.

    Returns:
        (train, validation), each keeping the input order.

    Raises:
        ValueError: A size that is not a count or a fraction in (0, 1).
        DataError: No training items left.
    """
    if isinstance(val_size, bool) or not isinstance(val_size, int | float):
        raise ValueError(f"val_size must be a count or a fraction in (0, 1), got {val_size!r}")
    if isinstance(val_size, float):
        if not 0 < val_size < 1:
            raise ValueError(f"a fractional val_size must lie in (0, 1), got {val_size}")
        val_size = max(1, round(val_size * len(examples)))
    if val_size < 0 or val_size >= len(examples):
        raise DataError(
            f"data.val_size={val_size} leaves no training items out of {len(examples)}; lower data.val_size"
        )
    in_val = set(_permutation(len(examples), seed, "validation")[:val_size])
    train = [ex for i, ex in enumerate(examples) if i not in in_val]
    val = [ex for i, ex in enumerate(examples) if i in in_val]
    return train, val


def resolve_heldout(item: str | dict) -> list[TaskSpec]:
    """The task specs of a user's held-out definition (or yaml file of them), as `resolve_eval_tasks` gives a task's."""
    return resolve_eval_tasks(_heldout_definition(item))


def _heldout_definition(item: str | dict) -> str | dict | list[dict]:
    """A held-out definition (or yaml file of one) as a task definition: a loss set scores its records' responses,
    so it needs no ``answer`` (it was refused as "answer must be one of number, letter, label, text, got None")."""
    if is_task_file(item):
        try:
            return [_heldout_definition(definition) for definition in read_task_file(item)]
        except DataError:
            return item  # resolve_eval_tasks names the problem
    return {**item, "answer": "text"} if isinstance(item, dict) and "answer" not in item else item


def heldout_name(item: str | dict) -> str:
    """The name a held-out set is reported under: the registered name, or the user task definition's name."""
    return item if isinstance(item, str) and item in HELDOUT_DOMAINS else resolve_heldout(item)[0].name


def load_heldout(name: str | dict, data_dir: str | Path) -> list[Example]:
    """Loads a held-out loss set, whose outputs are the targets scored by mean response-token NLL.

    Args:
        name: ``gsm8k_test`` (GSM8K test questions with their worked solutions: in-domain for arithmetic),
            ``commonsense_test`` (the seven local commonsense test sets, "the correct answer is X": far-OOD /
            forgetting), or a user's task (a definition or a yaml file of one, `s2ft.data.user_tasks`), whose
            responses are the targets.
        data_dir: The data directory.

    Raises:
        UnknownNameError: Unknown name (lists the valid ones); DataError: a bad user set (records need a response).
    """
    if not (isinstance(name, str) and name in HELDOUT_DOMAINS):
        try:
            specs = resolve_heldout(name)
        except UnknownNameError:
            specs = []  # its message lists the evaluation tasks, not the held-out sets
        if len(specs) != 1 or specs[0].source is None:
            raise UnknownNameError(
                f"unknown held-out set {name!r}; valid: {', '.join(HELDOUT_DOMAINS)} or one user task definition "
                "{name, path}"
            )
        return load_user_source(specs[0].source, data_dir)
    if name == "gsm8k_test":
        return read_gsm8k(data_path(data_dir, GSM8K_TEST), "gsm8k_test")
    if name == "commonsense_test":
        return [ex for task in resolve_tasks("commonsense") for ex in load_eval(task, data_dir)]
    raise UnknownNameError(f"unknown held-out set {name!r}; valid: {', '.join(HELDOUT_DOMAINS)}")
