"""The check of ``eval.tasks`` (and ``eval.groups``) of a run config, before any model is loaded."""

from pathlib import Path

from s2ft.data.user_tasks import group_members, is_task_file, resolve_eval_tasks
from s2ft.evaluation.evaluate import prepare_tasks


def check_task_spec(
    tasks, data_dir: str | Path, groups: dict | None = None, mode: str = "generate", key: str = "eval.tasks"
) -> list[str]:
    """Problems of ``eval.tasks``: unknown names, missing test files, bad definitions and, for a user's tasks, every
    record (its fields, its gold answer for the answer kind, its options in log-likelihood mode), so a bad test file
    stops the run before the model loads. Registered tasks' records are checked when they are evaluated.

    ``key`` is the config key the problems name (``data.overlap_tasks`` holds tasks too).
    """
    problems = []
    items = [tasks] if isinstance(tasks, str | dict) else list(tasks or [])
    for item in items:
        try:
            specs = resolve_eval_tasks(item, groups, items)
        except (KeyError, ValueError, TypeError) as err:
            problems.append(f"{key}: {err}")
            continue
        for spec in specs:
            if spec.source is None:
                if spec.hub is None and not (Path(data_dir) / spec.path).is_file():
                    problems.append(f"eval task {spec.name}: file {Path(data_dir) / spec.path} is missing")
                continue
            try:
                prepare_tasks([spec], data_dir, mode)
            except (ValueError, FileNotFoundError) as err:
                problems.append(f"{key}: {_defined_in(item, spec)}{err}")
    if not problems and items:
        try:
            resolve_eval_tasks(items, groups)  # two different definitions under one name
            group_members(groups, items)
        except (KeyError, ValueError, TypeError) as err:
            problems.append(f"{key}: {err}")
    return problems


def _defined_in(item, spec) -> str:
    """Which definition file a task's problem comes from, and for a relative path found nowhere, that it was looked
    for beside that file first (``read_task_file`` points a path found there at it)."""
    if not is_task_file(item):
        return ""
    path = spec.source.path
    missing = (
        path is not None
        and not Path(path).expanduser().is_absolute()
        and not Path(path).exists()
        and not (Path(item).expanduser().parent / path).exists()
    )
    return f"task {spec.name} of {item}{' (its path is not beside that file either)' if missing else ''}: "
