"""Which data a run trained on: recorded in its summary and beside its adapter, and checked when it is evaluated.

The record names every training source with its file, the file's SHA-256 and the items it gave the training split,
plus the settings that drew them (``limit``, ``seed``, ``val_size``) and the evaluation sets the overlap guard checked.
`check_eval_overlap` rebuilds the training items from it, so evaluating an adapter on tasks it was trained on is
refused as training on them is (`s2ft.data.overlap.check_overlap`, held-out loss sets included), unless
``data.allow_overlap=true``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

from s2ft.adapter_format import AdapterError
from s2ft.data import DataError, load_eval, load_heldout, load_train
from s2ft.data.overlap import DataOverlapError, overlap_findings
from s2ft.data.sources import describe_train_sources, heldout_name
from s2ft.data.user import file_digest, is_data_file, parse_source
from s2ft.data.user_tasks import resolve_eval_tasks
from s2ft.lightning.summary import write_json

ADAPTER_CONFIG = "adapter_config.json"  # S2FT's: the record is added under TRAINING_KEY
RECORD_FILE = "training_data.json"  # beside the weights of the other methods (PEFT and full checkpoints)
TRAINING_KEY = "training_data"
log = logging.getLogger(__name__)


def training_record(cfg: dict, train: list, val: list, overlap_checked: list[str]) -> dict:
    """The provenance of a run's training items (``train``, ``val``: the split `Example` lists)."""
    data, data_dir = cfg["data"], Path(cfg["paths"]["data_dir"])
    counts = Counter(example.task for example in train)
    # Each source's file (or hub id), SHA-256 and record count, plus the items of it this run trained on.
    sources = [
        {**source, "items": counts.get(source["name"], 0)} for source in describe_train_sources(data["train"], data_dir)
    ]
    return {
        "train": data["train"],
        "limit": data.get("limit"),
        "seed": cfg["seed"],
        "val_size": data.get("val_size"),
        "train_items": len(train),
        "val_items": len(val),
        "sources": sources,
        "overlap_checked": overlap_checked,
        "allow_overlap": bool(data.get("allow_overlap", False)),
    }


def items_digest(train: list, val: list) -> str:
    """SHA-256 of a run's training and validation items (`Example` lists) in their order, every field of each.

    A file's SHA-256 (`training_record`'s sources) says nothing of a registered hub set (commonsense_170k, math_10k,
    alpaca_gpt4), which a hub update or a fresh ``datasets`` cache can change between two sessions of one run.
    """
    digest = hashlib.sha256()
    for split in (train, val):
        digest.update(f"{len(split)}\n".encode())
        for example in split:
            fields = (example.id, example.task, example.instruction, example.input, example.output, example.answer)
            digest.update((json.dumps(fields) + "\n").encode())
    return digest.hexdigest()


def write_adapter_record(adapter_dir: Path, method: str, record: dict) -> None:
    """Add ``record`` to an S2FT adapter's config, or write it beside another method's weights."""
    config_file = adapter_dir / ADAPTER_CONFIG
    if method == "s2ft":
        config = json.loads(config_file.read_text())
        write_json({**config, TRAINING_KEY: record}, config_file)
    else:
        write_json(record, adapter_dir / RECORD_FILE)


def read_adapter_record(adapter_dir: Path) -> dict | None:
    """The training record saved with an adapter (either place), or None for an adapter saved without one."""
    record_file = adapter_dir / RECORD_FILE
    if record_file.is_file():
        return _read_json(record_file)
    config_file = adapter_dir / ADAPTER_CONFIG
    if config_file.is_file():
        config = _read_json(config_file)
        if isinstance(config, dict) and isinstance(config.get(TRAINING_KEY), dict):
            return config[TRAINING_KEY]
    return None


def _read_json(path: Path):
    """``path``'s JSON; an ``AdapterError`` naming the file when it is not JSON (a save cut short, an edit)."""
    try:
        return json.loads(path.read_text())
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise AdapterError(
            f"corrupt {path}: {err}; it is not the JSON a saved adapter holds: save the adapter again, or restore the "
            "file"
        ) from None


def _as_read(record: dict) -> list:
    """The record's ``train`` with each user file or folder pointed at the absolute path the run read it from, where
    that is still there: a path relative to the training's working directory is not found from another one (the
    guard could not run) or names another file there."""
    resolved = {entry["name"]: entry["resolved"] for entry in record["sources"] if entry.get("resolved")}
    items = [record["train"]] if isinstance(record["train"], str | dict) else list(record["train"])
    read = []
    for item in items:
        if (isinstance(item, str) and is_data_file(item)) or (isinstance(item, dict) and item.get("path") is not None):
            name = parse_source(item).name
            if name in resolved and Path(resolved[name]).exists():
                item = {**({} if isinstance(item, str) else item), "path": resolved[name], "name": name}
        read.append(item)
    return read


def check_eval_overlap(record: dict | None, source: Path, cfg: dict) -> None:
    """Refuse to evaluate an adapter on evaluation or held-out sets that share questions with its training items.

    Args:
        record: The adapter's training record (None: unknown, a warning says the guard could not run).
        source: The adapter folder, for the messages.
        cfg: The evaluation config (``eval.tasks``, ``eval.heldout``, ``data.allow_overlap``, ``paths.data_dir``).

    Raises:
        DataOverlapError: Overlap found and ``data.allow_overlap`` is false.
    """
    ev, data_dir = cfg["eval"], cfg["paths"]["data_dir"]
    tasks, heldout_items = ev.get("tasks") or [], ev.get("heldout") or []
    if not tasks and not heldout_items:
        return
    if record is None:
        log.warning("%s records no training data: the train/test overlap guard cannot check this evaluation", source)
        return
    for entry in record["sources"]:
        # A user's file is recorded as given, relative to the working directory or else to the data directory, and
        # (since resolved was recorded) as the absolute path it was read from.
        given = Path(entry.get("resolved") or entry["file"])
        file = given if given.is_file() else Path(data_dir) / given
        if entry.get("sha256") and file.is_file() and file_digest(file) != entry["sha256"]:
            log.warning("%s changed since %s was trained on it: the guard checks its current items", file, source)
    try:
        train = load_train(_as_read(record), data_dir, record.get("limit"), record.get("seed", 0))
    except (FileNotFoundError, DataError) as err:
        log.warning("the train/test overlap guard cannot rebuild the training items of %s: %s", source, err)
        return
    specs = resolve_eval_tasks(tasks, ev.get("groups")) if tasks else []
    eval_sets = {task.name: load_eval(task, data_dir) for task in specs}
    heldout = {heldout_name(item): load_heldout(item, data_dir) for item in heldout_items}
    _, found = overlap_findings(train, eval_sets, heldout)
    if not found:
        return
    names = ", ".join(source_["name"] for source_ in record["sources"])
    if cfg["data"].get("allow_overlap"):
        log.warning("%s was trained on questions of %s (allowed by data.allow_overlap)", source, found)
        return
    raise DataOverlapError(
        f"{source} was trained on {names}, which contains questions of {found}. Evaluate it on other sets (eval.tasks, "
        "eval.heldout), or opt in with data.allow_overlap=true"
    )
