"""Checks of the data settings of a run config (``data.train``, ``eval.tasks``, ``eval.heldout``), before any model
is loaded: each returns the list of problems found, for `s2ft.run_config` to report all at once."""

from pathlib import Path

from s2ft.data.records import DataError
from s2ft.data.sources import HELDOUT_DOMAINS, heldout_name, load_heldout, resolve_heldout
from s2ft.data.tasks import resolve_train_items
from s2ft.data.user import UserSource, load_user_source


def check_train_spec(train, data_dir: str | Path) -> list[str]:
    """Problems of ``data.train``: unknown names, missing files, bad source specs and bad records of a user's data
    (each user source is read and every record checked, so a bad record stops the run before the model loads).
    """
    if not train:
        return ["data.train is empty; name the training sources, e.g. data.train=[commonsense_mix] or [my/train.jsonl]"]
    problems, resolvable = [], []
    for item in [train] if isinstance(train, str | dict) else train:
        try:
            sources = resolve_train_items(item)
        except (KeyError, ValueError, TypeError) as err:
            problems.append(f"data.train: {err}")
            continue
        resolvable.append(item)
        for source in sources:
            if isinstance(source, UserSource):
                try:
                    load_user_source(source, data_dir)
                except DataError as err:
                    problems.append(f"data.train: {err}")
            elif source.reader != "hub" and not (Path(data_dir) / source.path).is_file():
                problems.append(f"training file {Path(data_dir) / source.path} is missing (check paths.data_dir)")
    if resolvable:
        try:
            resolve_train_items(resolvable)  # the whole list: two sources of one name
        except DataError as err:
            problems.append(f"data.train: {err}")
    return problems


def check_heldout_spec(heldout, data_dir: str | Path) -> list[str]:
    """Problems of ``eval.heldout``: unknown names, bad user sets (each is read; records need a response) and two
    different sets under one name (the summary keeps one loss per name, and one ``heldout_NAME.jsonl``)."""
    problems, named = [], {}
    for item in [heldout] if isinstance(heldout, str | dict) else heldout or []:
        try:
            load_heldout(item, data_dir)
        except (KeyError, ValueError, TypeError, FileNotFoundError) as err:
            problems.append(f"eval.heldout: {err}")
            continue
        # A definition inline and the same one in a yaml file are one set: compared as the task they define.
        identity = item if isinstance(item, str) and item in HELDOUT_DOMAINS else resolve_heldout(item)[0]
        name = heldout_name(item)
        if identity != item and name in HELDOUT_DOMAINS:
            # The summary and the report would take its loss for the registered set's (a forgetting measure).
            problems.append(
                f"eval.heldout: the user set {name!r} has the name of a registered held-out set; give it another name"
            )
            continue
        if named.setdefault(name, identity) != identity:
            problems.append(
                f"eval.heldout: two different held-out sets are named {name!r}: the second's loss and item file "
                "would replace the first's; give each its own name"
            )
    return problems
